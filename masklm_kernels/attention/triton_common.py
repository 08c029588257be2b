"""Device side shared by the Triton attention kernels (triton_fwd.py, triton_bwd.py): `@triton.jit` helpers.

Visibility from O(B) metadata, two levels (docs/SEMANTICS.md, "Attention"). A pair (i, j) of batch row
b is visible when

    row_ok(i) & col_ok(j) & (not causal | j <= i + off | j < prefix)

with off = kv_len - q_len when both lengths are given (and in the packed layout, whose per-sequence
lengths are both), else Sk - Sq (masks.py: the diagonal is bottom-right aligned on the real lengths)

with row_ok(i) = i < q_len [& i in a span, "inside"], col_ok(j) = j < kv_len [& j in a span, "inside" |
& j in no span, "outside"] (q_len, kv_len clipped to the row's lengths). The causal term is monotone
in i and j, so a BM x BN tile holds a visible pair exactly when its last valid row i_max and its first
valid column j_min form one: `_tile_class` decides that from two scalars per side, O(#spans) work, and
the kernels skip the tile without loading it. Tiles whose every pair is visible ("full") skip the
per-element mask; the rest apply `_pair_visible` to the scores. `attn_mask` (dense) is applied per
element on every computed tile and never makes a tile skippable.

Kernel arguments. Every attention kernel takes the same three bundles (named tuples, so that a kernel
states its signature once and an option is added in one place): `Meta`, the runtime values (metadata
pointers, dense-mask strides, head counts, scale); the sequence sizes SQ, SK, TQ, TK, plain arguments that
are never specialised (one compilation serves every length; Triton would specialise a tuple's elements),
which the kernels bundle as `Lens`; and `Flags`, the compile-time switches (one constexpr argument). The
prologue `_row` derives from them what a program needs of its batch row (`Row`, as FlashAttention's
SeqlenInfo), and the helpers below take that `Row` and the `Flags`.

The host side (tile configurations, launch description, tile recorder) is triton_host.py.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .inputs import DROPOUT_DOMAIN as DROPOUT_DOMAIN_VALUE


class Meta(NamedTuple):
    """Runtime arguments of every kernel (triton_host.Problem builds them once per call)."""
    CU_Q: Any  # packed layout: (B + 1,) int32 cu_seqlens of the queries / keys; else a dummy
    CU_K: Any
    QLEN: Any  # (B,) int32 per-row query / key / prefix lengths, or a dummy (the Flags say which)
    KVLEN: Any
    PREFIX: Any
    SPANS: Any  # (B, NSPANS, 2) int32 [start, end) spans, or a dummy
    MASK: Any  # dense attn_mask (uint8 view of bool, or float), or a dummy
    smb: Any  # its (b, h, i, j) strides (0 on broadcast axes)
    smh: Any
    smi: Any
    smj: Any
    HQ: Any  # query heads
    GROUP: Any  # query heads per key/value head (GQA)
    D: Any  # head dim
    scale_hi: Any  # softmax scale and log2(e) as fp32 (hi, lo) pairs: exact in fp64, rounded once in fp32
    scale_lo: Any
    log2e_hi: Any
    log2e_lo: Any
    DSEED: Any  # dropout: 0-dim int64 seed and offset, (B,) int64 sample keys (or dummies; the Flags say)
    DOFFSET: Any
    DSAMPLE: Any
    drop_thr: Any  # keep threshold floor(p 2^32) - 2^31 (the random word is compared as int32 after the same shift)
    drop_rs_hi: Any  # 1 / (1 - p) as an fp32 (hi, lo) pair
    drop_rs_lo: Any
    WLEFT: Any  # sliding window (left, right) sides (the Flags say which are bounded)
    WRIGHT: Any
    ALIBI: Any  # (B, HQ) fp32 ALiBi slopes, or a dummy


class Lens(NamedTuple):
    """Sequence sizes: SQ, SK the padded lengths (packed: max_seqlen_q / _k, what the grid covers), TQ, TK
    the packed layout's token counts (0 when padded)."""
    SQ: Any
    SK: Any
    TQ: Any
    TK: Any


