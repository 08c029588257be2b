"""Ahead-of-time compilation of every Triton kernel configuration the library launches, for GPUs that are
not here (docs/TESTING.md), with each kernel's registers, spills and shared memory.

The launches are built by the library's own launchers (`forward_launch`, `backward_launches`) on small CPU
tensors, so what is compiled is what runs: the same kernels, block configurations, constexpr flags and
argument types. Each is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
and ptxas's own report (`TRITON_DUMP_PTXAS_LOG`) is parsed for registers, stack and spills; shared memory is
Triton's (dynamic) allocation.

Configurations: kernel (fwd, preprocess, dkdv, dq) x dtype (bf16 -- fp16 has the same configurations and
code --, fp32; fp64 runs under the interpreter only) x head-dim block (16, 32, 64, 128, 256: every supported D
maps to one) x mask variant
(`plain`: no mask; `metadata`: causal, q/kv/prefix lengths, two "inside" spans, a sliding window bounded on
both sides and ALiBi slopes -- the most live state of the metadata paths; `dense`: that plus a float
attn_mask, which selects the dense-mask block configuration; `varlen`: packed layout, causal, a left window
and ALiBi; `dropout` and `dense_dropout`: `metadata` and `dense` with attention
dropout keyed by sample ids, the Philox keep mask regenerated per tile, which select the dropout block
configuration). Identical compilations are done once.

The loss kernel (masklm_kernels/losses/triton_ce.py) is compiled at its largest vocabulary block (V >=
MAX_BLOCK_V; smaller vocabularies take a smaller power-of-two block, with less live state), loss only and
with the gradient sweep, for bf16 and fp32 logits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from benchmarks.ptxas import format_rows, parse_ptxas, usage_problems

DTYPE_NAMES = ("bf16", "fp32")  # fp64 runs under the interpreter only (api.py refuses it on CUDA)
HEAD_DIMS = (16, 32, 64, 128, 256)
VARIANTS = ("plain", "metadata", "dense", "varlen", "dropout", "dense_dropout")
LOSS_VARIANTS = ("loss", "loss+grad")


@dataclasses.dataclass
class TritonUsage:
    kernel: str
    arch: int
    config: str  # dtype, head dim, variant, tile shape
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def build_launches(dtype_name: str, head_dim: int, variant: str):
    """The launches (forward, preprocess, dK/dV, dQ) of one configuration, on small CPU tensors; for a loss
    variant (head_dim unused) the cross-entropy launch."""
    import torch

    if variant in LOSS_VARIANTS:
        from masklm_kernels.losses import triton_ce
        from masklm_kernels.losses.inputs import LossOptions

        N, V = 4, 30522
        x, y, acc = torch.empty(N, V, dtype=_dtype(dtype_name)), torch.empty(N, dtype=torch.int64), torch.empty(N)
        grad = x if variant == "loss+grad" else None
        return [triton_ce.launch(x, y, LossOptions(-100, 0.1, 0.0), acc, acc, grad, acc if grad is not None else None)]
    from masklm_kernels.attention import triton_bwd, triton_fwd, triton_host

    dt = _dtype(dtype_name)
    B, HQ, HKV, S = 2, 4, 2, 128
    if variant == "varlen":
        q, k = torch.empty(B * S, HQ, head_dim, dtype=dt), torch.empty(B * S, HKV, head_dim, dtype=dt)
        cu = torch.tensor([0, S, 2 * S], dtype=torch.int32)
        alibi = torch.zeros(B, HQ, dtype=torch.float32)
        prob = triton_host.Problem.from_varlen(q, k, cu, cu, S, S, True, 64, 0, alibi, 0.125)
        lse = torch.empty(HQ, B * S, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    else:
        q, k = torch.empty(B, HQ, S, head_dim, dtype=dt), torch.empty(B, HKV, S, head_dim, dtype=dt)
        from masklm_kernels.attention.inputs import NO_DROPOUT, Dropout, Mask

        mask, dropout = Mask(), NO_DROPOUT
        dense = variant in ("dense", "dense_dropout")
        if variant in ("metadata", "dense", "dropout", "dense_dropout"):
            lens = torch.full((B,), S, dtype=torch.int64)
            mask = Mask(causal=True, kv_lengths=lens, q_lengths=lens, prefix_lengths=lens,
                        spans=torch.zeros(B, 2, 2, dtype=torch.int64), span_mode="inside", window_left=64,
                        window_right=64, alibi_slopes=torch.zeros(B, HQ, dtype=torch.float32),
                        attn_mask=torch.zeros(B, 1, S, S, dtype=torch.float32) if dense else None)
        if variant in ("dropout", "dense_dropout"):
            scalar = torch.zeros((), dtype=torch.int64)
            dropout = Dropout(0.1, scalar, scalar, torch.zeros(B, dtype=torch.int64))
        prob = triton_host.Problem.from_padded(q, k, mask, 0.125, dropout)
        lse = torch.empty(B, HQ, S, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    fwd = triton_fwd.forward_launch(prob, q, k, k, q, lse)
    return [fwd, *triton_bwd.backward_launches(prob, q, q, k, k, q, lse, lse, q, k, k)]


_TYPES = {"torch.float16": "*fp16", "torch.bfloat16": "*bf16", "torch.float32": "*fp32", "torch.float64": "*fp64",
          "torch.int32": "*i32", "torch.int64": "*i64", "torch.uint8": "*u8"}


def _arg_type(v, path: tuple, specialize: bool, attrs: dict):
    """Triton's type of one runtime argument (a tuple's per element, as a tuple of the same kind), and into
    `attrs` the divisibility hints its launcher derives: 16-byte aligned pointers, integers divisible by 16
    unless the parameter is marked do_not_specialize."""
    import torch

    if isinstance(v, tuple):
        types = [_arg_type(x, (*path, i), specialize, attrs) for i, x in enumerate(v)]
        return type(v)(*types) if hasattr(v, "_fields") else tuple(types)
    if isinstance(v, torch.Tensor):
        attrs[path] = [["tt.divisibility", 16]]
        return _TYPES[str(v.dtype)]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        if v % 16 == 0 and specialize:
            attrs[path] = [["tt.divisibility", 16]]
        return "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type argument {v!r}")


def _source(launch):
    """ASTSource of a launch: argument types (tuples of the argument bundles element by element), constexpr
    values and the divisibility hints Triton's launcher derives."""
    from triton.compiler import ASTSource

    fn = launch.kernel
    bound = launch.bound()
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], const[(i,)] = "constexpr", v
        else:
            specialize = p.name not in fn.do_not_specialize and i not in fn.do_not_specialize
            try:
                sig[p.name] = _arg_type(v, (i,), specialize, attrs)
            except TypeError as e:
                raise TypeError(f"{fn.__name__}: argument {p.name}: {e}") from None
    key = (fn.__name__, repr(sorted(sig.items())), repr(sorted(const.items(), key=str)), tuple(sorted(attrs)),
           launch.cfg)
    return ASTSource(fn, sig, const, attrs), key


