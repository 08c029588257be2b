#!/usr/bin/env bash
# The test suite. Without a CUDA device the Triton kernels run under the interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 before triton is imported); with one, everything runs for real.
#
#   bash scripts/run_tests.sh              # everything: the main environment (newest torch, Triton,
#                                          # transformers), then the GPU image's Triton 3.6 and
#                                          # transformers 5.17 in cached venvs (scripts/compat_env.sh)
#   bash scripts/run_tests.sh tests/x.py   # arguments go to pytest in the main environment only
#   MASKLM_COMPAT=0 bash scripts/run_tests.sh   # the main environment only
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/setup_env.sh test
"$PY" -m masklm_kernels.info
echo "[lint] ruff check (pyproject.toml: pyflakes, pycodestyle, import order)"
"$PY" -m ruff check .
"$PY" -m pytest tests -q "$@"
if [[ $# -gt 0 || "${MASKLM_COMPAT:-1}" == 0 ]]; then
  exit 0
fi

# The GPU image's Triton: every test that runs a Triton kernel (interpreter), and the ahead-of-time
# compile check of every launch configuration (no spill for sm_80 / sm_90).
VPY=$(bash scripts/compat_env.sh triton 3.6.0)
echo "[compat] triton 3.6.0: interpreter tests and the static compile check"
"$VPY" -m pytest -q -p no:cacheprovider tests/test_attention_triton.py tests/test_losses_triton.py \
  tests/test_losses.py tests/test_losses_linear.py tests/test_attention_errors.py tests/test_info.py \
  tests/test_triton_versions.py \
  "tests/test_static_compile.py::test_triton_kernels_compile_without_spills" \
  "tests/test_static_compile.py::test_triton_compile_report_covers_every_launchable_configuration"

# The GPU image's transformers: the Hugging Face integration and the models loaded from it.
VPY=$(bash scripts/compat_env.sh transformers 5.17.0)
echo "[compat] transformers 5.17.0: Hugging Face integration"
"$VPY" -m pytest -q -p no:cacheprovider tests/test_integrations_hf.py tests/test_integrations_trainer.py tests/test_models.py
