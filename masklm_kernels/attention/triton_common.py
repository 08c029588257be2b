"""Shared pieces of the Triton attention kernels (triton_fwd.py, triton_bwd.py).

Visibility from O(B) metadata, two levels (BRIEF.md, "Attention semantics"). A pair (i, j) of batch row
b is visible when

    row_ok(i) & col_ok(j) & (not causal | j <= i + off | j < prefix)       off = Sk_b - Sq_b

with row_ok(i) = i < q_len [& i in a span, "inside"], col_ok(j) = j < kv_len [& j in a span, "inside" |
& j in no span, "outside"] (q_len, kv_len clipped to the row's lengths). The causal term is monotone
in i and j, so a BM x BN tile holds a visible pair exactly when its last valid row i_max and its first
valid column j_min form one: `_tile_class` decides that from two scalars per side, O(#spans) work, and
the kernels skip the tile without loading it. Tiles whose every pair is visible ("full") skip the
per-element mask; the rest apply `_pair_visible` to the scores. `attn_mask` (dense) is applied per
element on every computed tile and never makes a tile skippable.

Also here: block configurations (shared by the launchers and the AOT compile report) and the opt-in
tile recorder (`record_tiles`), which makes the number of tiles each launch computed observable.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreting

# Sentinel "no valid column" for j_min; any real column index is below it.
NO_COL = tl.constexpr(1 << 30)


# ------------------------------------------------------------------------------------------------
# Block configurations
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def head_block(head_dim: int) -> int:
    """Power-of-two width of the head-dim axis of a tile (tl.dot needs >= 16); columns >= D are masked."""
    return max(16, triton.next_power_of_2(head_dim))


_C = BlockConfig
# (kernel, operand width, dense attn_mask) -> [(largest head-dim block, config), ...]. Each entry is the
# largest tile (in this order of preference: block_m, block_n, then fewer warps) that compiles without a
# register spill for sm_80 and sm_90 in every mask variant, found by compiling the candidates ahead of time
# (benchmarks/compile_triton.py; the table it prints is benchmarks/results/compile_report-*.txt). The
# 16-bit forward starts from FlashAttention-2's Triton tutorial (128 x 64, 4-8 warps); a dense mask tile
# costs registers, hence smaller tiles there; fp32 dots run in IEEE fp32 on CUDA cores (FMA layouts hold
# more registers than MMA ones), hence its small tiles. The backward keeps its accumulators (dK and dV, or
# dQ) in registers: the looped-over side is narrow.
_CONFIGS = {
    ("fwd", 16, False): [(64, _C(128, 64, 4, 3)), (128, _C(128, 64, 8, 3)), (256, _C(64, 64, 8, 2))],
    ("fwd", 16, True): [(64, _C(64, 64, 8, 2)), (128, _C(64, 32, 8, 2)), (256, _C(32, 16, 4, 2))],
    ("dkdv", 16, False): [(64, _C(32, 128, 8, 2)), (128, _C(32, 64, 4, 2)), (256, _C(16, 32, 8, 1))],
    ("dkdv", 16, True): [(64, _C(32, 128, 8, 2)), (128, _C(16, 64, 8, 2)), (256, _C(16, 32, 8, 1))],
    ("dq", 16, False): [(64, _C(128, 32, 8, 2)), (128, _C(64, 32, 4, 2)), (256, _C(16, 16, 4, 1))],
    ("dq", 16, True): [(64, _C(128, 32, 8, 2)), (128, _C(64, 32, 8, 2)), (256, _C(16, 16, 4, 1))],
    ("fwd", 32, False): [(64, _C(64, 32, 8, 2)), (256, _C(32, 16, 4, 2))],
    ("dkdv", 32, False): [(64, _C(16, 32, 8, 1)), (128, _C(16, 64, 8, 2)), (256, _C(16, 32, 8, 1))],
    ("dq", 32, False): [(64, _C(64, 32, 8, 2)), (128, _C(64, 16, 8, 2)), (256, _C(32, 16, 4, 2))],
}


def block_config(kernel: str, head_dim: int, dtype: torch.dtype, dense_mask: bool = False) -> BlockConfig:
    """Tile shape and launch options of `kernel` ("fwd", "dkdv", "dq") for a head dim, dtype and whether
    a dense attn_mask is applied (fp32 -- and fp64, interpreter only -- use one table for both)."""
    if kernel not in ("fwd", "dkdv", "dq"):
        raise ValueError(f"unknown kernel {kernel!r}")
    width = 16 if dtype in (torch.float16, torch.bfloat16) else 32
    bd = head_block(head_dim)
    for max_bd, cfg in _CONFIGS[(kernel, width, dense_mask and width == 16)]:
        if bd <= max_bd:
            return cfg
    raise ValueError(f"head_dim {head_dim} is above 256")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 runs in IEEE fp32 (TF32 would miss the brief's 2x-eager-error bar against fp32 eager matmul)."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


# ------------------------------------------------------------------------------------------------
# Tile recorder (debug / benchmarks)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """One kernel launch, built by the launchers and run by them -- or compiled ahead of time for a GPU
    that is not here by `benchmarks/compile_triton.py`, which thereby sees exactly what runs."""
    kernel: triton.runtime.JITFunction
    grid: tuple[int, int, int]  # (tiles, batch rows, heads)
    args: tuple
    kwargs: dict
    cfg: BlockConfig | None = None

    def __call__(self) -> None:
        opts = {} if self.cfg is None else dict(num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)
        self.kernel[self.grid](*self.args, **self.kwargs, **opts)

    def bound(self) -> dict:
        """Every kernel parameter by name with the value this launch passes."""
        return {**dict(zip(self.kernel.arg_names, self.args)), **self.kwargs}


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
# JIT helpers
# ------------------------------------------------------------------------------------------------

@triton.jit
def _seq_info(cu_q, cu_k, b, SQ, SK, VARLEN: tl.constexpr):
    """(first token, length) of batch row b's queries and keys: packed rows from cu_seqlens, else padded."""
    if VARLEN:
        q0 = tl.load(cu_q + b).to(tl.int32)
        k0 = tl.load(cu_k + b).to(tl.int32)
        sq = tl.load(cu_q + b + 1).to(tl.int32) - q0
        sk = tl.load(cu_k + b + 1).to(tl.int32) - k0
    else:
        q0 = 0
        k0 = 0
        sq = SQ
        sk = SK
    return q0, sq, k0, sk


