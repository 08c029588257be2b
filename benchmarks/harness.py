"""Benchmark harness shared by every suite: timing, statistics, result records, table, JSONL.

A suite is a list of `Case`s (one op, one contender -- one of ours or a peer --, one input configuration). `run_suite`
times each case, measures its peak memory, computes speedups over the peers the case names, appends
one JSON line per case to `<out>/<suite>-<device kind>.jsonl` and returns the records; `format_table`
renders them. Why it is built this way:

Timing. Warm-up calls (untimed), then up to `repeats` timed calls, one call per sample. A case may
give a `setup()` that runs untimed before every call and returns the call's arguments: peers that
work in place (HF `torch_mask_tokens` overwrites its input) get a fresh copy without being charged
for it. CUDA cases are timed with CUDA events around the call after a `synchronize()`; CPU cases with
`time.perf_counter`. The timing method follows the device of the *case*, not of the run: in a CUDA
run the HF peers still run on the CPU, as they would in a data loader. Reported: the median (the
figure of merit), the min and the IQR (Q3 - Q1, linear interpolation as NumPy's default) so that
noise is visible. A per-case time budget stops slow cases early (after at least `MIN_REPEATS`
samples); the number of samples actually taken is recorded.

Peak memory, on a separate untimed call so that it never perturbs the timings:
* CUDA: `max_memory_allocated() - memory_allocated()` after `reset_peak_memory_stats()`.
* CPU: RSS deltas are unreliable (allocator caching, page reuse, other threads), so we report the
  peak of the running sum of bytes allocated minus freed by torch's CPU allocator during one call,
  from torch.profiler's memory events (`profile_memory=True`). It counts every torch tensor the call
  creates (its outputs included; inputs made by `setup` excluded) and nothing that NumPy or Python
  allocates, so it is a lower bound for code working in NumPy/Python (HF whole-word masking, the HF
  collator's padding, the NumPy reference). `peak_mem_method` names the method in every record.

Compute. A case may state `flops`, the useful work of one call (e.g. attention counts visible pairs
only); TFLOP/s is that over the median time. `extra` carries suite-specific figures (tiles computed /
needed, block-mask creation time) into the record unchanged.

Bandwidth. A case may state `bytes_moved`, the compulsory traffic of the op (bytes read + written
once). GB/s is that over the median time, and is also given as a percentage of the device's measured
copy bandwidth (`dst.copy_(src)` on a large buffer, read + write bytes counted), which is what a
memory-bound op can at best reach.

Roofline. With `flops` and/or `bytes_moved`, `pct_of_roofline` = the time the measured roofline allows
(max(flops / measured dense-matmul rate, bytes / measured copy bandwidth)) over the median time, in %.
Both ceilings are measured on the run's device (bf16 matmul on CUDA, fp32 on CPU), never taken from a
datasheet. `mem_ratio_vs_peer` is the own peak memory over each peer's (lower is better).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

MIN_REPEATS = 3
REPO_ROOT = Path(__file__).resolve().parent.parent
# The committed results (what README and the reports quote); a run writes there only when asked
# (`python -m benchmarks --update-results`), else under LOCAL_OUT/<size>/ (git-ignored).
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
LOCAL_OUT = DEFAULT_OUT / "local"

# Every record has exactly these keys (None where not applicable); tests check the schema.
RECORD_KEYS = (
    "suite", "op", "contender", "case", "status", "reason", "notes",
    "time_ms", "time_ms_min", "time_ms_iqr", "repeats", "warmup",
    "tokens", "tokens_per_s", "bytes_moved", "gb_per_s", "copy_gb_per_s", "pct_of_copy_bw", "flops", "tflops",
    "peak_tflops", "pct_of_roofline", "extra",
    "peak_mem_bytes", "peak_mem_method", "peers", "speedup_over_peer", "mem_ratio_vs_peer",
    "device", "device_type", "device_kind", "cpu", "gpu",
    "torch", "triton", "python", "git_sha", "date", "threads", "load_avg_1m",
)


@dataclasses.dataclass
class Case:
    """One thing to time. `fn(*setup())` is the timed call (`fn()` without setup).

    `peers` maps a label to the (op, contender, case) of the record this one is compared with:
    `speedup_over_peer[label] = peer median / this median`. A case with `skip` set is not run but
    still recorded, with the reason, so nothing disappears silently from the results.
    """

    op: str
    contender: str  # what is timed: one of our backends, or a peer (sdpa_dense, hf_eager, ...)
    case: dict[str, Any]
    fn: Callable[..., Any] | None = None
    setup: Callable[[], tuple] | None = None
    device: str = "cpu"
    tokens: int | None = None
    bytes_moved: int | None = None
    peers: dict[str, tuple[str, str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    skip: str | None = None
    notes: str | None = None
    flops: float | None = None  # useful floating-point work of one call (TFLOP/s = flops / median)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # suite-specific figures, recorded as is

    @property
    def label(self) -> str:
        return f"{self.op}[{self.contender}]-{case_str(self.case, sep='-')}"

    def call_args(self) -> tuple:
        return self.setup() if self.setup is not None else ()

    def synced_fn(self) -> Callable[..., Any]:
        """`fn` that waits for the device, for timers that only read the host clock (pytest-benchmark)."""
        if not self.device.startswith("cuda"):
            return self.fn

        def call(*args):
            out = self.fn(*args)
            torch.cuda.synchronize()
            return out

        return call


@dataclasses.dataclass
class RunOptions:
    repeats: int = 20
    warmup: int = 2
    budget_s: float = 3.0  # per case: stop sampling after this long (keeping >= MIN_REPEATS samples)
    measure_memory: bool = True
    out_dir: Path | None = LOCAL_OUT / "full"  # None: do not write JSONL


# ----------------------------------------------------------------------------------------- statistics
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (NumPy's default method) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    return {
        "time_ms": quantile(times_ms, 0.5),
        "time_ms_min": min(times_ms),
        "time_ms_iqr": quantile(times_ms, 0.75) - quantile(times_ms, 0.25),
    }


# -------------------------------------------------------------------------------------------- timing
def time_case(case: Case, *, repeats: int, warmup: int, budget_s: float) -> list[float]:
    """Milliseconds of each timed call of `case` (see the module docstring)."""
    cuda = case.device.startswith("cuda")
    started = time.perf_counter()
    for _ in range(max(1, warmup)):
        out = case.fn(*case.call_args())
        if cuda:
            torch.cuda.synchronize()
        del out
        if time.perf_counter() - started > budget_s / 2:  # a slow case: one warm-up call is enough
            break
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max(repeats, 1):
        args = case.call_args()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            out = case.fn(*args)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = case.fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        del out, args  # freed outside the timed region
        if len(times) >= MIN_REPEATS and time.perf_counter() - started > budget_s:
            break
    return times


def copy_bandwidth_gbps(device: str, nbytes: int | None = None) -> float:
    """Measured `dst.copy_(src)` bandwidth of `device` in GB/s (read + write bytes counted)."""
    n = nbytes or (1 << 28 if device.startswith("cuda") else 1 << 26)
    src = torch.ones(n, dtype=torch.uint8, device=device)  # written once so that pages are mapped
    dst = torch.zeros_like(src)
    probe = Case(op="copy", contender="torch", case={}, fn=lambda: dst.copy_(src), device=device)
    times = time_case(probe, repeats=10, warmup=2, budget_s=2.0)
    return 2 * n / (quantile(times, 0.5) / 1e3) / 1e9


def matmul_tflops(device: str) -> float:
    """Measured dense matmul rate of `device` in TFLOP/s (bf16 4096^3 on CUDA, fp32 1024^3 on CPU; median):
    the compute ceiling of the roofline."""
    cuda = device.startswith("cuda")
    n, dtype = (4096, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    probe = Case(op="matmul", contender="torch", case={}, fn=lambda: a @ b, device=device)
    return 2 * n**3 / (quantile(time_case(probe, repeats=10, warmup=3, budget_s=2.0), 0.5) / 1e3) / 1e12


def missing_peer(module: str, pip_name: str, device: str, cuda_only: bool = True) -> str | None:
    """Why an optional peer cannot run here (recorded as the skip reason), or None when it can."""
    if cuda_only and device != "cuda":
        return f"{module} runs on CUDA only"
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install {pip_name})"
    return None


# -------------------------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence the profiler's native (fd 2) start/stop chatter; Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(case: Case) -> tuple[int | None, str]:
    """(peak bytes allocated by one call of `case`, method name); see the module docstring."""
    args = case.call_args()
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = case.fn(*args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak), "cuda_max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = case.fn(*args)
    del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return int(peak), "torch_profiler_cpu_alloc_peak (torch tensors only; excludes NumPy/Python)"


# ------------------------------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_kind(device: str) -> str:
    """File-name tag of the run's device: `cpu`, or the GPU name as a slug (`nvidia-h100-80gb-hbm3`)."""
    return slug(torch.cuda.get_device_name(device)) if device.startswith("cuda") else "cpu"