def _parse(log: str) -> dict:
    (u, *_) = parse_ptxas(log, "triton") or [None]
    if u is None:
        raise RuntimeError(f"no ptxas report in:\n{log[-2000:]}")
    return dict(registers=u.registers, stack_bytes=u.stack_bytes, spill_store_bytes=u.spill_store_bytes,
                spill_load_bytes=u.spill_load_bytes)


def _compile(task) -> TritonUsage:
    """Compiles launch number `index` of one configuration for one arch (in a worker process)."""
    dtype_name, head_dim, variant, index, arch = task
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its report
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (3.9 warns otherwise)
    import triton
    from triton.backends.compiler import GPUTarget

    launch = build_launches(dtype_name, head_dim, variant)[index]
    src, _ = _source(launch)
    cfg = launch.cfg
    opts = {} if cfg is None else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's report from Python
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    tile = "" if cfg is None else f" {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    label = launch.label or f"D<={head_dim} {variant}{tile}"
    usage = TritonUsage(launch.kernel.__name__, arch, f"{dtype_name} {label}",
                        shared_bytes=int(getattr(compiled.metadata, "shared", 0)))
    for name, value in _parse(log.getvalue()).items():
        setattr(usage, name, value)
    return usage


def tasks(archs) -> list[tuple]:
    """(dtype, head dim, variant, launch index, arch) of every distinct compilation."""
    from masklm_kernels.attention.triton_host import unsupported

    seen, out = set(), []
    for d in DTYPE_NAMES:
        for h in HEAD_DIMS:
            if unsupported(_dtype(d), h):
                continue  # refused by the triton backend (api.py): never launched on a GPU
            for v in VARIANTS:
                for i, launch in enumerate(build_launches(d, h, v)):
                    _, key = _source(launch)
                    for a in archs:
                        if (key, a) not in seen:
                            seen.add((key, a))
                            out.append((d, h, v, i, a))
    for d in DTYPE_NAMES:
        for v in LOSS_VARIANTS:
            out += [(d, 0, v, 0, a) for a in archs]
    return out


def _compiler_process():
    """Worker initializer: ahead-of-time compilation needs Triton's real JIT functions, and the test run
    sets TRITON_INTERPRET=1 (which makes @triton.jit return interpreter functions): workers are spawned
    fresh and drop it before anything imports triton."""
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(archs, workers: int | None = None) -> list[TritonUsage]:
    """Every distinct configuration for every arch, compiled in parallel (spawned) processes."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=ctx,
                             initializer=_compiler_process) as pool:
        todo = pool.submit(tasks, list(archs)).result()
        return list(pool.map(_compile, todo))


def problems(u: TritonUsage) -> list[str]:
    return usage_problems(u)


def format_table(usages: list[TritonUsage]) -> str:
    rows = [("kernel", "arch", "regs", "stack B", "spill st/ld B", "smem B", "configuration")]
    for u in usages:
        rows.append((u.kernel, f"sm_{u.arch}", str(u.registers), str(u.stack_bytes),
                     f"{u.spill_store_bytes}/{u.spill_load_bytes}", str(u.shared_bytes), u.config))
    return format_rows(rows)


if __name__ == "__main__":
    us = compile_all([int(a) for a in sys.argv[1:]] or [80, 90])
    print(format_table(us))
    sys.exit(1 if any(problems(u) for u in us) else 0)
