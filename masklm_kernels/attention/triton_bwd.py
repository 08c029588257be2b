"""Triton backward of masked attention, FlashAttention-2 style and deterministic (no atomics):

1. `_bwd_preprocess`: delta_i = rowsum(dO_i * O_i) per query row;
2. `_bwd_dkdv`: one program per (key tile, batch row x key/value head) accumulates dK and dV over the
   query tiles that see it, for every query head of its GQA group, in a fixed order;
3. `_bwd_dq`: one program per (query tile, batch row x query head) accumulates dQ over the key tiles.

Both main kernels visit exactly the tiles that hold a visible pair (triton_common.py) and recompute the
probabilities from the forward's log-sum-exp (+inf on rows with no visible key: their P is 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_launch import Launch
from .inputs import Mask
from .triton_common import (
    _col_stats,
    _cols_ok,
    _diagonal,
    _dot,
    _key_range,
    _query_range,
    _row_meta,
    _row_stats,
    _rows_ok,
    _scales,
    _seq_info,
    _tile_class,
    _tile_scores,
)
from .triton_host import Problem, block_config, padded_problem, tile_counter, varlen_problem


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _bwd_preprocess(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, slb, slh, sls, CU_Q, CU_K, SQ, SK, TQ, TK, HQ, D,
                    BM: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, sq, k0, sk = _seq_info(CU_Q, CU_K, b, SQ, SK, TQ, TK, VARLEN)
    rows = pid_m * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    inb = (rows[:, None] < sq) & (dcol[None, :] < D)
    b64 = b.to(tl.int64)
    o = tl.load(O + b64 * sob + h.to(tl.int64) * soh + (q0 + rows[:, None]).to(tl.int64) * sos + dcol[None, :],
                mask=inb, other=0.0)
    do = tl.load(DO + b64 * sdb + h.to(tl.int64) * sdh + (q0 + rows[:, None]).to(tl.int64) * sds + dcol[None, :],
                 mask=inb, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1)
    tl.store(DELTA + b64 * slb + h.to(tl.int64) * slh + (q0 + rows).to(tl.int64) * sls, delta, mask=rows < sq)


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, COUNTS,
              sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, slb, slh, sls,
              CU_Q, CU_K, QLEN, KVLEN, PREFIX, SPANS, MASK, smb, smh, smi, smj,
              SQ, SK, TQ, TK, HQ, GROUP, D, scale_hi, scale_lo, log2e_hi, log2e_lo,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_PREFIX: tl.constexpr,
              NSPANS: tl.constexpr, NSP: tl.constexpr, INSIDE: tl.constexpr, CONTIGUOUS: tl.constexpr,
              MASK_KIND: tl.constexpr,
              VARLEN: tl.constexpr, COUNT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    """dK, dV of one key tile; DK and DV share k's strides (they are allocated like k)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q0, sq, k0, sk = _seq_info(CU_Q, CU_K, b, SQ, SK, TQ, TK, VARLEN)
    n0 = pid_n * BN
    if n0 >= sk:
        return
    q_len, kv_len, prefix, st, en = _row_meta(b, sq, sk, QLEN, KVLEN, PREFIX, SPANS, HAS_QLEN, HAS_KVLEN,
                                              HAS_PREFIX, NSPANS, NSP)
    off = _diagonal(sq, sk, q_len, kv_len, HAS_QLEN, HAS_KVLEN)
    scale, log2e = _scales(scale_hi, scale_lo, log2e_hi, log2e_lo, ACC)
    scale_log2 = scale * log2e

    cols = n0 + tl.arange(0, BN)
    dcol = tl.arange(0, BD)
    col_in = cols < sk
    d_in = dcol < D
    b64 = b.to(tl.int64)
    kv_off = (k0 + cols[:, None]).to(tl.int64)
    # keys and query rows no pair uses (padding, outside the spans) are never loaded (see the forward)
    col_ok = _cols_ok(cols, kv_len, st, en, NSPANS, INSIDE)
    k = tl.load(K + b64 * skb + hk.to(tl.int64) * skh + kv_off * sks + dcol[None, :],
                mask=col_ok[:, None] & d_in[None, :], other=0.0)
    v = tl.load(V + b64 * svb + hk.to(tl.int64) * svh + kv_off * svs + dcol[None, :],
                mask=col_ok[:, None] & d_in[None, :], other=0.0)
    j_min, cols_full = _col_stats(n0, kv_len, st, en, BN, NSPANS, INSIDE)
    m_start, m_end = _query_range(j_min, q_len, off, prefix, st, en, BM, CAUSAL, NSPANS, INSIDE)

    dk = tl.zeros([BN, BD], ACC)
    dv = tl.zeros([BN, BD], ACC)
    count = pid_n * 0
    masked = pid_n * 0
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_ptr = Q + b64 * sqb + h * sqh + q0.to(tl.int64) * sqs
        do_ptr = DO + b64 * sdb + h * sdh + q0.to(tl.int64) * sds
        l_ptr = b64 * slb + h * slh + q0.to(tl.int64) * sls
        mask_ptr = MASK + b64 * smb + h * smh
        for m0 in range(m_start, m_end, BM):
            i_max, rows_full = _row_stats(m0, q_len, st, en, BM, NSPANS, INSIDE)
            visible, full = _tile_class(m0, i_max, rows_full, n0, j_min, cols_full, off, prefix, BM, BN, CAUSAL,
                                        MASK_KIND != 0, CONTIGUOUS)
            if visible:
                rows = m0 + tl.arange(0, BM)
                rows64 = rows.to(tl.int64)
                row_in = rows < sq
                row_ok = _rows_ok(rows, q_len, st, en, NSPANS, INSIDE)  # implies row_in
                q = tl.load(q_ptr + rows64[:, None] * sqs + dcol[None, :], mask=row_ok[:, None] & d_in[None, :],
                            other=0.0)
                do = tl.load(do_ptr + rows64[:, None] * sds + dcol[None, :], mask=row_ok[:, None] & d_in[None, :],
                             other=0.0)
                lse2 = tl.load(LSE + l_ptr + rows64 * sls, mask=row_ok, other=float("inf")).to(ACC)
                delta = tl.load(DELTA + l_ptr + rows64 * sls, mask=row_ok, other=0.0).to(ACC)
                s = _dot(k, tl.trans(q), tl.zeros([BN, BM], ACC), UPCAST, PRECISION) * scale_log2  # S^T
                s = _tile_scores(s, full, rows[None, :], cols[:, None], row_ok[None, :], col_ok[:, None],
                                 col_in[:, None] & row_in[None, :], off, prefix, mask_ptr, smi, smj, log2e, CAUSAL,
                                 MASK_KIND, ACC)
                p = tl.math.exp2(s - lse2[None, :])
                dv = _dot(p.to(do.dtype), do, dv, UPCAST, PRECISION)
                dp = _dot(v, tl.trans(do), tl.zeros([BN, BM], ACC), UPCAST, PRECISION)
                ds = p * (dp - delta[None, :])
                dk = _dot(ds.to(q.dtype), q, dk, UPCAST, PRECISION)
                count += 1
                masked += tl.where(full, 0, 1)
    dk = dk * scale
    out_off = b64 * skb + hk.to(tl.int64) * skh + kv_off * sks + dcol[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=col_in[:, None] & d_in[None, :])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_in[:, None] & d_in[None, :])
    if COUNT:
        slot = (b * tl.num_programs(2) + hk) * tl.num_programs(0) + pid_n
        tl.store(COUNTS + slot, count)
        tl.store(COUNTS + tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2) + slot, masked)


