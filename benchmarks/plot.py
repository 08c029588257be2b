"""Plots of benchmark results: `python -m benchmarks.plot [suite] [--kind cpu|<gpu slug>] [--out DIR]`.

Reads `benchmarks/results/<suite>-<kind>.jsonl`, keeps the newest record of every (op, contender, case), and
writes one PNG per value of the suite's grouping key, one line per contender (and head dim), only records with
status "ok". attention: one PNG per mask kind, one panel per mode, median time against sequence length.
losses: one PNG per labelled fraction (fused_linear_cross_entropy), median time and peak memory against the
vocabulary size. e2e: training-step tokens/s and peak memory per contender (bars).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from masklm_kernels._cli import description

from .harness import DEFAULT_OUT, case_str, latest, read_jsonl

# suite -> (op plotted (None: all), the case field that makes one figure, the field on the x axis, the case
# field that makes panels (None: one panel per metric), metrics, log-2 x axis)
LAYOUT = {
    "attention": (None, "mask", "S", "mode", ("time_ms",), True),
    "losses": ("fused_linear_cross_entropy", "labelled", "V", None, ("time_ms", "peak_mem_bytes"), False),
}
BARS = {"e2e": ("e2e_train_step", ("tokens_per_s", "peak_mem_bytes"))}  # suite -> (op, metrics), one bar per contender
_AXIS = {"time_ms": ("median time (ms)", 1.0), "peak_mem_bytes": ("peak memory (MiB)", 2.0 ** -20),
         "tokens_per_s": ("tokens/s (median step)", 1.0)}
SUITES = sorted({*LAYOUT, *BARS})


def latest_records(path: Path) -> list[dict]:
    """The newest ok record of each (op, contender, case) in a JSONL file."""
    return [r for r in latest(read_jsonl(path)) if r["status"] == "ok" and r["time_ms"]]


def _label(r: dict) -> str:
    return r["contender"] + (f" D={r['case']['D']}" if "D" in r["case"] else "")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _title(suite: str, what: str, r0: dict) -> str:
    device = r0["gpu"] if r0["device_type"] == "cuda" else r0["cpu"]
    return f"{suite}: {what} -- {device}, torch {r0['torch']}, {r0['threads']} threads, {r0['date'][:10]}"


def plot_bars(suite: str, records: list[dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    op, metrics = BARS[suite]
    written = []
    by_case: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["op"] == op:
            by_case[case_str({k: v for k, v in r["case"].items() if k != "mode"})].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (case, recs) in enumerate(sorted(by_case.items())):
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            names = [r["contender"] for r in recs if r.get(metric) is not None]
            values = [r[metric] * _AXIS[metric][1] for r in recs if r.get(metric) is not None]
            ax.bar(names, values, color=[f"C{j % 10}" for j in range(len(names))])
            for x, v in enumerate(values):
                ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
            ax.set_ylabel(_AXIS[metric][0])
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        name = f"{suite}-{recs[0]['device_kind']}{'' if i == 0 else f'-{i}'}.png"
        written.append(_save(plt, fig, _title(suite, case, recs[0]), out_dir / name))
    return written


def _save(plt, fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    from masklm_kernels._io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=90, format="png")
    plt.close(fig)
    return path


def plot_suite(suite: str, records: list[dict], out_dir: Path) -> list[Path]:
    """PNGs of one suite's ok records (see the module docstring); the paths written."""
    if suite in BARS:
        return plot_bars(suite, records, out_dir)
    plt = _pyplot()
    op, fig_key, x_key, panel_key, metrics, xlog = LAYOUT[suite]
    by_fig: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if op is None or r["op"] == op:
            by_fig[str(r["case"].get(fig_key))].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fig_value, recs in sorted(by_fig.items()):
        if panel_key is None:
            panels = [(None, m) for m in metrics]
        else:
            panels = [(v, metrics[0]) for v in sorted({r["case"].get(panel_key) for r in recs})]
        labels = sorted({_label(r) for r in recs})
        color = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per contender across panels
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (panel, metric) in zip(axes[0], panels):
            lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for r in recs:
                if (panel_key is None or r["case"].get(panel_key) == panel) and r.get(metric) is not None:
                    lines[_label(r)].append((r["case"][x_key], r[metric] * _AXIS[metric][1]))
            for label, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color[label],
                        linewidth=2.5 if label.startswith("ours") else 1.2, label=label)
            if xlog:
                ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_key)
            ax.set_ylabel(_AXIS[metric][0])
            ax.set_title(f"{panel_key}={panel}" if panel_key else _AXIS[metric][0])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        r0 = recs[0]
        written.append(_save(plt, fig, _title(suite, f"{fig_key}={fig_value}", r0),
                             out_dir / f"{suite}-{r0['device_kind']}-{fig_value}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=description(__doc__))
    p.add_argument("suite", nargs="?", default="attention", choices=SUITES)
    p.add_argument("--kind", default="cpu", help="device kind of the results file (cpu, or the GPU's slug)")
    p.add_argument("--results", type=Path, default=DEFAULT_OUT)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "plots")
    args = p.parse_args(argv)
    path = args.results / f"{args.suite}-{args.kind}.jsonl"
    if not path.exists():
        print(f"no results at {path}: run `python -m benchmarks {args.suite}` first", file=sys.stderr)
        return 1
    for out in plot_suite(args.suite, latest_records(path), args.out):
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
