"""CPU backend of masked attention: blockwise PyTorch, forward and backward (FlashAttention-2's
recurrences, Dao 2023, with the whole key range of a query block in one step).

Never builds a (B, Sq, Sk) mask: one block of `BLOCK_Q` query rows at a time, its visibility computed
from the O(B) metadata (masks.py), so memory is O(B x H x BLOCK_Q x Sk). Keys outside the block's
visible column range [k_lo, k_hi) (over the batch) are not touched: causal, prefix, kv_lengths and
span masks skip their invisible key blocks, and query blocks with nothing visible are skipped whole.
Scores and accumulation are fp32 for fp16/bf16 inputs. The backward recomputes the probabilities
from the saved log-sum-exp and runs block by block in a fixed order: deterministic.
"""
from __future__ import annotations

import torch

from .masks import visibility

# Rows per block: 128 keeps the (B, H, 128, Sk) fp32 scores of B=8, H=8, Sk=512 at 16 MiB while the
# matmuls stay large enough for MKL (measured on 2 cores: 64 was ~10% slower, 256 no faster).
BLOCK_Q = 128


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Block:
    """One query block's view: visible (B, 1 or H, R, K) over keys [k_lo, k_hi), and the score bias."""

    def __init__(self, meta: dict, attn_mask, B: int, Sq: int, Sk: int, i0: int, i1: int, device):
        vis = visibility(B, Sq, Sk, device=device, rows=(i0, i1), **meta)
        bias = None
        if attn_mask is not None:
            m = attn_mask[..., i0:i1, :] if attn_mask.shape[-2] != 1 else attn_mask
            if m.dtype == torch.bool:
                vis = vis & m
            else:
                bias = m
                vis = vis & (m != float("-inf"))
        cols = vis.flatten(0, -2).any(0).nonzero()
        self.empty = cols.numel() == 0
        self.k_lo = int(cols[0]) if not self.empty else 0
        self.k_hi = int(cols[-1]) + 1 if not self.empty else 0
        self.vis = vis[..., self.k_lo:self.k_hi]
        self.bias = None if bias is None else bias[..., self.k_lo:self.k_hi]

    def scores(self, q, k, scale, dt):
        """(B, Hkv, G, R, K) scores of the block, invisible pairs at -inf. q: (B, Hkv, G, R, D)."""
        s = torch.matmul(q.to(dt), k[:, :, None, self.k_lo:self.k_hi].to(dt).transpose(-1, -2)) * scale
        B, Hkv, G, R, K = s.shape
        if self.bias is not None:
            s += self.bias.to(dt).expand(B, Hkv * G, R, K).reshape(B, Hkv, G, R, K)
        vis = self.vis.expand(B, Hkv * G, R, K).reshape(B, Hkv, G, R, K)
        return s.masked_fill_(~vis, float("-inf"))  # in place: one (B, H, R, K) buffer per block


def _grouped(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Hq, S, D) -> (B, Hkv, G, S, D): query heads grouped by the key/value head they share."""
    B, Hq, S, D = x.shape
    return x.view(B, Hkv, Hq // Hkv, S, D)


def _blocks(q, k, attn_mask, meta):
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    for i0 in range(0, Sq, BLOCK_Q):
        i1 = min(i0 + BLOCK_Q, Sq)
        yield i0, i1, _Block(meta, attn_mask, B, Sq, Sk, i0, i1, q.device)


def forward(q, k, v, meta: dict, attn_mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) fp32/fp64; -inf on rows with no key)."""
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    dt = _compute_dtype(q.dtype)
    out = torch.zeros(B, Hkv, Hq // Hkv, Sq, D, dtype=q.dtype)
    lse = torch.full((B, Hkv, Hq // Hkv, Sq), float("-inf"), dtype=dt)
    qg = _grouped(q, Hkv)
    for i0, i1, blk in _blocks(q, k, attn_mask, meta):
        if blk.empty:
            continue  # nothing visible: output stays 0, lse -inf
        s = blk.scores(qg[:, :, :, i0:i1], k, scale, dt)
        m = s.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # rows with no key: exp(-inf) = 0
        p = s.sub_(m).exp_()
        den = p.sum(-1, keepdim=True)
        o = torch.matmul(p, v[:, :, None, blk.k_lo:blk.k_hi].to(dt)) / den.clamp_min(torch.finfo(dt).tiny)
        out[:, :, :, i0:i1] = o.to(q.dtype)
        lse[:, :, :, i0:i1] = (m + torch.log(den)).squeeze(-1)
    return out.view(B, Hq, Sq, D), lse.view(B, Hq, Sq)


def backward(dout, q, k, v, out, lse, meta: dict, attn_mask, scale: float):
    """Gradients (dq, dk, dv) in the inputs' dtypes; rows with no visible key contribute nothing."""
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    dt = _compute_dtype(q.dtype)
    qg, dog = _grouped(q, Hkv), _grouped(dout, Hkv)
    lseg = lse.view(B, Hkv, Hq // Hkv, Sq, 1)
    delta = (_grouped(dout, Hkv).to(dt) * _grouped(out, Hkv).to(dt)).sum(-1, keepdim=True)  # rowsum(dO * O)
    dq = torch.zeros(B, Hkv, Hq // Hkv, Sq, D, dtype=dt)
    dk = torch.zeros(B, Hkv, k.shape[2], D, dtype=dt)
    dv = torch.zeros(B, Hkv, k.shape[2], D, dtype=dt)
    for i0, i1, blk in _blocks(q, k, attn_mask, meta):
        if blk.empty:
            continue
        s = blk.scores(qg[:, :, :, i0:i1], k, scale, dt)
        row_lse = lseg[:, :, :, i0:i1]
        p = s.sub_(torch.where(row_lse == float("-inf"), torch.zeros_like(row_lse), row_lse)).exp_()
        do = dog[:, :, :, i0:i1].to(dt)
        kb, vb = k[:, :, None, blk.k_lo:blk.k_hi].to(dt), v[:, :, None, blk.k_lo:blk.k_hi].to(dt)
        dv[:, :, blk.k_lo:blk.k_hi] += torch.matmul(p.transpose(-1, -2), do).sum(2)
        ds = torch.matmul(do, vb.transpose(-1, -2)).sub_(delta[:, :, :, i0:i1]).mul_(p)
        dq[:, :, :, i0:i1] = torch.matmul(ds, kb) * scale
        dk[:, :, blk.k_lo:blk.k_hi] += (torch.matmul(ds.transpose(-1, -2), qg[:, :, :, i0:i1].to(dt)) * scale).sum(2)
    return dq.view(B, Hq, Sq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