@triton.jit
def _row_meta(b, sq, sk, qlen_ptr, kvlen_ptr, prefix_ptr, spans_ptr,
              HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_PREFIX: tl.constexpr,
              NSPANS: tl.constexpr, NSP: tl.constexpr):
    """Row b's clipped query / key lengths, prefix length and its spans as two NSP-vectors (empty pads)."""
    q_len = sq
    kv_len = sk
    prefix = 0
    if HAS_QLEN:
        q_len = tl.minimum(sq, tl.load(qlen_ptr + b).to(tl.int32))
    if HAS_KVLEN:
        kv_len = tl.minimum(sk, tl.load(kvlen_ptr + b).to(tl.int32))
    if HAS_PREFIX:
        prefix = tl.load(prefix_ptr + b).to(tl.int32)
    s = tl.arange(0, NSP)
    if NSPANS > 0:
        st = tl.load(spans_ptr + b * (2 * NSPANS) + 2 * s, mask=s < NSPANS, other=0).to(tl.int32)
        en = tl.load(spans_ptr + b * (2 * NSPANS) + 2 * s + 1, mask=s < NSPANS, other=0).to(tl.int32)
    else:
        st = s * 0
        en = s * 0
    return q_len, kv_len, prefix, st, en


@triton.jit
def _in_spans(x, st, en):
    """Bool vector: x (1-D positions) lies in one of the spans [st, en)."""
    hit = (x[:, None] >= st[None, :]) & (x[:, None] < en[None, :])
    return tl.max(hit.to(tl.int32), axis=1) > 0