def _git_sha() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Provenance shared by every record of a run on `device` ("cpu" or "cuda[:i]")."""
    return {
        "device_kind": device_kind(device),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        # other work on the machine skews CPU timings (2-core hosts above all): keep it on record
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------------------------- runs
def case_key(op: str, contender: str, case: dict[str, Any]) -> str:
    return json.dumps([op, contender, case], sort_keys=True)


def make_record(suite: str, case: Case, env: dict[str, Any], *, status: str = "ok",
                reason: str | None = None, times_ms: Sequence[float] | None = None,
                warmup: int | None = None, peak: tuple[int | None, str | None] = (None, None),
                copy_gbps: float | None = None, peak_tflops: float | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    rec.update(env)
    rec.update(suite=suite, op=case.op, contender=case.contender, case=dict(case.case), status=status,
               reason=reason, notes=case.notes, tokens=case.tokens, bytes_moved=case.bytes_moved, flops=case.flops,
               extra=dict(case.extra),
               peers={k: {"op": o, "contender": b, "case": c} for k, (o, b, c) in case.peers.items()},
               speedup_over_peer={}, mem_ratio_vs_peer={}, device_type=case.device.split(":")[0],
               device=env["gpu"] if case.device.startswith("cuda") else env["cpu"])
    if times_ms:
        rec.update(summarize(times_ms), repeats=len(times_ms), warmup=warmup)
        sec = rec["time_ms"] / 1e3
        if case.tokens:
            rec["tokens_per_s"] = case.tokens / sec
        if case.flops:
            rec["tflops"] = case.flops / sec / 1e12
        if case.bytes_moved:
            rec["gb_per_s"] = case.bytes_moved / sec / 1e9
            if copy_gbps:
                rec["copy_gb_per_s"] = copy_gbps
                rec["pct_of_copy_bw"] = 100.0 * rec["gb_per_s"] / copy_gbps
        rec["peak_tflops"] = peak_tflops if case.flops else None
        floor_s = max(case.flops / (peak_tflops * 1e12) if case.flops and peak_tflops else 0.0,
                      case.bytes_moved / (copy_gbps * 1e9) if case.bytes_moved and copy_gbps else 0.0)
        rec["pct_of_roofline"] = 100.0 * floor_s / sec if floor_s else None
        rec["peak_mem_bytes"], rec["peak_mem_method"] = peak
    return rec


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Fill `speedup_over_peer` (peer median / own median) and `mem_ratio_vs_peer` (own peak / peer peak)
    where both were measured."""
    by_key = {case_key(r["op"], r["contender"], r["case"]): r for r in records}
    for r in records:
        for label, p in (r["peers"] or {}).items():
            peer = by_key.get(case_key(p["op"], p["contender"], p["case"]))
            if peer is None:
                continue
            if peer["time_ms"] and r["time_ms"]:
                r["speedup_over_peer"][label] = peer["time_ms"] / r["time_ms"]
            if peer["peak_mem_bytes"] and r["peak_mem_bytes"]:  # 0: nothing torch saw (NumPy code), no ratio
                r["mem_ratio_vs_peer"][label] = r["peak_mem_bytes"] / peer["peak_mem_bytes"]


