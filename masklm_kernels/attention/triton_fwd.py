"""Triton forward of masked attention: FlashAttention-2 online softmax over the key tiles that hold a
visible pair (triton_common.py decides which, from the O(B) metadata, without loading them).

One program per (query tile, batch row x query head); GQA/MQA read the key/value head h // GROUP.
Writes the output (0 for rows with no visible key) and the base-2 log-sum-exp of the scaled scores per
row, log2(sum_j 2^(s_ij * scale * log2 e)) (+inf for those rows, so that the backward's 2^(s - lse) is 0
there whatever s is). Base 2, as FlashAttention's Triton kernels: the backward recomputes P = 2^(s - lse)
from the very same s, so a row with one visible key gets P = 1 exactly (a natural-log lse would be
rounded twice on the way).

Dropout (Flags.DROPOUT): the normaliser sums the probabilities before dropout, the dropped ones are then
zeroed before P @ V and the output scaled by 1 / (1 - p) (FlashAttention-2); the lse is unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import acc_dtype
from .._triton_launch import Launch
from .inputs import NO_DROPOUT, Dropout, Mask
from .triton_common import (
    Lens,
    _alibi_slope,
    _col_stats,
    _cols_ok,
    _dot,
    _dropout_keep,
    _dropout_key,
    _dropout_rescale,
    _key_range,
    _plane,
    _row,
    _row_stats,
    _rows_ok,
    _store_counts,
    _tile_class,
    _tile_scores,
    _tokens,
    _tokens_t,
)
from .triton_host import Problem, block_config, tile_counter


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _attn_fwd(Q, K, V, O, LSE, COUNTS, sq_, sk_, sv_, so_, sl_, meta, SQ, SK, TQ, TK, F: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr):
    """Arguments: the tensors, their (batch, head, token) strides, then the bundles of triton_common.py."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    r = _row(meta, Lens(SQ, SK, TQ, TK), F, b)
    m0 = pid_m * BM
    if m0 >= r.sq:  # packed layout: the grid covers max_seqlen_q
        return
    scale_log2 = r.scale * r.log2e
    hk = h // meta.GROUP

    rows = m0 + tl.arange(0, BM)
    dcol = tl.arange(0, F.BD)
    row_in = rows < r.sq
    d_in = dcol < meta.D
    q_ptr = _plane(Q, sq_, b, h, r.q0)
    k_ptr = _plane(K, sk_, b, hk, r.k0)
    v_ptr = _plane(V, sv_, b, hk, r.k0)
    mask_ptr = meta.MASK + b.to(tl.int64) * meta.smb + h.to(tl.int64) * meta.smh
    rows64 = rows.to(tl.int64)  # offsets in 64 bits: max_seqlen x heads x head_dim may pass 2^31 (varlen)
    q = _tokens(q_ptr, rows, sq_[2], dcol, row_in, d_in)
    if F.DROPOUT != 0:
        dkey = _dropout_key(meta, b, h, F)

    row_ok = _rows_ok(rows, r, F)
    i_min, i_max, rows_full = _row_stats(m0, r, BM, F)
    n_lo, n_end = _key_range(i_min, i_max, m0, r, BN, F)
    slope = _alibi_slope(meta, b, h, r, F)

    m_i = tl.full([BM], float("-inf"), F.ACC)
    l_i = tl.zeros([BM], F.ACC)
    acc = tl.zeros([BM, F.BD], F.ACC)
    count = pid_m * 0
    masked = pid_m * 0
    for n0 in range(n_lo, n_end, BN):
        j_min, j_max, cols_full = _col_stats(n0, r, BN, F)
        visible, full = _tile_class(m0, i_min, i_max, rows_full, n0, j_min, j_max, cols_full, r, BM, BN, F)
        if visible:
            cols = n0 + tl.arange(0, BN)
            col_in = cols < r.sk
            kt = _tokens_t(k_ptr, cols, sk_[2], dcol, col_in, d_in)
            s = _dot(q, kt, tl.zeros([BM, BN], F.ACC), F.UPCAST, F.PRECISION) * scale_log2
            # values no query may see (padding, outside the spans) are never loaded: whatever they hold (NaN,
            # inf) cannot reach an output (their scores are -inf whatever the keys hold); col_ok implies col_in
            col_ok = _cols_ok(cols, r, F)
            s = _tile_scores(s, full, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :],
                             row_in[:, None] & col_in[None, :], r, mask_ptr, slope, meta, F)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser of the probabilities before dropout
            if F.DROPOUT != 0:
                p = tl.where(_dropout_keep(dkey, rows[:, None], cols[None, :], meta), p, 0.0)
            v = _tokens(v_ptr, cols, sv_[2], dcol, col_ok, d_in)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], F.UPCAST, F.PRECISION)
            m_i = m_new
            count += 1
            masked += tl.where(full, 0, 1)

    alive = l_i > 0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    if F.DROPOUT != 0:
        out = out * _dropout_rescale(meta, F)
    lse = tl.where(alive, m_i + tl.math.log2(l_safe), float("inf"))  # base 2: what the backward recomputes P with
    tl.store(_plane(O, so_, b, h, r.q0) + rows64[:, None] * so_[2] + dcol[None, :], out.to(O.dtype.element_ty),
             mask=row_in[:, None] & d_in[None, :])
    tl.store(_plane(LSE, sl_, b, h, r.q0) + rows64 * sl_[2], lse.to(LSE.dtype.element_ty), mask=row_in)
    if F.COUNT:
        _store_counts(COUNTS, pid_m, b, h, count, masked)