class Flags(NamedTuple):
    """Compile-time switches of every kernel, passed as one constexpr."""
    BD: int  # power-of-two head-dim block
    CAUSAL: bool
    HAS_QLEN: bool
    HAS_KVLEN: bool
    HAS_PREFIX: bool
    NSPANS: int  # spans per row (0: none)
    NSP: int  # power of two >= max(NSPANS, 2): the span vectors' length
    INSIDE: bool  # span mode "inside" (else "outside")
    CONTIGUOUS: bool  # no span or one "inside" span: the visible tiles of a tile row / column form one range
    MASK_KIND: int  # dense attn_mask: 0 none, 1 bool, 2 float
    VARLEN: bool  # packed layout
    COUNT: bool  # write the tile counters (record_tiles)
    DROPOUT: int  # attention dropout: 0 off, 1 keyed by the batch row, 2 by the sample ids of DSAMPLE
    HAS_WLEFT: bool  # sliding window bounded on the left: j >= i + off - WLEFT
    HAS_WRIGHT: bool  # and on the right: j <= i + off + WRIGHT
    ALIBI: bool  # ALiBi score bias -slope * |i + off - j|
    ACC: Any  # accumulator dtype (tl.float32, tl.float64 for fp64)
    UPCAST: bool  # dots in fp32 (the interpreter's bf16 dots are wrong)
    PRECISION: str  # tl.dot input precision


class Row(NamedTuple):
    """What a program knows of its batch row after the prologue."""
    q0: Any  # first query / key token (packed layout; 0 padded)
    sq: Any  # query / key rows of this batch row (packed: its own lengths, clamped)
    k0: Any
    sk: Any
    q_len: Any  # valid query / key rows (clipped to sq / sk)
    kv_len: Any
    prefix: Any
    st: Any  # its spans as two NSP-vectors (empty spans pad)
    en: Any
    off: Any  # causal diagonal: key j visible to query i when j <= i + off (and the window's centre)
    wl: Any  # window sides (when bounded)
    wr: Any
    scale: Any  # in the accumulator's precision
    log2e: Any

# Sentinel "no valid column" for j_min; any real column index is below it.
NO_COL = tl.constexpr(1 << 30)


@triton.jit
def _seq_info(cu_q, cu_k, b, SQ, SK, TQ, TK, VARLEN: tl.constexpr):
    """(first token, length) of batch row b's queries and keys: packed rows from cu_seqlens, else padded.
    cu_seqlens on a GPU are not checked on the host (a synchronisation): each bound is clamped to
    [previous bound, TQ / TK tokens] and each length to max_seqlen (SQ / SK, what the grid covers), so that
    no value of cu_seqlens makes a kernel touch memory outside q, k, v and their gradients."""
    if VARLEN:
        q0 = tl.minimum(tl.maximum(tl.load(cu_q + b).to(tl.int32), 0), TQ)
        k0 = tl.minimum(tl.maximum(tl.load(cu_k + b).to(tl.int32), 0), TK)
        sq = tl.minimum(tl.minimum(tl.maximum(tl.load(cu_q + b + 1).to(tl.int32), q0), TQ) - q0, SQ)
        sk = tl.minimum(tl.minimum(tl.maximum(tl.load(cu_k + b + 1).to(tl.int32), k0), TK) - k0, SK)
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
def _diagonal(sq, sk, q_len, kv_len, HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """The causal offset off (key j visible to row i when j <= i + off): bottom-right on the row's real
    lengths when both are given, else on the sizes (packed rows: the sequence's own lengths)."""
    if HAS_QLEN and HAS_KVLEN:
        return kv_len - q_len
    return sk - sq


@triton.jit
def _row(meta, lens, F, b):
    """The prologue of every kernel: batch row b's `Row`."""
    q0, sq, k0, sk = _seq_info(meta.CU_Q, meta.CU_K, b, lens.SQ, lens.SK, lens.TQ, lens.TK, F.VARLEN)
    q_len, kv_len, prefix, st, en = _row_meta(b, sq, sk, meta.QLEN, meta.KVLEN, meta.PREFIX, meta.SPANS,
                                              F.HAS_QLEN, F.HAS_KVLEN, F.HAS_PREFIX, F.NSPANS, F.NSP)
    off = _diagonal(sq, sk, q_len, kv_len, F.HAS_QLEN, F.HAS_KVLEN)
    scale, log2e = _scales(meta.scale_hi, meta.scale_lo, meta.log2e_hi, meta.log2e_lo, F.ACC)
    return Row(q0, sq, k0, sk, q_len, kv_len, prefix, st, en, off, meta.WLEFT, meta.WRIGHT, scale, log2e)


@triton.jit
def _plane(T, strides, b, h, t0):
    """Pointer to token t0 of head h of batch row b of a q/k/v/o-like tensor; `strides` (batch, head,
    token). 64-bit: B x H x S x D may pass 2^31 elements."""
    return T + b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1] + t0.to(tl.int64) * strides[2]


