#!/usr/bin/env bash
# The test suite. Without a CUDA device the Triton kernels run under the interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 before triton is imported); with one, everything runs for real.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
"${PYTHON:-python3}" -m masklm_kernels.info
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
