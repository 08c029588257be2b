"""Host side of the Triton attention kernels: tile configurations (`block_config`, and `unsupported`, the
inputs no configuration serves), the launch description shared by the forward and backward launchers
(`Problem`; each kernel launch is a `_triton_launch.Launch`, also
compiled ahead of time by benchmarks/compile_triton.py), and the opt-in tile recorder (`record_tiles`),
which makes the number of tiles each launch computed observable. The device side (the `@triton.jit`
helpers) is triton_common.py.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .._backends import split_fp32, triton_interpreting
from .._triton_launch import BlockConfig
from .inputs import NO_DROPOUT, Dropout, Mask
from .triton_common import Flags, Lens, Meta

# ------------------------------------------------------------------------------------------------
# Block configurations
# ------------------------------------------------------------------------------------------------

def head_block(head_dim: int) -> int:
    """Power-of-two width of the head-dim axis of a tile (tl.dot needs >= 16); columns >= D are masked."""
    return max(16, triton.next_power_of_2(head_dim))


_C = BlockConfig
# (kernel, operand width, tile kind) -> [(largest head-dim block, config), ...]; the kind (`tile_kind`) is
# "plain", "dense" (a dense attn_mask) or "dropout" (attention dropout, with or without a dense mask: the
# Philox state of a tile, four 32-bit words per element through ten rounds, costs registers, hence smaller
# tiles). Each entry is the first tile of `tile_candidates` (order of preference: larger tiles, then warps,
# then deeper pipelines) that compiled without a register spill for sm_80 and sm_90, in every mask variant
# (benchmarks.compile_triton: the metadata variants also carry a sliding window and ALiBi) and head-dim block
# it serves, under the newest Triton (3.9), found by `python -m benchmarks.tile_search`; `_BEFORE_TRITON_3_9`
# replaces the entries that spill under older Triton (3.6, the GPU image's, checked). Each version's check of
# the whole table is benchmarks/results/compile_report-nvcc*-triton<version>.txt (CI runs it under both). The
# 16-bit forward starts from FlashAttention-2's Triton tutorial (128 x 64, 4-8 warps); a dense mask tile
# costs registers, hence smaller tiles there; fp32 dots run in IEEE fp32 on CUDA cores (FMA layouts hold more
# registers than MMA ones), hence its small tiles (and no dK/dV tile above head dim 128 without spills:
# `unsupported` refuses fp32 there). The backward keeps its accumulators (dK and dV, or dQ) in registers:
# the looped-over side is narrow. None of this is timed on a GPU yet: the GPU check's tile sweep
# (benchmarks.tile_sweep) is what retunes it.
_CONFIGS = {
    ("fwd", 16, "plain"): [(64, _C(128, 64, 8, 3)), (128, _C(128, 64, 8, 3)), (256, _C(64, 64, 8, 2))],
    ("fwd", 16, "dense"): [(16, _C(128, 16, 4, 3)), (32, _C(128, 32, 4, 3)), (64, _C(64, 64, 8, 2)),
                           (128, _C(64, 32, 8, 2)), (256, _C(32, 16, 4, 2))],
    ("fwd", 32, "plain"): [(16, _C(64, 64, 8, 1)), (32, _C(64, 32, 8, 1)), (64, _C(32, 32, 8, 3)),
                           (128, _C(16, 32, 8, 3))],
    ("fwd", 32, "dense"): [(16, _C(64, 32, 8, 3)), (32, _C(64, 32, 8, 2)), (64, _C(32, 32, 8, 3)),
                           (128, _C(32, 16, 8, 2))],
    ("dkdv", 16, "plain"): [(32, _C(32, 128, 4, 3)), (64, _C(16, 128, 8, 2)), (128, _C(32, 64, 8, 2)),
                            (256, _C(16, 32, 8, 1))],
    ("dkdv", 16, "dense"): [(32, _C(32, 128, 8, 2)), (64, _C(16, 128, 8, 2)), (128, _C(32, 32, 8, 3)),
                            (256, _C(16, 32, 8, 1))],
    ("dkdv", 32, "plain"): [(16, _C(16, 16, 4, 2)), (32, _C(16, 32, 8, 1)), (64, _C(32, 16, 8, 2)),
                            (128, _C(16, 64, 8, 2))],
    ("dkdv", 32, "dense"): [(16, _C(16, 16, 4, 3)), (32, _C(16, 32, 8, 2)), (64, _C(16, 32, 8, 1)),
                            (128, _C(16, 64, 8, 2))],
    ("dq", 16, "plain"): [(64, _C(128, 32, 8, 2)), (128, _C(32, 64, 8, 3)), (256, _C(16, 16, 4, 1))],
    ("dq", 16, "dense"): [(64, _C(128, 16, 8, 3)), (128, _C(64, 32, 8, 2)), (256, _C(16, 32, 8, 3))],
    ("dq", 32, "plain"): [(16, _C(32, 64, 8, 3)), (32, _C(64, 32, 8, 2)), (64, _C(16, 64, 8, 3)),
                          (128, _C(16, 16, 8, 3))],
    ("dq", 32, "dense"): [(16, _C(32, 64, 8, 3)), (32, _C(64, 32, 8, 2)), (64, _C(16, 64, 8, 3)),
                          (128, _C(16, 16, 8, 3))],
    ("fwd", 16, "dropout"): [(16, _C(128, 16, 4, 3)), (32, _C(128, 32, 8, 3)), (64, _C(64, 64, 8, 2)),
                             (128, _C(16, 128, 8, 3)), (256, _C(32, 16, 8, 3))],
    ("fwd", 32, "dropout"): [(16, _C(128, 16, 4, 3)), (32, _C(64, 32, 8, 2)), (64, _C(32, 16, 8, 3)),
                             (128, _C(16, 16, 8, 3))],
    ("dkdv", 16, "dropout"): [(32, _C(16, 128, 8, 3)), (64, _C(64, 32, 8, 3)), (128, _C(32, 32, 8, 3)),
                              (256, _C(16, 32, 8, 1))],
    ("dkdv", 32, "dropout"): [(16, _C(16, 16, 4, 3)), (32, _C(32, 16, 8, 3)), (64, _C(16, 32, 4, 3)),
                              (128, _C(16, 16, 4, 3))],
    ("dq", 16, "dropout"): [(64, _C(128, 16, 8, 3)), (128, _C(32, 64, 8, 3)), (256, _C(16, 32, 8, 3))],
    ("dq", 32, "dropout"): [(16, _C(32, 64, 8, 3)), (32, _C(64, 16, 8, 3)), (64, _C(16, 64, 8, 3)),
                            (128, _C(16, 16, 8, 3))],
}
TILE_KINDS = ("plain", "dense", "dropout")
# (kernel, width, kind, head-dim block) -> config, for Triton before 3.9: the first candidate from the
# entry above down (then from the top) that `benchmarks.tile_search` found spill-free under Triton 3.6 (which
# spilled 8-1100 B with those entries; the fp32 dense-mask tiles the most).
_BEFORE_TRITON_3_9 = {
    ("dkdv", 32, "dense", 16): _C(32, 128, 8, 3),
    ("dkdv", 32, "dense", 128): _C(16, 16, 8, 3),
    ("dkdv", 16, "dropout", 256): _C(32, 16, 8, 3),
    ("dkdv", 32, "dropout", 16): _C(32, 64, 8, 3),
    ("dkdv", 32, "dropout", 64): _C(32, 16, 8, 3),
    ("dkdv", 32, "dropout", 128): _C(16, 16, 8, 3),
    ("dkdv", 16, "plain", 32): _C(32, 128, 8, 1),
    ("dkdv", 16, "plain", 128): _C(64, 32, 8, 2),
    ("dkdv", 32, "plain", 32): _C(16, 32, 4, 3),
    ("dkdv", 32, "plain", 64): _C(64, 16, 8, 1),
    ("fwd", 16, "dense", 256): _C(32, 16, 8, 3),
    ("fwd", 32, "dense", 128): _C(16, 32, 8, 3),
    ("fwd", 16, "dropout", 16): _C(128, 16, 8, 3),
    ("fwd", 16, "dropout", 64): _C(32, 128, 8, 3),
    ("fwd", 16, "dropout", 256): _C(16, 32, 4, 3),
    ("fwd", 32, "dropout", 16): _C(128, 16, 8, 3),
    ("fwd", 32, "dropout", 32): _C(16, 128, 8, 3),
    ("fwd", 16, "plain", 64): _C(64, 128, 8, 2),
    ("fwd", 32, "plain", 16): _C(128, 16, 4, 3),
    ("fwd", 32, "plain", 32): _C(32, 64, 8, 3),
}



def _triton_before(major: int, minor: int) -> bool:
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) < (major, minor)


@functools.lru_cache(maxsize=None)  # on every launch: the version test and the row lookup once per entry
def table_entry(kernel: str, width: int, kind: str, max_bd: int) -> BlockConfig:
    """The table's configuration for one entry under the installed Triton."""
    if _triton_before(3, 9):
        cfg = _BEFORE_TRITON_3_9.get((kernel, width, kind, max_bd))
        if cfg is not None:
            return cfg
    return dict(_CONFIGS[(kernel, width, kind)])[max_bd]