@triton.jit
def _tokens(ptr, idx, stride, dcol, ok, d_in):
    """The (len(idx), BD) block of tokens `idx` from `ptr` (a `_plane`), `stride` apart; rows not `ok` and
    columns past the head dim read 0 (never loaded). 64-bit offsets."""
    return tl.load(ptr + idx.to(tl.int64)[:, None] * stride + dcol[None, :], mask=ok[:, None] & d_in[None, :],
                   other=0.0)


@triton.jit
def _tokens_t(ptr, idx, stride, dcol, ok, d_in):
    """`_tokens` transposed: (BD, len(idx))."""
    return tl.load(ptr + idx.to(tl.int64)[None, :] * stride + dcol[:, None], mask=d_in[:, None] & ok[None, :],
                   other=0.0)


@triton.jit
def _store_counts(COUNTS, pid, b, h, count, masked):
    """The tile recorder's two counters of program (pid, b, h): computed tiles, then masked ones."""
    slot = (b * tl.num_programs(2) + h) * tl.num_programs(0) + pid
    tl.store(COUNTS + slot, count)
    tl.store(COUNTS + tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2) + slot, masked)


@triton.jit
def _in_spans(x, st, en):
    """Bool vector: x (1-D positions) lies in one of the spans [st, en)."""
    hit = (x[:, None] >= st[None, :]) & (x[:, None] < en[None, :])
    return tl.max(hit.to(tl.int32), axis=1) > 0


@triton.jit
def _rows_ok(i, r, F):
    ok = i < r.q_len
    if F.INSIDE and F.NSPANS > 0:
        ok = ok & _in_spans(i, r.st, r.en)
    return ok


@triton.jit
def _cols_ok(j, r, F):
    ok = j < r.kv_len
    if F.NSPANS > 0:
        hit = _in_spans(j, r.st, r.en)
        if F.INSIDE:
            ok = ok & hit
        else:
            ok = ok & (hit == 0)
    return ok


@triton.jit
def _pair_visible(i2, j2, row_ok2, col_ok2, r, F):
    """Element visibility of a tile; i2/j2 and the ok masks are already broadcastable 2-D views."""
    vis = row_ok2 & col_ok2
    if F.CAUSAL:
        vis = vis & ((j2 <= i2 + r.off) | (j2 < r.prefix))
    if F.HAS_WLEFT:
        vis = vis & (j2 >= i2 + r.off - r.wl)
    if F.HAS_WRIGHT:
        vis = vis & (j2 <= i2 + r.off + r.wr)
    return vis


@triton.jit
def _row_stats(m0, r, BM: tl.constexpr, F):
    """(i_min, i_max, all_valid) of rows [m0, m0 + BM): the first and last valid rows (i_max = m0 - 1 when
    none) and whether all BM rows are valid (conservative with overlapping spans: only a single containing
    span counts)."""
    m1 = tl.minimum(m0 + BM, r.q_len)
    full = m0 + BM <= r.q_len
    i_min = m0
    if F.INSIDE and F.NSPANS > 0:
        hi = tl.minimum(r.en, m1) - 1
        lo = tl.maximum(r.st, m0)
        i_max = tl.max(tl.where(hi >= lo, hi, m0 - 1), axis=0)
        i_min = tl.min(tl.where(hi >= lo, lo, m0 + BM), axis=0)
        full = full & (tl.max(((r.st <= m0) & (r.en >= m0 + BM)).to(tl.int32), axis=0) > 0)
    else:
        i_max = m1 - 1
    return i_min, i_max, full


@triton.jit
def _col_stats(n0, r, BN: tl.constexpr, F):
    """(j_min, j_max, all_valid) of columns [n0, n0 + BN): the first valid column (NO_COL when none) and the
    last (an upper bound with "outside" spans, which only makes the window's tile test conservative)."""
    n1 = tl.minimum(n0 + BN, r.kv_len)
    full = n0 + BN <= r.kv_len
    st = r.st
    en = r.en
    j_max = n1 - 1
    if F.NSPANS > 0:
        if F.INSIDE:
            lo = tl.maximum(st, n0)
            hi = tl.minimum(en, n1)
            j = tl.min(tl.where(lo < hi, lo, NO_COL), axis=0)
            j_max = tl.max(tl.where(lo < hi, hi - 1, -1), axis=0)
            full = full & (tl.max(((st <= n0) & (en >= n0 + BN)).to(tl.int32), axis=0) > 0)
        else:
            # Jump over the spans that contain j: after NSPANS jumps j is in no span (each jump leaves one).
            j = n0 + 0 * r.kv_len
            for _ in tl.static_range(F.NSPANS):
                j = tl.maximum(j, tl.max(tl.where((st <= j) & (j < en), en, j), axis=0))
            j = tl.where(j < n1, j, NO_COL)
            full = full & (tl.max(((st < n0 + BN) & (en > n0) & (st < en)).to(tl.int32), axis=0) == 0)
    else:
        j = tl.where(n0 < n1, n0, NO_COL)
    return j, j_max, full