def forward_launch(prob: Problem, q, k, v, out, lse) -> Launch:
    cfg = block_config("fwd", prob.D, q.dtype, prob.flags.MASK_KIND != 0, prob.flags.DROPOUT != 0)
    grid = (triton.cdiv(prob.SQ, cfg.block_m), prob.B, prob.HQ)  # (B, H) on axes 1, 2: each below 65536
    counts = tile_counter("fwd", cfg, grid[0] * grid[1] * grid[2], q.device)
    args = (q, k, v, out, lse, counts if counts is not None else prob.meta.CU_Q,
            prob.strides(q), prob.strides(k), prob.strides(v), prob.strides(out), prob.lse_strides(),
            *prob.bundles(counts is not None))
    return Launch(_attn_fwd, grid, args, dict(BM=cfg.block_m, BN=cfg.block_n), cfg)


def forward(q, k, v, mask: Mask, scale: float, dropout: Dropout = NO_DROPOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32 (fp64 for fp64)); q, k, v contiguous in the last dim."""
    B, HQ, SQ, _ = q.shape
    prob = Problem.from_padded(q, k, mask, scale, dropout)
    out = torch.empty_like(q)
    lse = torch.empty(B, HQ, SQ, dtype=acc_dtype(q), device=q.device)
    forward_launch(prob, q, k, v, out, lse)()
    return out, lse


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, left: int, right: int,
                   alibi, scale: float, dropout: Dropout = NO_DROPOUT):
    """Packed layout: (out (total_q, Hq, D), lse (Hq, total_q))."""
    prob = Problem.from_varlen(q, k, cu_q, cu_k, max_q, max_k, causal, left, right, alibi, scale, dropout)
    out = torch.zeros_like(q)  # tokens outside every sequence of cu_seqlens (bad metadata) read 0, not garbage
    lse = torch.empty(q.shape[1], q.shape[0], dtype=acc_dtype(q), device=q.device)
    forward_launch(prob, q, k, v, out, lse)()
    return out, lse


@triton.jit(do_not_specialize=["SQ", "SK"])
def _dropout_mask(KEEP, meta, SQ, SK, F: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """KEEP (B, H, SQ, SK) uint8: the keep mask of attention dropout, from the helpers the attention
    kernels use (the debug path of `dropout.dropout_mask`). One program per BM x BN tile (axis 0: tile
    row-major; no loop bounded by a runtime size, which Triton 3.6's interpreter cannot run)."""
    tiles_n = tl.cdiv(SK, BN)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    b = tl.program_id(1)
    h = tl.program_id(2)
    key = _dropout_key(meta, b, h, F)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    plane = KEEP + (b.to(tl.int64) * tl.num_programs(2) + h) * SQ * SK
    keep = _dropout_keep(key, rows[:, None], cols[None, :], meta)
    tl.store(plane + rows.to(tl.int64)[:, None] * SK + cols[None, :], keep.to(tl.uint8),
             mask=(rows < SQ)[:, None] & (cols < SK)[None, :])


def keep_mask(dropout: Dropout, batch: int, heads: int, seq_q: int, seq_k: int, device) -> torch.Tensor:
    """(batch, heads, seq_q, seq_k) bool: the pairs the Triton kernels keep."""
    stand_in = torch.empty(1, 1, 1, 1, device=device).expand(batch, heads, seq_q, 16)  # shapes only
    prob = Problem.from_padded(stand_in, stand_in, Mask(), 1.0, dropout)
    keep = torch.empty(batch, heads, seq_q, seq_k, dtype=torch.uint8, device=device)
    if keep.numel():
        grid = (triton.cdiv(seq_q, 32) * triton.cdiv(seq_k, 64), batch, heads)
        _dropout_mask[grid](keep, prob.meta, seq_q, seq_k, prob.bundles(False)[-1], BM=32, BN=64)
    return keep.view(torch.bool)