def tile_kind(dense_mask: bool, dropout: bool) -> str:
    """The table's kind of a launch: dropout takes precedence (its tiles also serve a dense mask)."""
    return "dropout" if dropout else "dense" if dense_mask else "plain"

# fp64 (Triton's interpreter only) borrows the fp32 tiles, and head dims up to 256.
_FP64_WIDE = {"fwd": _C(32, 16, 4, 2), "dkdv": _C(16, 32, 4, 1), "dq": _C(32, 16, 4, 2)}


def tile_candidates(kernel: str) -> list[BlockConfig]:
    """Every tile configuration worth trying for `kernel`, in the table's order of preference: larger tiles
    first, then a wider side that each program keeps (its query rows for the forward and dQ, its keys for
    dK/dV), then fewer warps for the forward (more for the backward), then deeper pipelines.
    `benchmarks.tile_search` walks this list for the first spill-free entry of each group under each Triton
    version, and the GPU check times the entries around it."""
    sides = (128, 64, 32, 16)
    out = [_C(m, n, w, s) for m in sides for n in sides for w in (4, 8) for s in (3, 2, 1)]
    fewer_warps_first = kernel == "fwd"
    return sorted(out, key=lambda c: (-c.block_m * c.block_n,
                                      -(c.block_m if kernel != "dkdv" else c.block_n),
                                      c.num_warps if fewer_warps_first else -c.num_warps, -c.num_stages))


