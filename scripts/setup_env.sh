#!/usr/bin/env bash
# Set-up shared by the quickstart commands: torch first (never a CUDA download on a CPU machine), then
# the build tools, then this package built against that torch (no isolated build: pip would fetch a CUDA
# torch to build against).
# Idempotent: an installed torch (e.g. a GPU machine's CUDA build) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${1:-test}"

# Skipped when this interpreter already runs this checkout's build and nothing it is built from changed
# (csrc/, setup.py, pyproject.toml, the extras, torch and its CUDA, nvcc, the build switches): the stamp
# holds their hash.
STAMP=build/.setup-stamp
KEY=$("$PY" - "$EXTRAS" <<'PYEOF' 2>/dev/null || true
import hashlib, os, pathlib, shutil, sys
import torch
# what setup.py builds against: the interpreter, torch (and its CUDA), the toolkit and the build switches
env = [os.environ.get(k, "") for k in ("CUDA_HOME", "MASKLM_FORCE_CUDA", "MASKLM_NO_EXTENSION", "CXX",
                                         "TORCH_CUDA_ARCH_LIST")]
h = hashlib.sha256("|".join([sys.executable, sys.argv[1], torch.__version__, str(torch.version.cuda),
                             str(shutil.which("nvcc")), *env]).encode())
for p in sorted(pathlib.Path("csrc").rglob("*")) + [pathlib.Path("setup.py"), pathlib.Path("pyproject.toml")]:
    if p.is_file():
        h.update(str(p).encode() + b"\0" + p.read_bytes())
print(h.hexdigest())
PYEOF
)
PYABS=$("$PY" -c "import sys; print(sys.executable)" 2>/dev/null || echo "$PY")
if [[ -n "$KEY" && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]] && (cd / && MLK_HERE="$OLDPWD" "$PYABS" -c "
import os, sys, masklm_kernels, masklm_kernels._C
here = os.path.join(os.environ['MLK_HERE'], 'masklm_kernels')
sys.exit(os.path.dirname(os.path.abspath(masklm_kernels.__file__)) != here)
") >/dev/null 2>&1; then
  echo "[setup] up to date: nothing changed since the last build ($STAMP)"
  exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja pybind11 numpy
echo "[setup] building masklm_kernels against torch $("$PY" -c 'import torch; print(torch.__version__)')"
"$PY" -m pip install --quiet --no-build-isolation -e ".[${EXTRAS}]"
mkdir -p build
echo "$KEY" > "$STAMP"