@triton.jit
def _tile_class(m0, i_min, i_max, rows_full, n0, j_min, j_max, cols_full, r, BM: tl.constexpr, BN: tl.constexpr, F):
    """(visible, full) of the tile rows [m0, m0+BM) x columns [n0, n0+BN): "holds a visible pair" from
    (i_max, j_min) -- the causal and right-window terms are monotone -- and (i_min, j_max) -- the
    left-window term -- exact when the valid rows and columns of the tile are contiguous (no span, or one
    "inside" span: row i sees the column interval [i + off - left, min(i + off + right, causal end)], whose
    ends never decrease with i, so the rows [i_min, i_max] see one interval), conservative otherwise; and
    "every pair visible" (dense masks: never). CONTIGUOUS: the visible tiles of a row or column of tiles
    form one range, which the loops iterate exactly."""
    visible = (i_max >= m0) & (j_min < NO_COL)
    full = rows_full & cols_full
    if F.CAUSAL:
        visible = visible & ((j_min <= i_max + r.off) | (j_min < r.prefix))
        full = full & ((n0 + BN - 1 <= m0 + r.off) | (n0 + BN <= r.prefix))
    if F.HAS_WLEFT:
        visible = visible & (j_max >= i_min + r.off - r.wl)
        full = full & (n0 >= m0 + BM - 1 + r.off - r.wl)
    if F.HAS_WRIGHT:
        visible = visible & (j_min <= i_max + r.off + r.wr)
        full = full & (n0 + BN - 1 <= m0 + r.off + r.wr)
    if F.MASK_KIND != 0:
        full = full & False  # stays a tensor (constant-folded): callers count tl.where(full, 0, 1)
    if F.CONTIGUOUS:
        # Every tile of `_key_range` / `_query_range` is visible: the kernels' `if visible` folds away, so
        # the loop has no branch around its loads and Triton can software-pipeline them.
        visible = visible | True
    return visible, full


