#!/usr/bin/env bash
# The main job: for now a masking demo (what it did, and its throughput) on the best device here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec "${PYTHON:-python3}" -m masklm_kernels.demo "$@"