@triton.jit(do_not_specialize=["SQ", "SK", "TQ", "TK"])
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, COUNTS,
            sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, slb, slh, sls,
            CU_Q, CU_K, QLEN, KVLEN, PREFIX, SPANS, MASK, smb, smh, smi, smj,
            SQ, SK, TQ, TK, HQ, GROUP, D, scale_hi, scale_lo, log2e_hi, log2e_lo,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_PREFIX: tl.constexpr,
            NSPANS: tl.constexpr, NSP: tl.constexpr, INSIDE: tl.constexpr, CONTIGUOUS: tl.constexpr,
            MASK_KIND: tl.constexpr,
            VARLEN: tl.constexpr, COUNT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
            PRECISION: tl.constexpr):
    """dQ of one query tile; DQ shares q's strides."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    hk = h // GROUP
    q0, sq, k0, sk = _seq_info(CU_Q, CU_K, b, SQ, SK, TQ, TK, VARLEN)
    m0 = pid_m * BM
    if m0 >= sq:
        return
    q_len, kv_len, prefix, st, en = _row_meta(b, sq, sk, QLEN, KVLEN, PREFIX, SPANS, HAS_QLEN, HAS_KVLEN,
                                              HAS_PREFIX, NSPANS, NSP)
    off = _diagonal(sq, sk, q_len, kv_len, HAS_QLEN, HAS_KVLEN)
    scale, log2e = _scales(scale_hi, scale_lo, log2e_hi, log2e_lo, ACC)
    scale_log2 = scale * log2e

    rows = m0 + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    row_in = rows < sq
    d_in = dcol < D
    b64 = b.to(tl.int64)
    q_off = (q0 + rows[:, None]).to(tl.int64)
    # query rows no pair uses are never loaded: their dQ is 0 whatever q, dO and delta hold there
    row_ok = _rows_ok(rows, q_len, st, en, NSPANS, INSIDE)
    q = tl.load(Q + b64 * sqb + h.to(tl.int64) * sqh + q_off * sqs + dcol[None, :],
                mask=row_ok[:, None] & d_in[None, :], other=0.0)
    do = tl.load(DO + b64 * sdb + h.to(tl.int64) * sdh + q_off * sds + dcol[None, :],
                 mask=row_ok[:, None] & d_in[None, :], other=0.0)
    l_off = b64 * slb + h.to(tl.int64) * slh + (q0 + rows).to(tl.int64) * sls
    lse2 = tl.load(LSE + l_off, mask=row_ok, other=float("inf")).to(ACC)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0).to(ACC)
    k_ptr = K + b64 * skb + hk.to(tl.int64) * skh + k0.to(tl.int64) * sks
    v_ptr = V + b64 * svb + hk.to(tl.int64) * svh + k0.to(tl.int64) * svs
    mask_ptr = MASK + b64 * smb + h.to(tl.int64) * smh

    i_max, rows_full = _row_stats(m0, q_len, st, en, BM, NSPANS, INSIDE)
    n_lo, n_end = _key_range(i_max, m0, kv_len, off, prefix, st, en, BN, CAUSAL, NSPANS, INSIDE)
    dq = tl.zeros([BM, BD], ACC)
    count = pid_m * 0
    masked = pid_m * 0
    for n0 in range(n_lo, n_end, BN):
        j_min, cols_full = _col_stats(n0, kv_len, st, en, BN, NSPANS, INSIDE)
        visible, full = _tile_class(m0, i_max, rows_full, n0, j_min, cols_full, off, prefix, BM, BN, CAUSAL,
                                    MASK_KIND != 0, CONTIGUOUS)
        if visible:
            cols = n0 + tl.arange(0, BN)
            cols64 = cols.to(tl.int64)
            col_in = cols < sk
            col_ok = _cols_ok(cols, kv_len, st, en, NSPANS, INSIDE)
            kt = tl.load(k_ptr + cols64[None, :] * sks + dcol[:, None], mask=d_in[:, None] & col_ok[None, :], other=0.0)
            vt = tl.load(v_ptr + cols64[None, :] * svs + dcol[:, None], mask=d_in[:, None] & col_ok[None, :], other=0.0)
            s = _dot(q, kt, tl.zeros([BM, BN], ACC), UPCAST, PRECISION) * scale_log2
            s = _tile_scores(s, full, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :],
                             row_in[:, None] & col_in[None, :], off, prefix, mask_ptr, smi, smj, log2e, CAUSAL,
                             MASK_KIND, ACC)
            p = tl.math.exp2(s - lse2[:, None])
            dp = _dot(do, vt, tl.zeros([BM, BN], ACC), UPCAST, PRECISION)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)
            count += 1
            masked += tl.where(full, 0, 1)
    dq = dq * scale
    tl.store(DQ + b64 * sqb + h.to(tl.int64) * sqh + q_off * sqs + dcol[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_in[:, None] & d_in[None, :])
    if COUNT:
        slot = (b * tl.num_programs(2) + h) * tl.num_programs(0) + pid_m
        tl.store(COUNTS + slot, count)
        tl.store(COUNTS + tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2) + slot, masked)


# Rows per program of the preprocess (a streaming row sum: any size that fills a wave will do).
PRE_BLOCK_M = 64


def backward_launches(prob: Problem, dout, q, k, v, out, lse, delta, dq, dk, dv) -> list[Launch]:
    """The preprocess, dK/dV and dQ launches, in order."""
    a = prob.args
    seq = prob.strides
    pre = Launch(_bwd_preprocess, (triton.cdiv(prob.SQ, PRE_BLOCK_M), prob.B, prob.HQ),
                 (out, dout, delta, *seq(out), *seq(dout), *prob.lse_strides(), a["CU_Q"], a["CU_K"], prob.SQ,
                  prob.SK, a["TQ"], a["TK"], prob.HQ, prob.D),
                 dict(BM=PRE_BLOCK_M, BD=a["BD"], VARLEN=prob.varlen, ACC=a["ACC"]))
    launches = [pre]
    strides = (*seq(q), *seq(k), *seq(v), *seq(dout), *prob.lse_strides())
    for name, kernel, grads, rows, heads in (("dkdv", _bwd_dkdv, (dk, dv), prob.SK, prob.HKV),
                                             ("dq", _bwd_dq, (dq,), prob.SQ, prob.HQ)):
        cfg = block_config(name, prob.D, q.dtype, a["MASK_KIND"] != 0)
        grid = (triton.cdiv(rows, cfg.block_n if name == "dkdv" else cfg.block_m), prob.B, heads)
        counts = tile_counter(name, cfg, grid[0] * grid[1] * grid[2], q.device)
        args = (q, k, v, dout, lse, delta, *grads, counts if counts is not None else a["CU_Q"], *strides)
        launches.append(Launch(kernel, grid, args, dict(BM=cfg.block_m, BN=cfg.block_n, COUNT=counts is not None,
                                                        **a), cfg))
    return launches


def launch_backward(prob: Problem, dout, q, k, v, out, lse):
    """dq, dk, dv (in the inputs' dtypes and layouts) from the forward's out and lse."""
    # packed: tokens outside every sequence of cu_seqlens (bad metadata) get 0, not garbage
    new = torch.zeros_like if prob.varlen else torch.empty_like
    dq, dk, dv = new(q), new(k), new(v)
    for launch in backward_launches(prob, dout, q, k, v, out, lse, torch.empty_like(lse), dq, dk, dv):
        launch()
    return dq, dk, dv


def backward(dout, q, k, v, out, lse, mask: Mask, scale: float):
    return launch_backward(padded_problem(q, k, mask, scale), dout, q, k, v, out, lse)


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    return launch_backward(varlen_problem(q, k, cu_q, cu_k, max_q, max_k, causal, scale), dout, q, k, v, out, lse)
