#!/usr/bin/env bash
# The whole GPU proof of the library in one command (at most 8 minutes on one H200: the phases' limits
# add up to 480 s):
#
#   bash scripts/gpu_check.sh OUTDIR             # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry-run OUTDIR   # CPU: tiny shapes, Triton's interpreter (the test suite runs it)
#
# Phases, each under its own time limit; each writes what it has into OUTDIR even when a later one fails or
# times out, and SUMMARY.md is rewritten after every phase. OUTDIR gets at most eight files, none in folders
# (what a borrowed device machine hands back):
#   SUMMARY.md         phase, status, seconds, and the lines that matter from each
#   env.txt            nvidia-smi (GPU, driver, clocks), versions, masklm_kernels.info, the build log's tail
#   tests.xml          junit of the test suite on the GPU (real kernels: no interpreter)
#   tests.log          its output
#   sanitizer.log      compute-sanitizer memcheck and racecheck over scripts/call_every_kernel.py
#   bench.log          the benchmark suites at GPU shapes (progress, tables, summary against each peer)
#   results.tar.gz     benchmarks/results-style JSONL per suite, REPORT-<gpu>.md, plots, tiles-<gpu>.jsonl
#   tiles.log          the tile sweep's table: the table's entry against the fastest neighbour
#
# Unpack results.tar.gz into benchmarks/results/ and commit it. Environment: PYTHON (default python3);
# GPU_CHECK_SCALE multiplies every phase's time limit (default 1; 2 in the dry run, whose limits are the
# GPU's while the CPU runs the kernels one program at a time under the interpreter, on a shared CI host).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; fi
OUT="$1"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
SCALE="${GPU_CHECK_SCALE:-$((DRY + 1))}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mlk_gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/results"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  MODE="dry run (CPU, Triton interpreter, tiny shapes)"
else
  MODE="GPU"
fi

export DRY MODE PY WORK OUT
START=$(date +%s)
declare -a ROWS=()
summary() {  # rewrite SUMMARY.md from the rows so far (atomically)
  {
    echo "# GPU check: $MODE"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '? (no .git)')$(git diff --quiet 2>/dev/null; [[ $? == 1 ]] && echo ' (dirty)')"
    echo "- elapsed: $(( $(date +%s) - START )) s"
    echo
    echo "| phase | status | seconds | detail |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
  } > "$OUT/SUMMARY.md.tmp" && mv "$OUT/SUMMARY.md.tmp" "$OUT/SUMMARY.md"
}

# phase NAME LIMIT_SECONDS LOGFILE DETAIL_COMMAND -- COMMAND...: runs COMMAND under `timeout` (SIGINT first,
# so pytest still writes its junit, then SIGKILL), appending to LOGFILE; records status and a detail line.
phase() {
  local name="$1" limit="$2" log="$3" detail="$4"; shift 5
  limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { v = int(l * s); print (v < 1 ? 1 : v) }')  # timeout 0 = none
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*" >> "$log"
  timeout -s INT -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "== $name: $status" >> "$log"
  ROWS+=("| $name | $status | $(( $(date +%s) - t0 )) | $(eval "$detail" 2>/dev/null | tr '\n|' ' /' | cut -c1-300) |")
  summary
  echo "[gpu_check] $name: $status" >&2
  return 0
}

summary

# 1. environment and build ----------------------------------------------------------------------------
env_phase() {
  echo "mode: $MODE"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2
  "$PY" -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)' || true
  if [[ $DRY == 1 ]]; then
    echo "dry run: no build (the extension as installed)"
  else
    # the real build, for this GPU only; build log tail kept. torch guesses CUDA_HOME from nvcc's folder,
    # which is wrong where nvcc is installed outside the toolkit (e.g. /usr/local/bin)
    if [[ -z "${CUDA_HOME:-}" && -f /usr/local/cuda/include/cuda_runtime.h ]]; then export CUDA_HOME=/usr/local/cuda; fi
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MASKLM_FORCE_CUDA=1 \
      "$PY" -m pip install --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1
    local rc=$?
    tail -25 "$WORK/build.log"
    [[ $rc == 0 ]] || return $rc
  fi
  "$PY" -m masklm_kernels.info
}
export -f env_phase
phase "environment and build" 70 "$OUT/env.txt" \
  "grep -m1 -E 'NVIDIA H|name, driver' -A1 '$OUT/env.txt' | tail -1; grep -m1 '^python' '$OUT/env.txt'; grep -m1 'cuda kernels' '$OUT/env.txt'" \
  -- bash -c env_phase

