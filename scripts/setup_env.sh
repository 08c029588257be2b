#!/usr/bin/env bash
# Set-up shared by the quickstart commands: torch first (never a CUDA download on a CPU machine), then
# the build tools, then this package built against that torch (no isolated build, see DEVELOPERS.md).
# Idempotent: an installed torch (e.g. a GPU machine's CUDA build) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${1:-test}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja pybind11 numpy
echo "[setup] building masklm_kernels against torch $("$PY" -c 'import torch; print(torch.__version__)')"
"$PY" -m pip install --quiet --no-build-isolation -e ".[${EXTRAS}]"
