"""CPU backend of masked attention with dropout: one piece (a batch row x a block of query rows, its
visible keys; cpu.py's `_pieces`) at a time, explicitly.

ATen's CPU flash kernel draws its dropout from torch's generator, which no other backend can reproduce,
so with dropout on a piece is computed with batched matmuls instead: scores, softmax from the row maxima,
the piece's keep mask (`masklm_kernels::attention_dropout_keep`, C++ Philox over 16 SIMD lanes: the rule
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
    """(Hq, i1 - i0, n_keys) Z = keep / (1 - p) in `dtype` for the piece's rows and keys (a slice or indices)."""
    cols = torch.arange(keys.start, keys.stop) if isinstance(keys, slice) else keys
    return keep_op()(drop.seed.cpu(), drop.offset.cpu(), sample, heads, i0, i1, cols, drop.threshold, dtype,
                     drop.rescale)[0]


def _scores(qp, kp, bias, scale):
    """Scaled scores of a piece (Hq, R, K) in the compute dtype, the additive mask added (-inf: invisible)."""
    hq, r, _ = qp.shape
    s = torch.matmul(_grouped(qp, kp.shape[0]), kp.transpose(1, 2)).view(hq, r, -1).mul_(scale)
    return s.add_(bias.to(s.dtype))


# Every (Hq, R, K) tensor pass costs as much as a small matmul here: the scalings (1 / l, the softmax
# scale) are applied to the (R, D) or (K, D) results instead, 1 / (1 - p) comes with the keep mask (the C++
# op writes Z directly), and exp runs once per pass.

def piece_forward(q, k, v, bias, z, scale: float):
    """One piece: q (Hq, R, D), k, v (Hkv, K, D), bias (1 or Hq, R, K) additive (-inf: invisible), z
    (Hq, R, K) = keep / (1 - p). Returns (out (Hq, R, D) in the compute dtype, lse (Hq, R): +inf on rows with no visible
    key, whose P is then 0 in the backward)."""
    s = _scores(q, k, bias, scale)
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill_(m == float("-inf"), 0.0)  # rows with nothing visible: exp(-inf) = 0, no NaN
    p = s.sub_(m).exp_()
    l = p.sum(dim=-1, keepdim=True)
    lse = torch.where(l > 0, m + l.log(), float("inf")).squeeze(-1)
    out = torch.matmul(_grouped(p.mul_(z), k.shape[0]), v).view(q.shape)
    return out.div_(l.clamp_min(torch.finfo(l.dtype).tiny)), lse


def piece_backward(do, q, k, v, o, lse, bias, z, scale: float):
    """Gradients (dq (Hq, R, D), dk, dv (Hkv, K, D)) of one piece, in the compute dtype."""
    hkv = k.shape[0]
    p = _scores(q, k, bias, scale).sub_(lse[..., None]).exp_()
    delta = (do * o).sum(dim=-1, keepdim=True)
    dog = _grouped(do, hkv)
    dv = torch.matmul(_grouped(p * z, hkv).transpose(1, 2), dog)
    dp = torch.matmul(dog, v.transpose(1, 2)).view(p.shape)
    ds = p.mul_(dp.mul_(z).sub_(delta))
    dq = torch.matmul(_grouped(ds, hkv), k).view(q.shape).mul_(scale)
    dk = torch.matmul(_grouped(ds, hkv).transpose(1, 2), _grouped(q, hkv)).mul_(scale)
    return dq, dk, dv
