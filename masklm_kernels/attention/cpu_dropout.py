"""CPU backend of masked attention with dropout: one piece (a batch row x a block of query rows, its
visible keys; cpu.py's `_pieces`) at a time, explicitly.

ATen's CPU flash kernel draws its dropout from torch's generator, which no other backend can reproduce,
so with dropout on a piece is computed with batched matmuls instead: scores, softmax from the row maxima,
the piece's keep mask (`masklm_kernels::attention_dropout_keep`, C++ Philox, 16 columns per call: the rule
every backend shares), P o keep / (1 - p) @ V. The backward recomputes the same scores and mask from the
saved log-sum-exp:

    dV = (P o Z)^T dO,   dP = (dO V^T) o Z,   dS = P o (dP - delta),   delta = rowsum(dO o O)

with Z = keep / (1 - p) (FlashAttention-2's backward with dropout). Memory: a few (H, BLOCK_Q, keys)
tensors per piece. Computes in fp32 (fp64 for fp64 inputs); GQA through grouped matmuls, no repeat of K, V.
"""
from __future__ import annotations

import torch

from .dropout import keep_op
from .inputs import Dropout


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(Hq, R, n) -> (Hkv, G * R, n): the rows of each key/value head's query heads together."""
    hq, r, n = x.shape
    return x.reshape(hkv, (hq // hkv) * r, n)


def piece_keep(drop: Dropout, sample: torch.Tensor, heads: int, i0: int, i1: int, keys, dtype) -> torch.Tensor:
    """(Hq, i1 - i0, n_keys) keep / (1 - p) in `dtype` for the piece's rows and keys (a slice or indices)."""
    cols = torch.arange(keys.start, keys.stop) if isinstance(keys, slice) else keys
    keep = keep_op()(drop.seed.cpu(), drop.offset.cpu(), sample, heads, i0, i1, cols, drop.threshold)[0]
    return keep.to(dtype).mul_(drop.rescale)


def _probs(qp, kp, bias, scale, lse=None):
    """Scores of a piece (Hq, R, K) in the compute dtype, and P = exp(s - lse) (lse computed when None;
    rows with no visible key get lse = +inf, so their P is 0)."""
    hq, r, _ = qp.shape
    hkv = kp.shape[0]
    s = torch.matmul(_grouped(qp, hkv), kp.transpose(1, 2)).view(hq, r, -1).mul_(scale)
    s = s + bias.to(s.dtype)
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return torch.exp(s - lse[..., None]), lse


def piece_forward(q, k, v, bias, keepz, scale: float):
    """One piece: q (Hq, R, D), k, v (Hkv, K, D), bias (1 or Hq, R, K) additive (-inf: invisible), keepz
    (Hq, R, K) = keep / (1 - p). Returns (out (Hq, R, D) in the compute dtype, lse (Hq, R))."""
    p, lse = _probs(q, k, bias, scale)
    hkv = k.shape[0]
    out = torch.matmul(_grouped(p.mul_(keepz), hkv), v).view(q.shape)
    return out, lse


def piece_backward(do, q, k, v, o, lse, bias, keepz, scale: float):
    """Gradients (dq (Hq, R, D), dk, dv (Hkv, K, D)) of one piece, in the compute dtype."""
    hkv = k.shape[0]
    p, _ = _probs(q, k, bias, scale, lse)
    pz = p * keepz
    dog = _grouped(do, hkv)
    dv = torch.matmul(_grouped(pz, hkv).transpose(1, 2), dog)
    dp = torch.matmul(dog, v.transpose(1, 2)).view(p.shape).mul_(keepz)
    delta = (do * o).sum(dim=-1, keepdim=True)
    ds = p.mul_(dp.sub_(delta)).mul_(scale)
    dq = torch.matmul(_grouped(ds, hkv), k).view(q.shape)
    dk = torch.matmul(_grouped(ds, hkv).transpose(1, 2), _grouped(q, hkv))
    return dq, dk, dv