def run_case(suite: str, case: Case, options: RunOptions, env: dict[str, Any],
             bandwidth: dict[str, float], compute: dict[str, float] | None = None) -> dict[str, Any]:
    """Time one case into a record; a failure becomes an `error` record instead of ending the run.
    `bandwidth` / `compute` cache the device's measured copy bandwidth / matmul rate across cases."""
    compute = {} if compute is None else compute
    if case.skip:
        return make_record(suite, case, env, status="skipped", reason=case.skip)
    try:
        times = time_case(case, repeats=options.repeats, warmup=options.warmup, budget_s=options.budget_s)
        peak = peak_memory(case) if options.measure_memory else (None, None)
        if case.bytes_moved and case.device not in bandwidth:
            bandwidth[case.device] = copy_bandwidth_gbps(case.device)
        if case.flops and case.device not in compute:
            compute[case.device] = matmul_tflops(case.device)
    except Exception as exc:  # noqa: BLE001 - recorded, with its type and message
        return make_record(suite, case, env, status="error", reason=f"{type(exc).__name__}: {exc}")
    return make_record(suite, case, env, times_ms=times, warmup=options.warmup, peak=peak,
                       copy_gbps=bandwidth.get(case.device), peak_tflops=compute.get(case.device))


def run_suite(suite: str, cases: Iterable[Case], options: RunOptions, *, device: str = "cpu",
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run `cases`, add speedups, append them to the suite's JSONL file (if `out_dir`), return them."""
    env = environment(device)
    bandwidth: dict[str, float] = {}
    compute: dict[str, float] = {}
    records = []
    cases = list(cases)
    for i, case in enumerate(cases, 1):
        rec = run_case(suite, case, options, env, bandwidth, compute)
        records.append(rec)
        if progress:
            done = f"{rec['time_ms']:.3f} ms" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}"
            progress(f"[{suite} {i}/{len(cases)}] {case.op} {case.contender} {case_str(case.case)}: {done}")
    add_speedups(records)
    if options.out_dir is not None:
        write_jsonl(records, results_path(options.out_dir, suite, env["device_kind"]))
    return records