@triton.jit
def _rows_ok(i, q_len, st, en, NSPANS: tl.constexpr, INSIDE: tl.constexpr):
    ok = i < q_len
    if INSIDE and NSPANS > 0:
        ok = ok & _in_spans(i, st, en)
    return ok


@triton.jit
def _cols_ok(j, kv_len, st, en, NSPANS: tl.constexpr, INSIDE: tl.constexpr):
    ok = j < kv_len
    if NSPANS > 0:
        hit = _in_spans(j, st, en)
        if INSIDE:
            ok = ok & hit
        else:
            ok = ok & (hit == 0)
    return ok


@triton.jit
def _pair_visible(i2, j2, row_ok2, col_ok2, off, prefix, CAUSAL: tl.constexpr):
    """Element visibility of a tile; i2/j2 and the ok masks are already broadcastable 2-D views."""
    vis = row_ok2 & col_ok2
    if CAUSAL:
        vis = vis & ((j2 <= i2 + off) | (j2 < prefix))
    return vis


@triton.jit
def _row_stats(m0, q_len, st, en, BM: tl.constexpr, NSPANS: tl.constexpr, INSIDE: tl.constexpr):
    """(i_max, all_valid) of rows [m0, m0 + BM): the last valid row (m0 - 1 when none) and whether all
    BM rows are valid (conservative with overlapping spans: only a single containing span counts)."""
    m1 = tl.minimum(m0 + BM, q_len)
    full = m0 + BM <= q_len
    if INSIDE and NSPANS > 0:
        hi = tl.minimum(en, m1) - 1
        i_max = tl.max(tl.where(hi >= tl.maximum(st, m0), hi, m0 - 1), axis=0)
        full = full & (tl.max(((st <= m0) & (en >= m0 + BM)).to(tl.int32), axis=0) > 0)
    else:
        i_max = m1 - 1
    return i_max, full


@triton.jit
def _col_stats(n0, kv_len, st, en, BN: tl.constexpr, NSPANS: tl.constexpr, INSIDE: tl.constexpr):
    """(j_min, all_valid) of columns [n0, n0 + BN): the first valid column (NO_COL when none)."""
    n1 = tl.minimum(n0 + BN, kv_len)
    full = n0 + BN <= kv_len
    if NSPANS > 0:
        if INSIDE:
            lo = tl.maximum(st, n0)
            j = tl.min(tl.where(lo < tl.minimum(en, n1), lo, NO_COL), axis=0)
            full = full & (tl.max(((st <= n0) & (en >= n0 + BN)).to(tl.int32), axis=0) > 0)
        else:
            # Jump over the spans that contain j: after NSPANS jumps j is in no span (each jump leaves one).
            j = n0 + 0 * kv_len
            for _ in tl.static_range(NSPANS):
                j = tl.maximum(j, tl.max(tl.where((st <= j) & (j < en), en, j), axis=0))
            j = tl.where(j < n1, j, NO_COL)
            full = full & (tl.max(((st < n0 + BN) & (en > n0) & (st < en)).to(tl.int32), axis=0) == 0)
    else:
        j = tl.where(n0 < n1, n0, NO_COL)
    return j, full


@triton.jit
def _tile_class(m0, i_max, rows_full, n0, j_min, cols_full, off, prefix,
                BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                CONTIGUOUS: tl.constexpr):
    """(visible, full) of the tile rows [m0, m0+BM) x columns [n0, n0+BN): exact "holds a visible pair"
    from (i_max, j_min) -- the causal term is monotone -- and "every pair visible" (dense masks: never).
    CONTIGUOUS (no span, or one "inside" span): the visible tiles of a row or column of tiles form one
    range, which the loops iterate exactly."""
    visible = (i_max >= m0) & (j_min < NO_COL)
    full = rows_full & cols_full
    if CAUSAL:
        visible = visible & ((j_min <= i_max + off) | (j_min < prefix))
        full = full & ((n0 + BN - 1 <= m0 + off) | (n0 + BN <= prefix))
    if HAS_MASK:
        full = full & False  # stays a tensor (constant-folded): callers count tl.where(full, 0, 1)
    if CONTIGUOUS:
        # Every tile of `_key_range` / `_query_range` is visible: the kernels' `if visible` folds away, so
        # the loop has no branch around its loads and Triton can software-pipeline them.
        visible = visible | True
    return visible, full


