#!/usr/bin/env bash
# The test suite. Without a CUDA device the Triton kernels run under the interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 before triton is imported); with one, everything runs for real.
#
#   bash scripts/run_tests.sh              # fast: lint, then the suite without the static GPU build check
#                                          # and without the longer random sweeps (marker `slow`)
#   bash scripts/run_tests.sh --full       # CI: the fast run, then the static GPU build (nvcc and Triton
#                                          # ahead of time for sm_80 / sm_90, no spills) as its own phase,
#                                          # the longer sweeps, then the GPU image's Triton 3.6 and
#                                          # transformers 5.17 in cached venvs (scripts/compat_env.sh)
#   bash scripts/run_tests.sh tests/x.py   # arguments go to pytest (the main environment only)
#
# Set-up (scripts/setup_env.sh) is skipped when nothing it builds from has changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
FULL=0
if [[ "${1:-}" == "--full" ]]; then
  FULL=1
  shift
  if [[ $# -gt 0 ]]; then
    echo "run_tests.sh: --full runs the whole suite and takes no pytest arguments" >&2
    exit 2
  fi
fi
phase() { echo; echo "== $1 ($(date +%H:%M:%S))"; }
start=$SECONDS
bash scripts/setup_env.sh test
"$PY" -m masklm_kernels.info
phase "lint: ruff check (pyproject.toml: pyflakes, pycodestyle, import order)"
"$PY" -m ruff check .
if [[ $# -gt 0 ]]; then
  exec "$PY" -m pytest -q "$@"
fi
phase "tests (the static GPU build check and the longer sweeps excluded: --full runs them)"
"$PY" -m pytest tests -q -m "not slow and not gpu_build"
if [[ $FULL == 0 ]]; then
  echo "[tests] done in $((SECONDS - start)) s; bash scripts/run_tests.sh --full adds the static GPU build and the GPU image's versions"
  exit 0
fi

phase "static GPU build without a GPU: nvcc and Triton ahead of time for sm_80 / sm_90 (registers, spills)"
"$PY" -m pytest tests -q -m gpu_build
phase "the longer random sweeps"
"$PY" -m pytest tests -q -m slow

# The GPU image's Triton: every test that runs a Triton kernel (interpreter), and the ahead-of-time
# compile check of every launch configuration (no spill for sm_80 / sm_90).
VPY=$(bash scripts/compat_env.sh triton 3.6.0)
phase "compat: triton 3.6.0, interpreter tests and the static compile check"
"$VPY" -m pytest -q -p no:cacheprovider tests/test_attention_triton.py tests/test_losses_triton.py \
  tests/test_losses.py tests/test_losses_linear.py tests/test_attention_errors.py tests/test_info.py \
  tests/test_triton_versions.py tests/test_attention_layouts.py tests/test_attention_dropout.py tests/test_autocast.py \
  "tests/test_static_compile.py::test_triton_kernels_compile_without_spills" \
  "tests/test_static_compile.py::test_triton_compile_report_covers_every_launchable_configuration"

# The GPU image's transformers: the Hugging Face integration and the models loaded from it.
VPY=$(bash scripts/compat_env.sh transformers 5.17.0)
phase "compat: transformers 5.17.0, Hugging Face integration"
"$VPY" -m pytest -q -p no:cacheprovider tests/test_integrations_hf.py tests/test_integrations_modernbert.py \
  tests/test_integrations_trainer.py \
  tests/test_models.py tests/test_readme.py
echo "[tests] full run done in $((SECONDS - start)) s"
