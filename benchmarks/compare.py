"""What changed between two result files: `python -m benchmarks.compare OLD.jsonl NEW.jsonl`.

Cases are matched by (op, contender, case), newest record of each in each file. Listed in this order:
broken (ok before, not ok now), regressions (slower by more than `--threshold` *and* by more than the
noise, the mean of the two IQRs), memory regressions (peak up by more than the threshold), improvements,
fixed (ok now, not before), then counts of unchanged, added and removed cases. A difference inside the
noise is never called a change. When the two files come from different devices or versions, a warning says
so first: such a comparison measures the machine, not the change. `--fail-on-regression` exits 1 when
anything is broken or regressed (for CI gates).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from masklm_kernels._cli import description

from .harness import case_key, case_str, latest, read_jsonl

PROVENANCE = ("device_kind", "cpu", "gpu", "torch", "triton", "threads")


@dataclasses.dataclass
class Change:
    kind: str  # broken | regression | memory | improvement | fixed | same
    op: str
    contender: str
    case: dict
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    ratio: float | None = None  # new / old (time, or peak memory for kind "memory")

    def describe(self) -> str:
        name = f"{self.op} {self.contender} {case_str(self.case)}"
        if self.kind in ("broken", "fixed"):
            return (f"{name}: {self.old['status']} -> {self.new['status']}"
                    + (f" ({self.new['reason']})" if self.new.get("reason") else ""))
        if self.kind == "memory":
            return (f"{name}: peak {self.old['peak_mem_bytes'] / 2**20:.2f} -> "
                    f"{self.new['peak_mem_bytes'] / 2**20:.2f} MiB ({self.ratio:.2f}x)")
        return (f"{name}: {self.old['time_ms']:.3f} -> {self.new['time_ms']:.3f} ms ({self.ratio:.2f}x time, "
                f"IQR {self.old.get('time_ms_iqr') or 0:.3f} / {self.new.get('time_ms_iqr') or 0:.3f})")


ORDER = ("broken", "regression", "memory", "improvement", "fixed")


def classify(old: dict[str, Any], new: dict[str, Any], threshold: float) -> list[Change]:
    """The changes of one case (a time change and a memory change can both hold)."""
    mk = lambda kind, ratio=None: Change(kind, new["op"], new["contender"], new["case"], old, new, ratio)  # noqa: E731
    ok_old, ok_new = old["status"] == "ok", new["status"] == "ok"
    if ok_old != ok_new:
        return [mk("broken" if ok_old else "fixed")]
    if not ok_new or not old["time_ms"] or not new["time_ms"]:
        return [mk("same")]
    out = []
    ratio = new["time_ms"] / old["time_ms"]
    noise = ((old.get("time_ms_iqr") or 0.0) + (new.get("time_ms_iqr") or 0.0)) / 2
    beyond_noise = abs(new["time_ms"] - old["time_ms"]) > noise
    if ratio > 1 + threshold and beyond_noise:
        out.append(mk("regression", ratio))
    elif ratio < 1 / (1 + threshold) and beyond_noise:
        out.append(mk("improvement", ratio))
    m_old, m_new = old.get("peak_mem_bytes"), new.get("peak_mem_bytes")
    if m_old and m_new and m_new / m_old > 1 + threshold:
        out.append(mk("memory", m_new / m_old))
    return out or [mk("same", ratio)]


def compare(old_records: list[dict], new_records: list[dict], threshold: float = 0.05) -> dict[str, Any]:
    """dict(changes: the non-"same" Changes, regressions first and worst first within a kind; same: count;
    added / removed: keys present in only one file; provenance: differing fields, old -> new)."""
    old = {case_key(r["op"], r["contender"], r["case"]): r for r in latest(old_records)}
    new = {case_key(r["op"], r["contender"], r["case"]): r for r in latest(new_records)}
    changes = [c for k in old.keys() & new.keys() for c in classify(old[k], new[k], threshold)]
    rank = {kind: i for i, kind in enumerate(ORDER)}
    shown = sorted((c for c in changes if c.kind != "same"),
                   key=lambda c: (rank[c.kind], -(c.ratio or 0) if c.kind != "improvement" else (c.ratio or 0)))
    provenance = {}
    if old_records and new_records:
        a, b = old_records[-1], new_records[-1]
        provenance = {f: (a.get(f), b.get(f)) for f in PROVENANCE if a.get(f) != b.get(f)}
    return dict(changes=shown, same=sum(c.kind == "same" for c in changes),
                added=sorted(new.keys() - old.keys()), removed=sorted(old.keys() - new.keys()),
                provenance=provenance)


def format_comparison(result: dict[str, Any], old_name: str, new_name: str) -> str:
    lines = [f"{old_name} -> {new_name}"]
    if result["provenance"]:
        diff = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in result["provenance"].items())
        lines.append(f"WARNING: different machines or versions ({diff}); differences measure those too")
    for kind in ORDER:
        items = [c for c in result["changes"] if c.kind == kind]
        if items:
            lines.append(f"\n{kind.upper()} ({len(items)})")
            lines += [f"  {c.describe()}" for c in items]
    lines.append(f"\nunchanged (within threshold or noise): {result['same']}; added: {len(result['added'])}; "
                 f"removed: {len(result['removed'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=description(__doc__))
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--threshold", type=float, default=0.05, help="relative change below which nothing changed")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when anything broke or regressed")
    args = p.parse_args(argv)
    for path in (args.old, args.new):
        if not path.exists():
            p.error(f"{path} does not exist")
    if args.threshold < 0:
        p.error("--threshold must be >= 0")
    result = compare(read_jsonl(args.old), read_jsonl(args.new), args.threshold)
    print(format_comparison(result, str(args.old), str(args.new)))
    bad = any(c.kind in ("broken", "regression", "memory") for c in result["changes"])
    return 1 if bad and args.fail_on_regression else 0


if __name__ == "__main__":
    sys.exit(main())