def results_path(out_dir: Path | str, suite: str, kind: str) -> Path:
    return Path(out_dir) / f"{suite}-{kind}.jsonl"


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [_current(json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _current(record: dict[str, Any]) -> dict[str, Any]:
    """A record in today's schema: files written before the field naming what was timed was renamed from
    "backend" (a word the library keeps for its dispatch choice) to "contender" still read."""
    if "backend" in record and "contender" not in record:
        record = {("contender" if k == "backend" else k): v for k, v in record.items()}
        if record.get("peers"):
            record["peers"] = {label: _current(peer) for label, peer in record["peers"].items()}
    return record


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest (last written) record of each (op, contender, case), in first-seen order: a results file
    accumulates runs, and what it says now is its last run of each case."""
    newest: dict[str, dict[str, Any]] = {}
    for r in records:
        newest[case_key(r["op"], r["contender"], r["case"])] = r
    return list(newest.values())


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> None:
    """Appends the records: the file is rewritten whole, atomically (a run killed mid-write leaves the
    previous results intact, never a torn last line)."""
    from masklm_kernels._io import atomic_open

    old = path.read_text(encoding="utf-8") if path.exists() else ""
    with atomic_open(path) as f:
        f.write(old if not old or old.endswith("\n") else old + "\n")
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")


# -------------------------------------------------------------------------------------------- table
def case_str(case: dict[str, Any], sep: str = " ") -> str:
    return sep.join(f"{k}={v}" for k, v in case.items())


def fmt_num(x: float | None, fmt: str, suffix: str = "") -> str:
    """`x` formatted (and suffixed), or "-" when it was not measured."""
    return "-" if x is None else format(x, fmt) + suffix


def si(x: float | None) -> str:
    """3 significant digits with a k / M / G suffix: token rates span 1e3 (a CPU training step) to 1e10."""
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _row(r: dict[str, Any]) -> list[str]:
    head = [r["op"], r["contender"], case_str(r["case"])]
    if r["status"] != "ok":
        return head + [f"{r['status'].upper()}: {r['reason']}"]
    speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup_over_peer"].items())
    mem = r["peak_mem_bytes"]
    return head + [
        fmt_num(r["time_ms"], ".3f"), fmt_num(r["time_ms_min"], ".3f"), fmt_num(r["time_ms_iqr"], ".3f"),
        str(r["repeats"]),
        si(r["tokens_per_s"]),
        fmt_num(r["gb_per_s"], ".2f"), fmt_num(r["pct_of_copy_bw"], ".1f"), fmt_num(r["tflops"], ".3f"),
        fmt_num(None if mem is None else mem / 2**20, ".2f"),
        speed or "-",
    ]


TABLE_HEADER = ["op", "contender", "case", "median ms", "min ms", "IQR ms", "n", "tok/s", "GB/s",
                "%copy", "TFLOP/s", "peak MiB", "speedup over peer"]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Aligned text table; skipped / failed cases keep their row with the reason."""
    rows = [_row(r) for r in records]
    full = [r for r in rows if len(r) == len(TABLE_HEADER)]
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(TABLE_HEADER)]
    for r in rows:  # short (skipped) rows only widen the leading columns
        for i in range(min(3, len(r))):
            widths[i] = max(widths[i], len(r[i]))

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i < len(widths) - 1 else c
                         for i, c in enumerate(cells)).rstrip()

    lines = [fmt(TABLE_HEADER), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)
