"""Triton backward of masked attention, FlashAttention-2 style and deterministic (no atomics):

1. `_bwd_preprocess`: delta_i = rowsum(dO_i * O_i) per query row;
2. `_bwd_dkdv`: one program per (key tile, batch row x key/value head) accumulates dK and dV over the
   query tiles that see it, for every query head of its GQA group, in a fixed order;
3. `_bwd_dq`: one program per (query tile, batch row x query head) accumulates dQ over the key tiles.

Both main kernels visit exactly the tiles that hold a visible pair (triton_common.py) and recompute the
probabilities from the forward's log-sum-exp (+inf on rows with no visible key: their P is 0).
With dropout (Flags.DROPOUT) each tile regenerates the forward's keep mask Z (scaled by 1 / (1 - p)):
dV += (P o Z)^T dO, dP = (dO V^T) o Z, dS = P o (dP - delta), delta = rowsum(dO o O) as without.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    _query_range,
    _row,
    _row_stats,
    _rows_ok,
    _seq_info,
    _store_counts,
    _tile_class,
    _tile_scores,
    _tokens,
    _tokens_t,
)
from .triton_host import Problem, block_config, tile_counter


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _bwd_preprocess(O, DO, DELTA, so_, sd_, sl_, meta, SQ, SK, TQ, TK, F: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, sq, k0, sk = _seq_info(meta.CU_Q, meta.CU_K, b, SQ, SK, TQ, TK, F.VARLEN)
    rows = pid_m * BM + tl.arange(0, BM)
    dcol = tl.arange(0, F.BD)
    row_in = rows < sq
    d_in = dcol < meta.D
    o = _tokens(_plane(O, so_, b, h, q0), rows, so_[2], dcol, row_in, d_in)
    do = _tokens(_plane(DO, sd_, b, h, q0), rows, sd_[2], dcol, row_in, d_in)
    delta = tl.sum(o.to(F.ACC) * do.to(F.ACC), axis=1)
    tl.store(_plane(DELTA, sl_, b, h, q0) + rows.to(tl.int64) * sl_[2], delta, mask=row_in)


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, COUNTS, sq_, sk_, sv_, sd_, sl_, meta, SQ, SK, TQ, TK, F: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr):
    """dK, dV of one key tile; DK and DV share k's strides (they are allocated like k), DO q's layout
    with its own strides, DELTA lse's."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    r = _row(meta, Lens(SQ, SK, TQ, TK), F, b)
    n0 = pid_n * BN
    if n0 >= r.sk:
        return
    scale_log2 = r.scale * r.log2e

    cols = n0 + tl.arange(0, BN)
    dcol = tl.arange(0, F.BD)
    col_in = cols < r.sk
    d_in = dcol < meta.D
    cols64 = cols.to(tl.int64)
    # keys and query rows no pair uses (padding, outside the spans) are never loaded (see the forward)
    col_ok = _cols_ok(cols, r, F)
    k = _tokens(_plane(K, sk_, b, hk, r.k0), cols, sk_[2], dcol, col_ok, d_in)
    v = _tokens(_plane(V, sv_, b, hk, r.k0), cols, sv_[2], dcol, col_ok, d_in)
    j_min, j_max, cols_full = _col_stats(n0, r, BN, F)
    m_start, m_end = _query_range(j_min, j_max, r, BM, F)
    if F.DROPOUT != 0:
        rescale = _dropout_rescale(meta, F)

    dk = tl.zeros([BN, F.BD], F.ACC)
    dv = tl.zeros([BN, F.BD], F.ACC)
    count = pid_n * 0
    masked = pid_n * 0
    for g in range(meta.GROUP):
        h = hk * meta.GROUP + g
        q_ptr = _plane(Q, sq_, b, h, r.q0)
        do_ptr = _plane(DO, sd_, b, h, r.q0)
        lse_ptr = _plane(LSE, sl_, b, h, r.q0)
        delta_ptr = _plane(DELTA, sl_, b, h, r.q0)
        mask_ptr = meta.MASK + b.to(tl.int64) * meta.smb + h.to(tl.int64) * meta.smh
        slope = _alibi_slope(meta, b, h, r, F)
        if F.DROPOUT != 0:
            dkey = _dropout_key(meta, b, h, F)
        for m0 in range(m_start, m_end, BM):
            i_min, i_max, rows_full = _row_stats(m0, r, BM, F)
            visible, full = _tile_class(m0, i_min, i_max, rows_full, n0, j_min, j_max, cols_full, r, BM, BN, F)
            if visible:
                rows = m0 + tl.arange(0, BM)
                rows64 = rows.to(tl.int64)
                row_in = rows < r.sq
                row_ok = _rows_ok(rows, r, F)  # implies row_in
                q = _tokens(q_ptr, rows, sq_[2], dcol, row_ok, d_in)
                do = _tokens(do_ptr, rows, sd_[2], dcol, row_ok, d_in)
                lse2 = tl.load(lse_ptr + rows64 * sl_[2], mask=row_ok, other=float("inf")).to(F.ACC)
                delta = tl.load(delta_ptr + rows64 * sl_[2], mask=row_ok, other=0.0).to(F.ACC)
                s = _dot(k, tl.trans(q), tl.zeros([BN, BM], F.ACC), F.UPCAST, F.PRECISION) * scale_log2  # S^T
                s = _tile_scores(s, full, rows[None, :], cols[:, None], row_ok[None, :], col_ok[:, None],
                                 col_in[:, None] & row_in[None, :], r, mask_ptr, slope, meta, F)
                p = tl.math.exp2(s - lse2[None, :])
                dp = _dot(v, tl.trans(do), tl.zeros([BN, BM], F.ACC), F.UPCAST, F.PRECISION)
                if F.DROPOUT != 0:
                    keep = _dropout_keep(dkey, rows[None, :], cols[:, None], meta)
                    dv = _dot(tl.where(keep, p * rescale, 0.0).to(do.dtype), do, dv, F.UPCAST, F.PRECISION)
                    dp = tl.where(keep, dp * rescale, 0.0)
                else:
                    dv = _dot(p.to(do.dtype), do, dv, F.UPCAST, F.PRECISION)
                ds = p * (dp - delta[None, :])
                dk = _dot(ds.to(q.dtype), q, dk, F.UPCAST, F.PRECISION)
                count += 1
                masked += tl.where(full, 0, 1)
    dk = dk * r.scale
    out_off = cols64[:, None] * sk_[2] + dcol[None, :]
    tl.store(_plane(DK, sk_, b, hk, r.k0) + out_off, dk.to(DK.dtype.element_ty), mask=col_in[:, None] & d_in[None, :])
    tl.store(_plane(DV, sk_, b, hk, r.k0) + out_off, dv.to(DV.dtype.element_ty), mask=col_in[:, None] & d_in[None, :])
    if F.COUNT:
        _store_counts(COUNTS, pid_n, b, hk, count, masked)


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, COUNTS, sq_, sk_, sv_, sd_, sl_, meta, SQ, SK, TQ, TK, F: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr):
    """dQ of one query tile; DQ shares q's strides."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    r = _row(meta, Lens(SQ, SK, TQ, TK), F, b)
    m0 = pid_m * BM
    if m0 >= r.sq:
        return
    scale_log2 = r.scale * r.log2e
    hk = h // meta.GROUP

    rows = m0 + tl.arange(0, BM)
    dcol = tl.arange(0, F.BD)
    row_in = rows < r.sq
    d_in = dcol < meta.D
    rows64 = rows.to(tl.int64)
    # query rows no pair uses are never loaded: their dQ is 0 whatever q, dO and delta hold there
    row_ok = _rows_ok(rows, r, F)
    q = _tokens(_plane(Q, sq_, b, h, r.q0), rows, sq_[2], dcol, row_ok, d_in)
    do = _tokens(_plane(DO, sd_, b, h, r.q0), rows, sd_[2], dcol, row_ok, d_in)
    lse2 = tl.load(_plane(LSE, sl_, b, h, r.q0) + rows64 * sl_[2], mask=row_ok, other=float("inf")).to(F.ACC)
    delta = tl.load(_plane(DELTA, sl_, b, h, r.q0) + rows64 * sl_[2], mask=row_ok, other=0.0).to(F.ACC)
    k_ptr = _plane(K, sk_, b, hk, r.k0)
    v_ptr = _plane(V, sv_, b, hk, r.k0)
    mask_ptr = meta.MASK + b.to(tl.int64) * meta.smb + h.to(tl.int64) * meta.smh

    i_min, i_max, rows_full = _row_stats(m0, r, BM, F)
    n_lo, n_end = _key_range(i_min, i_max, m0, r, BN, F)
    slope = _alibi_slope(meta, b, h, r, F)
    if F.DROPOUT != 0:
        dkey = _dropout_key(meta, b, h, F)
        rescale = _dropout_rescale(meta, F)
    dq = tl.zeros([BM, F.BD], F.ACC)
    count = pid_m * 0
    masked = pid_m * 0
    for n0 in range(n_lo, n_end, BN):
        j_min, j_max, cols_full = _col_stats(n0, r, BN, F)
        visible, full = _tile_class(m0, i_min, i_max, rows_full, n0, j_min, j_max, cols_full, r, BM, BN, F)
        if visible:
            cols = n0 + tl.arange(0, BN)
            col_in = cols < r.sk
            col_ok = _cols_ok(cols, r, F)
            kt = _tokens_t(k_ptr, cols, sk_[2], dcol, col_ok, d_in)
            vt = _tokens_t(v_ptr, cols, sv_[2], dcol, col_ok, d_in)
            s = _dot(q, kt, tl.zeros([BM, BN], F.ACC), F.UPCAST, F.PRECISION) * scale_log2
            s = _tile_scores(s, full, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :],
                             row_in[:, None] & col_in[None, :], r, mask_ptr, slope, meta, F)
            p = tl.math.exp2(s - lse2[:, None])
            dp = _dot(do, vt, tl.zeros([BM, BN], F.ACC), F.UPCAST, F.PRECISION)
            if F.DROPOUT != 0:
                dp = tl.where(_dropout_keep(dkey, rows[:, None], cols[None, :], meta), dp * rescale, 0.0)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, F.UPCAST, F.PRECISION)
            count += 1
            masked += tl.where(full, 0, 1)
    dq = dq * r.scale
    tl.store(_plane(DQ, sq_, b, h, r.q0) + rows64[:, None] * sq_[2] + dcol[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_in[:, None] & d_in[None, :])
    if F.COUNT:
        _store_counts(COUNTS, pid_m, b, h, count, masked)


# Rows per program of the preprocess (a streaming row sum: any size that fills a wave will do).
PRE_BLOCK_M = 64


def backward_launches(prob: Problem, dout, q, k, v, out, lse, delta, dq, dk, dv) -> list[Launch]:
    """The preprocess, dK/dV and dQ launches, in order."""
    seq = prob.strides
    meta = prob.meta
    pre = Launch(_bwd_preprocess, (triton.cdiv(prob.SQ, PRE_BLOCK_M), prob.B, prob.HQ),
                 (out, dout, delta, seq(out), seq(dout), prob.lse_strides(), *prob.layout_bundles()),
                 dict(BM=PRE_BLOCK_M))
    launches = [pre]
    strides = (seq(q), seq(k), seq(v), seq(dout), prob.lse_strides())
    for name, kernel, grads, rows, heads in (("dkdv", _bwd_dkdv, (dk, dv), prob.SK, prob.HKV),
                                             ("dq", _bwd_dq, (dq,), prob.SQ, prob.HQ)):
        cfg = block_config(name, prob.D, q.dtype, prob.flags.MASK_KIND != 0, prob.flags.DROPOUT != 0)
        grid = (triton.cdiv(rows, cfg.block_n if name == "dkdv" else cfg.block_m), prob.B, heads)
        counts = tile_counter(name, cfg, grid[0] * grid[1] * grid[2], q.device)
        args = (q, k, v, dout, lse, delta, *grads, counts if counts is not None else meta.CU_Q, *strides,
                *prob.bundles(counts is not None))
        launches.append(Launch(kernel, grid, args, dict(BM=cfg.block_m, BN=cfg.block_n), cfg))
    return launches


def launch_backward(prob: Problem, dout, q, k, v, out, lse):
    """dq, dk, dv (in the inputs' dtypes and layouts) from the forward's out and lse."""
    # packed: tokens outside every sequence of cu_seqlens (bad metadata) get 0, not garbage
    new = torch.zeros_like if prob.varlen else torch.empty_like
    dq, dk, dv = new(q), new(k), new(v)
    for launch in backward_launches(prob, dout, q, k, v, out, lse, torch.empty_like(lse), dq, dk, dv):
        launch()
    return dq, dk, dv


def backward(dout, q, k, v, out, lse, mask: Mask, scale: float, dropout: Dropout = NO_DROPOUT):
    return launch_backward(Problem.from_padded(q, k, mask, scale, dropout), dout, q, k, v, out, lse)


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, left: int,
                    right: int, alibi, scale: float, dropout: Dropout = NO_DROPOUT):
    prob = Problem.from_varlen(q, k, cu_q, cu_k, max_q, max_k, causal, left, right, alibi, scale, dropout)
    return launch_backward(prob, dout, q, k, v, out, lse)