@triton.jit
def _key_range(i_max, m0, kv_len, off, prefix, st, en, BN: tl.constexpr, CAUSAL: tl.constexpr,
               NSPANS: tl.constexpr, INSIDE: tl.constexpr):
    """[lo, end) of the key columns rows [m0, i_max] can see; lo a multiple of BN, empty when none. With
    CONTIGUOUS masks (no span, or one "inside" span) every BN tile of it holds a visible pair."""
    end = kv_len
    lo = 0
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(i_max + off + 1, prefix))
    if INSIDE and NSPANS == 1:
        start = tl.max(st, axis=0)  # the one span (the padding entries are 0)
        end = tl.minimum(end, tl.max(en, axis=0))
        lo = (start // BN) * BN
        end = tl.where(start < end, end, 0)
    return lo, tl.where(i_max >= m0, end, 0)


@triton.jit
def _query_range(j_min, q_len, off, prefix, st, en, BM: tl.constexpr, CAUSAL: tl.constexpr,
                 NSPANS: tl.constexpr, INSIDE: tl.constexpr):
    """[lo, end) of the query rows that can see column j_min (the first valid column of a key tile: rows
    that see none of the tile's columns see none of the tile); lo a multiple of BM, empty when none."""
    first = j_min * 0
    end = q_len
    if CAUSAL:  # rows before j_min - off see none of these columns (unless the prefix shows them)
        first = tl.where(j_min < prefix, 0, tl.maximum(j_min - off, 0))
    if INSIDE and NSPANS == 1:
        first = tl.maximum(first, tl.max(st, axis=0))
        end = tl.minimum(end, tl.max(en, axis=0))
    return (first // BM) * BM, tl.where((j_min < NO_COL) & (first < end), end, 0)


@triton.jit
def _dense_mask(mask_ptr, i2, j2, in2, mstride_i, mstride_j, MASK_KIND: tl.constexpr, ACC: tl.constexpr):
    """(visible, bias) of a dense attn_mask tile (bool: 1 = visible; float: the bias to add to the scores,
    -inf hides the pair). `mask_ptr` already points at the (b, h) plane; out-of-range entries are hidden."""
    raw = tl.load(mask_ptr + i2 * mstride_i + j2 * mstride_j, mask=in2, other=0)
    bias = raw.to(ACC)  # used by the caller for float masks only
    if MASK_KIND == 1:
        vis = raw != 0
    else:
        vis = bias != float("-inf")
        bias = tl.where(vis, bias, 0.0)
    return vis, bias


@triton.jit
def _scales(scale_hi, scale_lo, log2e_hi, log2e_lo, ACC: tl.constexpr):
    """(scale, log2 e) in the accumulator's precision, from their fp32 (hi, lo) halves."""
    return tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC), tl.cast(log2e_hi, ACC) + tl.cast(log2e_lo, ACC)


@triton.jit
def _tile_scores(s, full, i2, j2, row_ok2, col_ok2, in2, off, prefix, mask_ptr, smi, smj, log2e,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ACC: tl.constexpr):
    """Scores of a computed tile (scaled, base 2; any orientation: i2/j2 and the masks are broadcastable 2-D
    views) with the float mask's bias added and every invisible pair at -inf, so that 2^(s - m) is 0
    there. The per-element visibility is evaluated only when the tile is not fully visible."""
    if MASK_KIND != 0:
        m_vis, bias = _dense_mask(mask_ptr, i2, j2, in2, smi, smj, MASK_KIND, ACC)
        if MASK_KIND == 2:
            s = s + bias * log2e
    if not full:
        vis = _pair_visible(i2, j2, row_ok2, col_ok2, off, prefix, CAUSAL)
        if MASK_KIND != 0:
            vis = vis & m_vis
        s = tl.where(vis, s, float("-inf"))
    return s


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. UPCAST: operands to fp32 first (exact for fp16/bf16 products; Triton's interpreter
    mis-computes bf16 dots, so the launchers set it there only)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ------------------------------------------------------------------------------------------------
# Launch description shared by the forward and backward launchers
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    """One attention call as the kernels see it: sizes, layout, and `args`, the keyword arguments every
    kernel takes (metadata pointers, dense-mask strides, constexpr flags, the scale)."""
    B: int
    HQ: int
    HKV: int
    SQ: int  # padded: Sq; packed (varlen): max_seqlen_q
    SK: int
    D: int
    varlen: bool
    args: dict
    total_q: int = 0  # packed layout: rows of q

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides of q/k/v/out-like tensors: (B, H, S, D), or (total, H, D) packed."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self) -> tuple[int, int, int]:
        """lse / delta layout: (B, HQ, SQ) padded, (HQ, total_q) packed."""
        return (0, self.total_q, 1) if self.varlen else (self.HQ * self.SQ, self.SQ, 1)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with both fp32-representable (to ~2^-48): kernel float arguments and float literals
    are fp32, and fp64 inputs need the scale and log2(e) to more digits than that."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _common_args(q: torch.Tensor, HQ: int, HKV: int, D: int, causal: bool, scale: float) -> dict:
    (hi, lo), (l2_hi, l2_lo) = _split(scale), _split(1.0 / math.log(2.0))
    return dict(HQ=HQ, GROUP=HQ // HKV, D=D, scale_hi=hi, scale_lo=lo, log2e_hi=l2_hi, log2e_lo=l2_lo, CAUSAL=causal,
                BD=head_block(D),
                ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                UPCAST=triton_interpreting() and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype))