@triton.jit
def _key_range(i_min, i_max, m0, r, BN: tl.constexpr, F):
    """[lo, end) of the key columns rows [i_min, i_max] can see; lo a multiple of BN, empty when none. With
    CONTIGUOUS masks (no span, or one "inside" span) every BN tile of it holds a visible pair."""
    end = r.kv_len
    start = i_min * 0
    if F.CAUSAL:
        end = tl.minimum(end, tl.maximum(i_max + r.off + 1, r.prefix))
    if F.HAS_WRIGHT:
        end = tl.minimum(end, i_max + r.off + r.wr + 1)
    if F.HAS_WLEFT:
        start = tl.maximum(start, i_min + r.off - r.wl)
    if F.INSIDE and F.NSPANS == 1:
        start = tl.maximum(start, tl.max(r.st, axis=0))  # the one span (the padding entries are 0)
        end = tl.minimum(end, tl.max(r.en, axis=0))
    end = tl.where((i_max >= m0) & (start < end), end, 0)
    return (start // BN) * BN, end


@triton.jit
def _query_range(j_min, j_max, r, BM: tl.constexpr, F):
    """[lo, end) of the query rows that can see a column of [j_min, j_max] (the first and last valid
    columns of a key tile); lo a multiple of BM, empty when none."""
    first = j_min * 0
    end = r.q_len
    if F.CAUSAL:  # rows before j_min - off see none of these columns (unless the prefix shows them)
        first = tl.where(j_min < r.prefix, 0, tl.maximum(j_min - r.off, 0))
    if F.HAS_WRIGHT:  # rows before j_min - off - right end their window before the tile
        first = tl.maximum(first, j_min - r.off - r.wr)
    if F.HAS_WLEFT:  # rows after j_max - off + left start theirs after it
        end = tl.minimum(end, j_max - r.off + r.wl + 1)
    if F.INSIDE and F.NSPANS == 1:
        first = tl.maximum(first, tl.max(r.st, axis=0))
        end = tl.minimum(end, tl.max(r.en, axis=0))
    first = tl.maximum(first, 0)
    return (first // BM) * BM, tl.where((j_min < NO_COL) & (first < end), end, 0)


@triton.jit
def _dense_mask(mask_ptr, i2, j2, in2, mstride_i, mstride_j, MASK_KIND: tl.constexpr, ACC: tl.constexpr):
    """(visible, bias) of a dense attn_mask tile (bool: 1 = visible; float: the bias to add to the scores,
    -inf hides the pair). `mask_ptr` already points at the (b, h) plane; out-of-range entries are hidden."""
    raw = tl.load(mask_ptr + i2.to(tl.int64) * mstride_i + j2.to(tl.int64) * mstride_j, mask=in2, other=0)
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
def _alibi_slope(meta, b, h, r, F):
    """ALiBi slope of (b, h) in base-2 score units (0 without ALiBi)."""
    slope = r.log2e * 0
    if F.ALIBI:
        slope = tl.load(meta.ALIBI + b.to(tl.int64) * meta.HQ + h).to(F.ACC) * r.log2e
    return slope


@triton.jit
def _tile_scores(s, full, i2, j2, row_ok2, col_ok2, in2, r, mask_ptr, slope2, meta, F):
    """Scores of a computed tile (scaled, base 2; any orientation: i2/j2 and the masks are broadcastable 2-D
    views) with the ALiBi and float mask biases added and every invisible pair at -inf, so that 2^(s - m)
    is 0 there. The per-element visibility is evaluated only when the tile is not fully visible.
    `mask_ptr` points at the dense mask's (b, h) plane, `slope2` is `_alibi_slope`."""
    if F.ALIBI:
        s = s - slope2 * tl.abs(i2 + r.off - j2).to(F.ACC)
    if F.MASK_KIND != 0:
        m_vis, bias = _dense_mask(mask_ptr, i2, j2, in2, meta.smi, meta.smj, F.MASK_KIND, F.ACC)
        if F.MASK_KIND == 2:
            s = s + bias * r.log2e
    if not full:
        vis = _pair_visible(i2, j2, row_ok2, col_ok2, r, F)
        if F.MASK_KIND != 0:
            vis = vis & m_vis
        s = tl.where(vis, s, float("-inf"))
    return s


DROPOUT_DOMAIN = tl.constexpr(DROPOUT_DOMAIN_VALUE)


@triton.jit
def _dropout_key(meta, b, h, F):
    """Philox key (as one uint64, lo | hi << 32) of the dropout mask of batch row b and query head h:
    words 0, 1 of Philox at counter (h | DOMAIN << 24, offset, sample lo, sample hi) under the seed
    (inputs.Dropout; the same arithmetic as csrc/attention/dropout.h)."""
    seed = tl.load(meta.DSEED)
    offset = tl.load(meta.DOFFSET)
    if F.DROPOUT == 2:
        sample = tl.load(meta.DSAMPLE + b)
    else:
        sample = b.to(tl.int64)
    c0 = (h | (DROPOUT_DOMAIN << 24)).to(tl.uint32)
    w0, w1, _, _ = tl.random.philox(seed, c0, offset.to(tl.uint32), sample.to(tl.uint32), (sample >> 32).to(tl.uint32))
    return w0.to(tl.uint64) | (w1.to(tl.uint64) << 32)


@triton.jit
def _dropout_keep(key, i2, j2, meta):
    """Kept pairs of a tile (i2 / j2: broadcastable 2-D row / column views, either orientation): word j mod 4
    of Philox at counter (j div 4, i, 0, 0) under `key` >= floor(p 2^32), compared as int32 after flipping
    the top bit of both sides (an unsigned compare without 64-bit arithmetic). Each element draws its own
    Philox call here (four neighbours compute the same one: a shuffle to share it would cost a layout
    conversion of the tile)."""
    j = j2 + i2 * 0
    c0 = (j >> 2).to(tl.uint32)
    c1 = (i2 + j2 * 0).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.random.philox(key, c0, c1, zero, zero)
    sel = j & 3
    w = tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))
    return (w.to(tl.int32, bitcast=True) ^ -2147483648) >= meta.drop_thr


@triton.jit
def _dropout_rescale(meta, F):
    """1 / (1 - p) in the accumulator's precision."""
    return tl.cast(meta.drop_rs_hi, F.ACC) + tl.cast(meta.drop_rs_lo, F.ACC)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. UPCAST: operands to fp32 first (exact for fp16/bf16 products; Triton's interpreter
    mis-computes bf16 dots, so the launchers set it there only). out_dtype is the accumulator's: Triton 3.6
    checks it against an fp64 accumulator (interpreter) instead of deriving it."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
