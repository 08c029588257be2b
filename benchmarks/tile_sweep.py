"""Timed sweep of the attention tile table on a GPU: for each kernel (forward, dK/dV, dQ) and the main
shapes, the table's configuration and its neighbours in `triton_host.tile_candidates` order, each timed
through the library's own launchers with `force_tiles`. The JSONL it writes is what the table is retuned
from: per (kernel, dtype, head dim, mask) the fastest candidate that is also spill-free for sm_80 and sm_90
under every supported Triton (`python -m benchmarks.tile_search --entry ...` checks one).

    python -m benchmarks.tile_sweep --out tiles-h200.jsonl            # GPU: bf16, B=4 H=16 S=4096, D 64/128
    python -m benchmarks.tile_sweep --smoke --out /tmp/tiles.jsonl    # CPU, Triton's interpreter: tiny shapes

Times are medians of `triton.testing.do_bench` on a GPU, of single calls under the interpreter (which
says nothing about speed: the smoke run only proves the sweep runs). The dK/dV and dQ candidates are timed
as the whole backward (preprocess, dK/dV, dQ) with only that kernel's tile forced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from masklm_kernels._cli import description

KERNELS = ("fwd", "dkdv", "dq")


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    H: int
    S: int
    D: int
    dtype: torch.dtype
    mask: str  # "none" or "causal_pad": causal with 25% padding (kv and q lengths)


def shapes(smoke: bool) -> list[Shape]:
    if smoke:
        return [Shape(1, 2, 48, 16, torch.float32, "causal_pad")]
    # BERT-base's head dim first: on a GPU every candidate is a fresh JIT compilation (seconds each)
    return [Shape(4, 16, 4096, D, torch.bfloat16, m) for D in (64, 128) for m in ("causal_pad", "none")]


def neighbours(kernel: str, current, width: int):
    """The current configuration and up to `width` candidates on each side of it, in preference order."""
    from masklm_kernels.attention.triton_host import tile_candidates

    cands = tile_candidates(kernel)
    i = cands.index(current) if current in cands else 0
    out = cands[max(0, i - width):i + width + 1]
    return out if current in out else [current, *out]


def _inputs(shape: Shape, device: str):
    g = torch.Generator().manual_seed(shape.S + shape.D)
    q, k, v, do = (torch.randn(shape.B, shape.H, shape.S, shape.D, generator=g).to(device, shape.dtype)
                   for _ in range(4))
    from masklm_kernels.attention.inputs import Mask

    mask = Mask()
    if shape.mask == "causal_pad":
        lens = torch.full((shape.B,), shape.S - shape.S // 4, dtype=torch.int64, device=device)
        mask = Mask(causal=True, kv_lengths=lens, q_lengths=lens)
    return q, k, v, do, mask


def _timer(device: str, quick: bool):
    if device == "cuda" and not quick:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def once(fn):
        fn()
        t = []
        for _ in range(1 if quick else 3):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t)
    return once


def sweep(smoke: bool = False, width: int = 4, progress=None, sink=None) -> list[dict]:
    """Every (shape, kernel, candidate) timed; each record also goes to `sink` as soon as it exists."""
    from masklm_kernels.attention import triton_bwd, triton_fwd, triton_host

    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer = _timer(device, smoke)
    scale = None
    records = []
    for shape in shapes(smoke):
        q, k, v, do, mask = _inputs(shape, device)
        scale = shape.D ** -0.5
        out, lse = triton_fwd.forward(q, k, v, mask, scale)
        calls = {"fwd": lambda: triton_fwd.forward(q, k, v, mask, scale),
                 "dkdv": lambda: triton_bwd.backward(do, q, k, v, out, lse, mask, scale),
                 "dq": lambda: triton_bwd.backward(do, q, k, v, out, lse, mask, scale)}
        for kernel in KERNELS:
            current = triton_host.block_config(kernel, shape.D, shape.dtype, False)
            for cfg in neighbours(kernel, current, 0 if smoke else width):
                rec = dict(kernel=kernel, B=shape.B, H=shape.H, S=shape.S, D=shape.D,
                           dtype=str(shape.dtype).replace("torch.", ""), mask=shape.mask,
                           config=dataclasses.astuple(cfg), current=cfg == current, device=device)
                try:
                    with triton_host.force_tiles(**{kernel: cfg}):
                        rec["ms"] = timer(calls[kernel])
                except Exception as e:  # out of shared memory, unsupported shape: recorded, not fatal
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                records.append(rec)
                if sink:
                    sink(rec)
                if progress:
                    progress(f"[tiles] {kernel} D={shape.D} {shape.mask} {rec['config']}"
                             f"{' (table)' if rec['current'] else ''}: {rec.get('ms', rec.get('error'))}")
    return records


def best_table(records: list[dict]) -> str:
    """Per (kernel, D, dtype, mask): the table's time, the fastest candidate and the ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["D"], r["dtype"], r["mask"]), []).append(r)
    lines = ["kernel  D    dtype      mask        table (ms)           fastest (ms)              table/fastest"]
    for key, rs in groups.items():
        timed = [r for r in rs if "ms" in r]
        cur = next((r for r in timed if r["current"]), None)
        if not timed or cur is None:
            lines.append(f"{key[0]:6s}  {key[1]:<4d} {key[2]:10s} {key[3]:10s}  no timing")
            continue
        best = min(timed, key=lambda r: r["ms"])
        lines.append(f"{key[0]:6s}  {key[1]:<4d} {key[2]:10s} {key[3]:10s}  {str(cur['config']):15s} {cur['ms']:8.3f}"
                     f"  {str(best['config']):15s} {best['ms']:8.3f}  {cur['ms'] / best['ms']:.2f}x")
    return "\n".join(lines)




def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tile_sweep", description=description(__doc__))
    p.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, the table's entries only (CPU dry run)")
    p.add_argument("--width", type=int, default=4, help="candidates on each side of the table's entry")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before masklm_kernels imports triton
    # records go to OUT.partial as they come (a sweep cut short by a time limit keeps what it timed),
    # which becomes OUT when the sweep ends
    partial = args.out + ".partial"
    with open(partial, "w") as f:
        def sink(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()
        records = sweep(args.smoke, args.width, progress=lambda m: print(m, file=sys.stderr, flush=True), sink=sink)
        os.fsync(f.fileno())
    os.replace(partial, args.out)
    print(best_table(records))
    return 0 if any("ms" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
