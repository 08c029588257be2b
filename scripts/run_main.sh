#!/usr/bin/env bash
# The main job: the training command (masked-LM pre-training of the small BERT-style model on the library's
# kernels, on the standard library's docstrings; about two minutes on a 2-core CPU). Arguments are passed
# on, e.g. `bash scripts/run_main.sh --task mass --compare`. The masking demo: python -m masklm_kernels.demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec "${PYTHON:-python3}" -m masklm_kernels.train "$@"
