#!/usr/bin/env bash
# A cached virtual environment that pins one package to another version than the main environment, for
# testing the versions the GPU image runs (Triton 3.6, transformers 5.17) beside the newest:
#
#   VPY=$(bash scripts/compat_env.sh triton 3.6.0)     # prints the venv's python
#
# The venv sees the main environment's packages (--system-site-packages: torch, this package's editable
# install, pytest) and overrides only the pinned one (and what pip needs to satisfy it). It lives under
# ${MASKLM_CACHE:-~/.cache/masklm_kernels}/venvs/ and is reused while the pin still imports at that version.
set -euo pipefail
PKG="$1"; VER="$2"
PY="${PYTHON:-python3}"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
VENV="${MASKLM_CACHE:-$HOME/.cache/masklm_kernels}/venvs/${PKG}-${VER}-py${PYVER}"
check() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$PKG') != '$VER')" 2>/dev/null; }
if ! check; then
  echo "[compat] creating $VENV" >&2
  rm -rf "$VENV"
  "$PY" -m venv --system-site-packages "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet "$PKG==$VER" >&2
  check || { echo "[compat] $PKG $VER did not install in $VENV" >&2; exit 1; }
fi
echo "$VENV/bin/python"