def unsupported(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the GPU kernels have no configuration for these inputs (None: they have one)."""
    if dtype == torch.float64:
        return "float64 is not compiled for GPUs (no spill-free tile configuration); use backend='reference'"
    if dtype == torch.float32 and head_dim > 128:
        return ("float32 with head_dim > 128 has no spill-free dK/dV tile configuration; use fp16/bf16 or "
                "backend='reference'")
    return None


def block_config(kernel: str, head_dim: int, dtype: torch.dtype, dense_mask: bool = False,
                 dropout: bool = False) -> BlockConfig:
    """Tile shape and launch options of `kernel` ("fwd", "dkdv", "dq") for a head dim, dtype, whether a
    dense attn_mask is applied and whether attention dropout is."""
    if kernel not in ("fwd", "dkdv", "dq"):
        raise ValueError(f"unknown kernel {kernel!r}")
    forced = _FORCED_TILES.get().get(kernel)
    if forced is not None:
        return forced
    width = 16 if dtype in (torch.float16, torch.bfloat16) else 32
    bd = head_block(head_dim)
    kind = tile_kind(dense_mask, dropout)
    for max_bd, _ in _CONFIGS[(kernel, width, kind)]:
        if bd <= max_bd:
            return table_entry(kernel, width, kind, max_bd)
    if dtype == torch.float64 or (dtype == torch.float32 and triton_interpreting()):
        return _FP64_WIDE[kernel]  # the interpreter has no registers to spill
    raise ValueError(unsupported(dtype, head_dim) or f"head_dim {head_dim} is above 256")


_FORCED_TILES: contextvars.ContextVar[dict] = contextvars.ContextVar("masklm_forced_tiles", default={})


@contextlib.contextmanager
def force_tiles(**configs: BlockConfig):
    """Within this block, `block_config(kernel, ...)` returns `configs[kernel]` (kernel "fwd", "dkdv" or
    "dq") whatever the inputs: for timing the table's candidates (benchmarks.tile_sweep). A configuration
    that is not in the table may spill or not compile for some inputs; the table is what is checked."""
    unknown = set(configs) - {"fwd", "dkdv", "dq"}
    if unknown:
        raise ValueError(f"force_tiles: unknown kernel(s) {sorted(unknown)}")
    token = _FORCED_TILES.set({**_FORCED_TILES.get(), **configs})
    try:
        yield
    finally:
        _FORCED_TILES.reset(token)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 runs in IEEE fp32 (TF32 would miss the brief's 2x-eager-error bar against fp32 eager matmul)."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


# ------------------------------------------------------------------------------------------------
# Tile recorder (debug / benchmarks)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TileLaunch:
    """One kernel launch: its tile shape and, per program (on the device), the tiles it computed (row 0)
    and those of them that needed the per-element mask, i.e. were not fully visible (row 1)."""
    kernel: str
    block_m: int
    block_n: int
    counts: torch.Tensor

    @property
    def computed(self) -> int:
        return int(self.counts[0].sum())  # host sync: only when asked

    @property
    def masked(self) -> int:
        return int(self.counts[1].sum())


_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("masklm_tile_recorder", default=None)


@contextlib.contextmanager
def record_tiles():
    """Within this block every Triton attention launch also writes how many tiles each program computed
    and masked (two int32 per program, no atomics) and appends a `TileLaunch` to the yielded list.
    Outside it the kernels are compiled without the counters."""
    launches: list[TileLaunch] = []
    token = _RECORDER.set(launches)
    try:
        yield launches
    finally:
        _RECORDER.reset(token)


def tile_counter(kernel: str, cfg: BlockConfig, programs: int, device) -> torch.Tensor | None:
    """(2, programs) int32 counters when recording (else None); registered with the recorder."""
    launches = _RECORDER.get()
    if launches is None:
        return None
    counts = torch.zeros(2, max(programs, 1), dtype=torch.int32, device=device)
    launches.append(TileLaunch(kernel, cfg.block_m, cfg.block_n, counts))
    return counts


# ------------------------------------------------------------------------------------------------
# Launch description shared by the forward and backward launchers
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    """One attention call as the kernels see it: sizes, layout, and the argument bundles every kernel takes
    (triton_common.py: `Meta`, `Lens`, `Flags`)."""
    B: int
    HQ: int
    HKV: int
    SQ: int  # padded: Sq; packed (varlen): max_seqlen_q
    SK: int
    D: int
    varlen: bool
    meta: Meta
    lens: Lens
    flags: Flags
    total_q: int = 0  # packed layout: rows of q

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides of q/k/v/out-like tensors: (B, H, S, D), or (total, H, D) packed."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self) -> tuple[int, int, int]:
        """lse / delta layout: (B, HQ, SQ) padded, (HQ, total_q) packed."""
        return (0, self.total_q, 1) if self.varlen else (self.HQ * self.SQ, self.SQ, 1)

    def bundles(self, count: bool) -> tuple:
        """The kernels' last non-tile arguments: meta, the four sizes (plain arguments, so that
        do_not_specialize keeps one compilation for every length: Triton specialises a tuple's elements),
        flags; `count`: compile in the tile counters (record_tiles)."""
        return self.meta, *self.lens, _device_flags(self.flags._replace(COUNT=count))

    def layout_bundles(self) -> tuple:
        """`bundles` with the mask and dropout switches and values a kernel that only reads the layout (the
        backward's preprocess) does not use at neutral values: one compilation serves every mask, dropout
        and head grouping."""
        neutral = self.flags._replace(CAUSAL=False, HAS_QLEN=False, HAS_KVLEN=False, HAS_PREFIX=False, NSPANS=0,
                                      NSP=2, INSIDE=True, CONTIGUOUS=True, MASK_KIND=0, COUNT=False, DROPOUT=0,
                                      HAS_WLEFT=False, HAS_WRIGHT=False, ALIBI=False)
        stand_in = self.meta.CU_Q  # an int32 tensor of every call: the pointers' types do not vary either
        meta = self.meta._replace(QLEN=stand_in, KVLEN=stand_in, PREFIX=stand_in, SPANS=stand_in, MASK=stand_in,
                                  smb=0, smh=0, smi=0, smj=0, HQ=1, GROUP=1, **_dropout_meta(NO_DROPOUT, stand_in),
                                  WLEFT=0, WRIGHT=0, ALIBI=stand_in)
        return meta, *self.lens, _device_flags(neutral)

    @classmethod
    def from_padded(cls, q, k, mask: Mask, scale: float, dropout: Dropout = NO_DROPOUT) -> Problem:
        """q (B, Hq, Sq, D), k (B, Hkv, Sk, D) and the typed mask of the padded layout."""
        B, HQ, SQ, D = q.shape
        HKV, SK = k.shape[1], k.shape[2]
        dummy = q.new_empty(0, dtype=torch.int32)
        spans = mask.spans
        if spans is not None and spans.dim() == 2:
            spans = spans[:, None]
        inside = mask.span_mode == "inside"
        if spans is not None and spans.shape[1] == 0 and inside:
            spans = spans.new_zeros(B, 1, 2)  # no span at all, "inside": no key is visible (one empty span)
        nspans = 0 if spans is None else spans.shape[1]
        attn_mask = mask.attn_mask
        if attn_mask is None:
            dense, dense_strides, kind = dummy, (0, 0, 0, 0), 0
        else:
            dense = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
            dense_strides, kind = dense.expand(B, HQ, SQ, SK).stride(), 1 if attn_mask.dtype == torch.bool else 2
        lengths = [getattr(mask, key) for key in ("q_lengths", "kv_lengths", "prefix_lengths")]
        meta = _meta(q, dummy, dummy, *(dummy if t is None else t for t in lengths),
                     dummy if spans is None else spans.contiguous(), dense, dense_strides, HQ, HKV, D, scale, dropout,
                     mask)
        flags = _flags(q, D, mask.causal, *(t is not None for t in lengths), nspans, inside, kind, False, dropout,
                       mask)
        return cls(B, HQ, HKV, SQ, SK, D, False, meta, Lens(SQ, SK, 0, 0), flags)

    @classmethod
    def from_varlen(cls, q, k, cu_q, cu_k, max_q: int, max_k: int, causal: bool, left: int, right: int, alibi,
                    scale: float, dropout: Dropout = NO_DROPOUT) -> Problem:
        """The packed layout: q (total_q, Hq, D), k (total_k, Hkv, D) and their cu_seqlens; the window sides
        and (B, Hq) ALiBi slopes (or None)."""
        total_q, HQ, D = q.shape
        HKV = k.shape[1]
        dummy = q.new_empty(0, dtype=torch.int32)
        mask = Mask(causal=causal, window_left=left, window_right=right, alibi_slopes=alibi)
        meta = _meta(q, cu_q, cu_k, dummy, dummy, dummy, dummy, dummy, (0, 0, 0, 0), HQ, HKV, D, scale, dropout, mask)
        flags = _flags(q, D, causal, False, False, False, 0, True, 0, True, dropout, mask)
        return cls(cu_q.shape[0] - 1, HQ, HKV, max_q, max_k, D, True, meta, Lens(max_q, max_k, total_q, k.shape[0]),
                   flags, total_q)


def _meta(q, cu_q, cu_k, qlen, kvlen, prefix, spans, dense, dense_strides, HQ, HKV, D, scale, dropout,
          mask: Mask) -> Meta:
    (hi, lo), (l2_hi, l2_lo) = split_fp32(scale), split_fp32(1.0 / math.log(2.0))
    return Meta(cu_q, cu_k, qlen, kvlen, prefix, spans, dense, *dense_strides, HQ, HQ // HKV, D, hi, lo, l2_hi, l2_lo,
                **_dropout_meta(dropout, cu_q), WLEFT=max(mask.window_left, 0), WRIGHT=max(mask.window_right, 0),
                ALIBI=cu_q if mask.alibi_slopes is None else mask.alibi_slopes)


def _dropout_meta(dropout: Dropout, dummy) -> dict:
    """Meta's dropout fields (`dummy`, an int32 tensor, stands in for the absent tensors)."""
    if not dropout.active:
        return dict(DSEED=dummy, DOFFSET=dummy, DSAMPLE=dummy, drop_thr=0, drop_rs_hi=1.0, drop_rs_lo=0.0)
    rs_hi, rs_lo = split_fp32(dropout.rescale)
    return dict(DSEED=dropout.seed, DOFFSET=dropout.offset,
                DSAMPLE=dropout.sample_ids if dropout.sample_ids is not None else dummy,
                drop_thr=dropout.threshold - 2**31, drop_rs_hi=rs_hi, drop_rs_lo=rs_lo)


def _device_flags(flags: Flags) -> Flags:
    """The Flags as the kernels take them: each field a `tl.constexpr` (Triton 3.6 hands the kernel a
    constexpr tuple's plain fields as Python values, which its calls and shape lists refuse)."""
    return Flags(*(tl.constexpr(v) for v in flags))


def _flags(q, D, causal, has_qlen, has_kvlen, has_prefix, nspans, inside, mask_kind, varlen, dropout,
           mask: Mask) -> Flags:
    return Flags(BD=head_block(D), CAUSAL=causal, HAS_QLEN=has_qlen, HAS_KVLEN=has_kvlen, HAS_PREFIX=has_prefix,
                 NSPANS=nspans, NSP=max(2, triton.next_power_of_2(max(nspans, 1))), INSIDE=inside,
                 CONTIGUOUS=nspans == 0 or (inside and nspans == 1), MASK_KIND=mask_kind, VARLEN=varlen, COUNT=False,
                 DROPOUT=0 if not dropout.active else (2 if dropout.sample_ids is not None else 1),
                 HAS_WLEFT=mask.window_left >= 0, HAS_WRIGHT=mask.window_right >= 0,
                 ALIBI=mask.alibi_slopes is not None,
                 ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                 UPCAST=triton_interpreting() and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype))