# 2. the test suite on the GPU ----------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  TESTS=(tests/test_masking_backends.py -k "identical or bit" tests/test_attention_triton.py::test_forward_and_gradients_equal_reference)
else
  # the static nvcc/AOT check and this script's own CPU dry run are the CPU's job
  TESTS=(tests --deselect tests/test_static_compile.py --deselect tests/test_gpu_check.py)
fi
XDIST=()
if [[ $DRY == 0 ]] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
phase "tests" 110 "$OUT/tests.log" "tail -1 '$OUT/tests.log' | sed 's/^== tests: //'; grep -E '^[0-9]+ (passed|failed)|passed|failed' '$OUT/tests.log' | tail -1" \
  -- "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/tests.xml"
# pytest writes its junit on SIGINT only once it is set up: stopped earlier (still importing), it wrote none
if [[ ! -f "$OUT/tests.xml" ]]; then
  printf '%s\n' '<?xml version="1.0" encoding="utf-8"?>' \
    '<testsuites><testsuite name="pytest" errors="1" failures="0" skipped="0" tests="1">' \
    '<testcase classname="gpu_check" name="tests"><error message="pytest stopped before it wrote its report: see tests.log"/></testcase>' \
    '</testsuite></testsuites>' > "$OUT/tests.xml"
fi

# 3. compute-sanitizer over every kernel once ---------------------------------------------------------------
sanitize() {
  local size=(); [[ $DRY == 1 ]] && size=(--tiny)
  if [[ $DRY == 1 ]] || ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not run ($([[ $DRY == 1 ]] && echo 'dry run' || echo 'not found')): the driver alone"
    "$PY" scripts/call_every_kernel.py "${size[@]}"
    return $?
  fi
  local rc=0 tool
  for tool in memcheck racecheck; do
    echo "--- compute-sanitizer --tool $tool"
    # Triton's JIT and torch's caching allocator: report leaks off, errors on the first kernel that has one
    compute-sanitizer --tool "$tool" --error-exitcode 9 --leak-check no --print-limit 20 \
      "$PY" scripts/call_every_kernel.py "${size[@]}" || rc=$?
  done
  return $rc
}
export -f sanitize
phase "compute-sanitizer" 70 "$OUT/sanitizer.log" "grep -E 'ERROR SUMMARY|kernels called' '$OUT/sanitizer.log' | tr '\n' ' '" \
  -- bash -c sanitize

# 4. benchmark suites --------------------------------------------------------------------------------------
bench() {
  local args=(--out "$WORK/results" -q)
  if [[ $DRY == 1 ]]; then
    args+=(--size smoke --device cpu --repeats 2 --warmup 0 --budget 0.2 --no-memory)
  else
    args+=(--quick --device cuda --budget 0.3 --warmup 1)
  fi
  # fastest suites first: each writes its JSONL when it ends, so a timeout loses only the last ones
  "$PY" -m benchmarks masking denoising losses e2e attention attention_positions "${args[@]}"
}
export -f bench
phase "benchmarks" 160 "$OUT/bench.log" \
  "echo \$(grep -c -- '^-> .*jsonl' '$OUT/bench.log') suites written, \$(grep -c 'SKIPPED' '$OUT/bench.log') cases skipped" \
  -- bash -c bench

# 5. tile sweep --------------------------------------------------------------------------------------------
tiles() {
  local kind smoke=()
  kind=$("$PY" -c "from benchmarks.harness import device_kind; print(device_kind('$([[ $DRY == 1 ]] && echo cpu || echo cuda)'))")
  [[ $DRY == 1 ]] && smoke=(--smoke)
  "$PY" -m benchmarks.tile_sweep "${smoke[@]}" --width 2 --out "$WORK/results/tiles-$kind.jsonl"
}
export -f tiles
phase "tile sweep" 70 "$OUT/tiles.log" "grep -c 'x$' '$OUT/tiles.log' | sed 's/$/ groups timed/'" \
  -- bash -c tiles

# results.tar.gz: everything the benchmarks and the sweep wrote, as benchmarks/results/ lays it out
tar -C "$WORK/results" -czf "$OUT/results.tar.gz.tmp" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
ROWS+=("| total | $(grep -qE 'FAILED|TIMEOUT' <(printf '%s\n' "${ROWS[@]}") && echo 'some phases failed' || echo ok) | $(( $(date +%s) - START )) | $(ls "$OUT" | tr '\n' ' ') |")
summary
cat "$OUT/SUMMARY.md"
grep -qE 'FAILED|TIMEOUT' "$OUT/SUMMARY.md" && exit 1
exit 0
