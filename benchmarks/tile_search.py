"""Search of the attention tile table: for each (kernel, operand width, tile kind, head-dim block) entry,
the first configuration of `triton_host.tile_candidates` (in order of preference), starting from the one
the table holds now, that compiles ahead of time without a register spill for sm_80 and sm_90 in every
mask variant and head-dim block the entry serves, under the Triton installed here.

    python -m benchmarks.tile_search                  # every entry of the table
    python -m benchmarks.tile_search --failing        # only the entries that spill now
    python -m benchmarks.tile_search --entry fwd,32,dense,64 --json found.json   # kind: plain|dense|dropout

The table (`triton_host._CONFIGS`) holds one configuration per entry that is spill-free under every
Triton version the library supports: run this under each (CI's venvs: scripts/run_tests.sh) and keep, per
entry, the first candidate that all of them accept. `python -m benchmarks.compile_report` then checks the
whole table; the GPU check (scripts/gpu_check.sh) times the candidates around each entry.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from benchmarks import compile_triton
from masklm_kernels._cli import description

KERNEL_INDEX = {"fwd": 0, "dkdv": 2, "dq": 3}  # position in compile_triton.build_launches' list
ARCHS = (80, 90)


def variants(kind: str) -> tuple[str, ...]:
    """The compile variants (compile_triton.VARIANTS) an entry of a tile kind serves."""
    return {"plain": ("plain", "metadata", "varlen"), "dense": ("dense",),
            "dropout": ("dropout", "dense_dropout")}[kind]


def head_blocks(entry) -> list[int]:
    """The head-dim blocks the entry serves: those above the previous entry's, up to its own."""
    from masklm_kernels.attention import triton_host

    kernel, width, kind, bd = entry
    bounds = [b for b, _ in triton_host._CONFIGS[(kernel, width, kind)]]
    lo = max([b for b in bounds if b < bd], default=0)
    return [h for h in compile_triton.HEAD_DIMS if lo < h <= bd]


def entries() -> list[tuple[str, int, str, int]]:
    """(kernel, width, kind, head-dim block) of every entry of the table (fp64 borrows none)."""
    from masklm_kernels.attention import triton_host

    return [(kernel, width, kind, bd) for (kernel, width, kind), rows in triton_host._CONFIGS.items()
            for bd, _ in rows]


def current(entry):
    """The table's configuration for the entry under the installed Triton."""
    from masklm_kernels.attention import triton_host

    return triton_host.table_entry(*entry)


def _spills(task) -> tuple[int, int]:
    """(spilled bytes, registers) of one candidate for one variant and arch (in a worker process)."""
    kernel, width, bd, variant, cfg, arch = task  # bd: one head-dim block the entry serves
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    launch = compile_triton.build_launches("bf16" if width == 16 else "fp32", bd, variant)[KERNEL_INDEX[kernel]]
    launch = dataclasses.replace(launch, cfg=cfg, kwargs={**launch.kwargs, "BM": cfg.block_m, "BN": cfg.block_n})
    src, _ = compile_triton._source(launch)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception:  # e.g. out of shared memory: not a candidate
        return 1 << 30, 0
    u = compile_triton._parse(log.getvalue())
    return u["spill_store_bytes"] + u["spill_load_bytes"], u["registers"]


def search(entry, pool, start_at_current: bool = True):
    """First spill-free candidate of `entry` (None if none is), from the current configuration down the
    preference order and then from the top; compiled a batch at a time, as many as the pool has workers."""
    from masklm_kernels.attention import triton_host

    kernel, width, kind, bd = entry
    cands = triton_host.tile_candidates(kernel)
    if start_at_current:
        cur = current(entry)
        i = cands.index(cur) if cur in cands else 0
        cands = [cur, *cands[i + 1:], *cands[:i]]
    cands = [c for c in cands if c.block_m * c.block_n * bd <= 128 * 64 * 256]  # register file bound
    blocks = head_blocks(entry)
    per = len(blocks) * len(variants(kind)) * len(ARCHS)
    batch = max(1, pool._max_workers // per)
    for i in range(0, len(cands), batch):
        chunk = cands[i:i + batch]
        tasks = [(kernel, width, h, v, c, a) for c in chunk for h in blocks for v in variants(kind) for a in ARCHS]
        results = list(pool.map(_spills, tasks))
        for j, c in enumerate(chunk):
            if all(sp == 0 for sp, _ in results[j * per:(j + 1) * per]):
                return c
    return None


def failing(pool) -> list:
    """The entries whose current configuration spills under this Triton."""
    es = entries()
    tasks = [(k, w, h, v, current((k, w, d, bd)), a) for (k, w, d, bd) in es for h in head_blocks((k, w, d, bd))
             for v in variants(d) for a in ARCHS]
    results = iter(pool.map(_spills, tasks))
    out = []
    for e in es:
        spills = [next(results)[0] for _ in range(len(head_blocks(e)) * len(variants(e[2])) * len(ARCHS))]
        if any(spills):
            out.append(e)
    return out


def _parse_entry(text: str):
    kernel, width, kind, bd = text.split(",")
    from masklm_kernels.attention.triton_host import TILE_KINDS

    if kind not in TILE_KINDS:
        raise argparse.ArgumentTypeError(f"tile kind must be one of {TILE_KINDS}, got {kind!r}")
    return kernel, int(width), kind, int(bd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tile_search", description=description(__doc__))
    p.add_argument("--entry", action="append", type=_parse_entry,
                   help="kernel,width,plain|dense|dropout,head-dim block")
    p.add_argument("--failing", action="store_true", help="only the entries whose configuration spills now")
    p.add_argument("--from-top", action="store_true", help="start at the most preferred candidate")
    p.add_argument("--json", help="write the findings here as well")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    import triton

    ctx = multiprocessing.get_context("spawn")
    found = {}
    with ProcessPoolExecutor(args.workers or os.cpu_count() or 1, mp_context=ctx,
                             initializer=compile_triton._compiler_process) as pool:
        todo = args.entry or (failing(pool) if args.failing else entries())
        for e in todo:
            c = search(e, pool, start_at_current=not args.from_top)
            key = f"{e[0]},{e[1]},{e[2]},{e[3]}"
            found[key] = None if c is None else dataclasses.astuple(c)
            print(f"triton {triton.__version__}  {key:22s} now {dataclasses.astuple(current(e))}"
                  f"  first spill-free {found[key]}", flush=True)
    if args.json:
        from masklm_kernels._io import write_json

        write_json(args.json, {"triton": triton.__version__, "found": found})
    return 0 if all(v is not None for v in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
