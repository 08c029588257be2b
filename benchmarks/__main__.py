"""Runner: `python -m benchmarks [suite ...] [--quick] [--device cpu|cuda|auto] [--out DIR] ...`.

With no suite named, every registered suite runs (`--quick`: the main shapes, fewer repeats). Progress goes
to stderr, one line per case. Each suite prints its table and appends its records to
`<out>/<suite>-<device kind>.jsonl`; at the end one summary table (speedup and memory ratio over each peer,
% of the measured roofline) is printed, and `<out>/REPORT-<device kind>.md` and the plots under
`<out>/plots` are rewritten from the results files. `<out>` is `benchmarks/results/local/<size>/`
(git-ignored) unless `--out` names another folder or `--update-results` asks for the committed
`benchmarks/results/` (full-size runs only, so that a quick run never mixes into the committed report).
A load average above the machine's cores is reported: other work then competes for them and the times are
not comparable. `--threads` sets torch's intra-op threads for the run
only (the CPU figure of interest is 2 threads, a data-loader worker's share); by default the process's
setting is left as it is and recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from masklm_kernels._cli import description

from . import harness, report
from .suites import SIZES, load_suite, suite_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=description(__doc__))
    p.add_argument("suites", nargs="*", metavar="suite",
                   help=f"suites to run (default: all of {', '.join(suite_names())})")
    p.add_argument("--quick", action="store_true", help="the main shapes only, fewer repeats (--size quick)")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="full (default), quick, or smoke: tiny shapes that only prove the suites run")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the JSONL results (default: benchmarks/results/local/<size>/, not committed)")
    p.add_argument("--update-results", action="store_true",
                   help="write to the committed benchmarks/results/ (full size only)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 20, quick 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before timing")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of sampling per case before stopping early (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement call")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-case progress lines")
    p.add_argument("--no-report", action="store_true", help="do not rewrite the Markdown report and plots")
    args = p.parse_args(argv)
    unknown = [s for s in args.suites if s not in suite_names()]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}; registered: {', '.join(suite_names())}")
    if args.quick and args.size not in (None, "quick"):
        p.error(f"--quick contradicts --size {args.size}")
    args.size = args.size or ("quick" if args.quick else "full")
    args.quick = args.size != "full"
    if args.update_results and args.out is not None:
        p.error("--update-results writes to benchmarks/results/: it takes no --out")
    if args.update_results and args.size != "full":
        p.error(f"--update-results takes full-size runs only (this is --size {args.size}): the committed report "
                "must not mix sizes")
    if args.out is None:
        args.out = harness.DEFAULT_OUT if args.update_results else harness.LOCAL_OUT / args.size
    return args


def load_warning() -> str | None:
    """A warning when the 1-minute load average is above the cores (other work competes for them)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"warning: load average {load:.1f} is above the machine's {cores} cores: other work competes, so "
            "these times are not comparable with an idle run's")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return requested


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = harness.RunOptions(
        repeats=args.repeats or (10 if args.quick else 20),
        warmup=args.warmup,
        budget_s=args.budget if args.budget is not None else (1.0 if args.quick else 3.0),
        measure_memory=not args.no_memory,
        out_dir=None if args.no_write else args.out,
    )
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    everything = []
    warned = load_warning()
    if warned:
        print(warned, file=sys.stderr, flush=True)
    for name in args.suites or suite_names():
        if progress:
            progress(f"[{name}] building cases ({args.size}, {device})")
        cases = load_suite(name).cases(device, args.size)
        records = harness.run_suite(name, cases, options, device=device, progress=progress)
        everything += records
        env = {k: records[0][k] for k in ("device_kind", "cpu", "gpu", "torch", "triton", "threads")} \
            if records else {}
        print(f"\n== suite {name} on {device} ({args.size}) {env}")
        print(harness.format_table(records))
        if options.out_dir is not None and records:
            print(f"-> {harness.results_path(options.out_dir, name, records[0]['device_kind'])}")
        later = load_warning()
        if later and later != warned:
            print(later, file=sys.stderr, flush=True)
    rows = report.summary_rows(everything)
    if rows:
        print("\n== summary: ours against each peer (speedup > 1 and memory ratio < 1: ours wins)")
        print(report.text_table(report.SUMMARY_HEADER, rows))
    if options.out_dir is not None and everything and not args.no_report:
        print(f"-> {report.write_report(everything[0]['device_kind'], options.out_dir)}")
    if options.out_dir is not None and everything:
        where = "the committed results" if args.update_results else "a local folder (not committed)"
        print(f"results written to {options.out_dir} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