def padded_problem(q, k, meta: dict, attn_mask, scale: float) -> Problem:
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    dummy = q.new_empty(0, dtype=torch.int32)
    spans = meta.get("spans")
    if spans is not None and spans.dim() == 2:
        spans = spans[:, None]
    nspans = 0 if spans is None else spans.shape[1]
    args = _common_args(q, HQ, HKV, D, bool(meta.get("causal")), scale)
    args.update(CU_Q=dummy, CU_K=dummy, SQ=SQ, SK=SK, VARLEN=False)
    for name, key in (("QLEN", "q_lengths"), ("KVLEN", "kv_lengths"), ("PREFIX", "prefix_lengths")):
        t = meta.get(key)
        args[name] = dummy if t is None else t
        args["HAS_" + name] = t is not None
    inside = meta.get("span_mode", "inside") == "inside"
    args.update(SPANS=dummy if spans is None else spans.contiguous(), NSPANS=nspans, INSIDE=inside,
                NSP=max(2, triton.next_power_of_2(max(nspans, 1))), CONTIGUOUS=nspans == 0 or (inside and nspans == 1))
    if attn_mask is None:
        args.update(MASK=dummy, smb=0, smh=0, smi=0, smj=0, MASK_KIND=0)
    else:
        m = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        smb, smh, smi, smj = m.expand(B, HQ, SQ, SK).stride()
        args.update(MASK=m, smb=smb, smh=smh, smi=smi, smj=smj, MASK_KIND=1 if attn_mask.dtype == torch.bool else 2)
    return Problem(B, HQ, HKV, SQ, SK, D, False, args)


def varlen_problem(q, k, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float) -> Problem:
    total_q, HQ, D = q.shape
    HKV = k.shape[1]
    dummy = q.new_empty(0, dtype=torch.int32)
    args = _common_args(q, HQ, HKV, D, causal, scale)
    args.update(CU_Q=cu_q, CU_K=cu_k, SQ=max_q, SK=max_k, VARLEN=True,
                QLEN=dummy, KVLEN=dummy, PREFIX=dummy, HAS_QLEN=False, HAS_KVLEN=False, HAS_PREFIX=False,
                SPANS=dummy, NSPANS=0, NSP=2, INSIDE=True, CONTIGUOUS=True, MASK=dummy, smb=0, smh=0, smi=0, smj=0, MASK_KIND=0)
    return Problem(cu_q.shape[0] - 1, HQ, HKV, max_q, max_k, D, True, args, total_q)
