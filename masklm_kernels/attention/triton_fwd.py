"""Triton forward of masked attention: FlashAttention-2 online softmax over the key tiles that hold a
visible pair (triton_common.py decides which, from the O(B) metadata, without loading them).

One program per (query tile, batch row x query head); GQA/MQA read the key/value head h // GROUP.
Writes the output (0 for rows with no visible key) and the base-2 log-sum-exp of the scaled scores per
row, log2(sum_j 2^(s_ij * scale * log2 e)) (+inf for those rows, so that the backward's 2^(s - lse) is 0
there whatever s is). Base 2, as FlashAttention's Triton kernels: the backward recomputes P = 2^(s - lse)
from the very same s, so a row with one visible key gets P = 1 exactly (a natural-log lse would be
rounded twice on the way).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import acc_dtype
from .._triton_launch import Launch
from .inputs import Mask
from .triton_common import (
    _col_stats,
    _cols_ok,
    _diagonal,
    _dot,
    _key_range,
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
def _attn_fwd(Q, K, V, O, LSE, COUNTS,
              sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh, sls,
              CU_Q, CU_K, QLEN, KVLEN, PREFIX, SPANS, MASK, smb, smh, smi, smj,
              SQ, SK, TQ, TK, HQ, GROUP, D, scale_hi, scale_lo, log2e_hi, log2e_lo,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_PREFIX: tl.constexpr,
              NSPANS: tl.constexpr, NSP: tl.constexpr, INSIDE: tl.constexpr, CONTIGUOUS: tl.constexpr,
              MASK_KIND: tl.constexpr,
              VARLEN: tl.constexpr, COUNT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    hk = h // GROUP
    q0, sq, k0, sk = _seq_info(CU_Q, CU_K, b, SQ, SK, TQ, TK, VARLEN)
    m0 = pid_m * BM
    if m0 >= sq:  # packed layout: the grid covers max_seqlen_q
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
    q_ptr = Q + b64 * sqb + h.to(tl.int64) * sqh + q0.to(tl.int64) * sqs
    k_ptr = K + b64 * skb + hk.to(tl.int64) * skh + k0.to(tl.int64) * sks
    v_ptr = V + b64 * svb + hk.to(tl.int64) * svh + k0.to(tl.int64) * svs
    mask_ptr = MASK + b64 * smb + h.to(tl.int64) * smh
    rows64 = rows.to(tl.int64)  # offsets in 64 bits: max_seqlen x heads x head_dim may pass 2^31 (varlen)
    q = tl.load(q_ptr + rows64[:, None] * sqs + dcol[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)

    row_ok = _rows_ok(rows, q_len, st, en, NSPANS, INSIDE)
    i_max, rows_full = _row_stats(m0, q_len, st, en, BM, NSPANS, INSIDE)
    n_lo, n_end = _key_range(i_max, m0, kv_len, off, prefix, st, en, BN, CAUSAL, NSPANS, INSIDE)

    m_i = tl.full([BM], float("-inf"), ACC)
    l_i = tl.zeros([BM], ACC)
    acc = tl.zeros([BM, BD], ACC)
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
            kt = tl.load(k_ptr + cols64[None, :] * sks + dcol[:, None], mask=d_in[:, None] & col_in[None, :], other=0.0)
            s = _dot(q, kt, tl.zeros([BM, BN], ACC), UPCAST, PRECISION) * scale_log2
            # values no query may see (padding, outside the spans) are never loaded: whatever they hold (NaN,
            # inf) cannot reach an output (their scores are -inf whatever the keys hold); col_ok implies col_in
            col_ok = _cols_ok(cols, kv_len, st, en, NSPANS, INSIDE)
            s = _tile_scores(s, full, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :],
                             row_in[:, None] & col_in[None, :], off, prefix, mask_ptr, smi, smj, log2e, CAUSAL,
                             MASK_KIND, ACC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + cols64[:, None] * svs + dcol[None, :], mask=col_ok[:, None] & d_in[None, :], other=0.0)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new
            count += 1
            masked += tl.where(full, 0, 1)

    alive = l_i > 0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(alive, m_i + tl.math.log2(l_safe), float("inf"))  # base 2: what the backward recomputes P with
    o_ptr = O + b64 * sob + h.to(tl.int64) * soh + q0.to(tl.int64) * sos
    tl.store(o_ptr + rows64[:, None] * sos + dcol[None, :], out.to(O.dtype.element_ty),
             mask=row_in[:, None] & d_in[None, :])
    lse_ptr = LSE + b64 * slb + h.to(tl.int64) * slh + q0.to(tl.int64) * sls
    tl.store(lse_ptr + rows64 * sls, lse.to(LSE.dtype.element_ty), mask=row_in)
    if COUNT:
        slot = (b * tl.num_programs(2) + h) * tl.num_programs(0) + pid_m
        tl.store(COUNTS + slot, count)
        tl.store(COUNTS + tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2) + slot, masked)


def forward_launch(prob: Problem, q, k, v, out, lse) -> Launch:
    cfg = block_config("fwd", prob.D, q.dtype, prob.args["MASK_KIND"] != 0)
    grid = (triton.cdiv(prob.SQ, cfg.block_m), prob.B, prob.HQ)  # (B, H) on axes 1, 2: each below 65536
    counts = tile_counter("fwd", cfg, grid[0] * grid[1] * grid[2], q.device)
    args = (q, k, v, out, lse, counts if counts is not None else prob.args["CU_Q"],
            *prob.strides(q), *prob.strides(k), *prob.strides(v), *prob.strides(out), *prob.lse_strides())
    return Launch(_attn_fwd, grid, args, dict(BM=cfg.block_m, BN=cfg.block_n, COUNT=counts is not None, **prob.args),
                  cfg)


def forward(q, k, v, mask: Mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32 (fp64 for fp64)); q, k, v contiguous in the last dim."""
    B, HQ, SQ, _ = q.shape
    prob = padded_problem(q, k, mask, scale)
    out = torch.empty_like(q)
    lse = torch.empty(B, HQ, SQ, dtype=acc_dtype(q), device=q.device)
    forward_launch(prob, q, k, v, out, lse)()
    return out, lse


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Packed layout: (out (total_q, Hq, D), lse (Hq, total_q))."""
    prob = varlen_problem(q, k, cu_q, cu_k, max_q, max_k, causal, scale)
    out = torch.zeros_like(q)  # tokens outside every sequence of cu_seqlens (bad metadata) read 0, not garbage
    lse = torch.empty(q.shape[1], q.shape[0], dtype=acc_dtype(q), device=q.device)
    forward_launch(prob, q, k, v, out, lse)()
    return out, lse
