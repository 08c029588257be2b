"""Masked attention, the plain specification (docs/SEMANTICS.md, "Attention"); also the test oracle.

Dense on purpose: it builds the (B, 1 or H, Sq, Sk) visibility and score tensors that the kernels must
never build, and computes in any dtype (float64 for the oracle, the input dtype for the "same-dtype
eager" error bar of the low-precision tests). Differentiable with autograd; rows with no visible key
give 0 and zero gradients, never NaN.

Visibility rules: masks.py (`visibility`); on top of them `attn_mask`, broadcastable to
(B, Hq, Sq, Sk): bool is AND-ed; float is added to the scores, and a `-inf` entry makes the pair invisible.

Dropout (`dropout_keep`): the keep rule written out in NumPy from docs/SEMANTICS.md ("Attention
dropout"), applied to the normalised probabilities, survivors scaled by 1 / (1 - p).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..masking.reference import philox4x32_10
from .masks import diagonal_offset, visibility

# Counter domain of attention dropout's per-(row, head) keys (the masking ops' domains are 0-4).
DROPOUT_DOMAIN = 16


def dropout_keep(batch: int, heads: int, seq_q: int, seq_k: int, *, p: float, seed: int, offset: int = 0,
                 sample_ids=None) -> torch.Tensor:
    """(B, H, Sq, Sk) bool: the pairs attention dropout keeps. Pair (b, h, i, j) is kept when word j mod 4
    of Philox4x32-10 at counter (j div 4, i, 0, 0) under key(b, h) is >= floor(p * 2^32); key(b, h) is words
    0 and 1 of Philox4x32-10 at counter (h | 16 << 24, offset mod 2^32, sample lo, sample hi) under (seed lo,
    seed hi), sample = sample_ids[b] (default b). Everything modulo 2^64 / 2^32."""
    threshold = min(math.floor(p * 4294967296.0), 4294967295)
    seed, offset = int(seed) % 2**64, int(offset) % 2**64
    samples = list(range(batch)) if sample_ids is None else [int(x) % 2**64 for x in sample_ids]
    j, i = np.meshgrid(np.arange(seq_k, dtype=np.uint64), np.arange(seq_q, dtype=np.uint64))
    zero = np.zeros_like(i)
    keep = np.zeros((batch, heads, seq_q, seq_k), dtype=bool)
    for b, sample in enumerate(samples):
        for h in range(heads):
            w0, w1, _, _ = philox4x32_10((h | DROPOUT_DOMAIN << 24, offset & 0xFFFFFFFF, sample & 0xFFFFFFFF,
                                          sample >> 32), (seed & 0xFFFFFFFF, seed >> 32))
            words = np.stack(philox4x32_10((j >> np.uint64(2), i, zero, zero), (int(w0), int(w1))))
            keep[b, h] = np.take_along_axis(words, (j & np.uint64(3)).astype(np.int64)[None], 0)[0] >= threshold
    return torch.from_numpy(keep)


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, kv_lengths=None, q_lengths=None,
                    prefix_lengths=None, spans=None, span_mode: str = "inside", window_size=(-1, -1),
                    alibi_slopes=None, attn_mask=None, scale: float | None = None,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention probabilities (B, Hq, Sq, Sk) in `compute_dtype` (default q's dtype): softmax over each
    row's visible keys, 0 on invisible pairs and on rows with no visible key. Arguments as `attention`."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dt = compute_dtype or q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qc, kc = q.to(dt), k.to(dt)
    if Hkv != Hq:
        kc = kc.repeat_interleave(Hq // Hkv, dim=1)
    vis = visibility(B, Sq, Sk, causal=causal, kv_lengths=kv_lengths, q_lengths=q_lengths,
                     prefix_lengths=prefix_lengths, spans=spans, span_mode=span_mode, window_size=window_size,
                     device=q.device)
    # Keys and query rows that the lengths and spans exclude (padding, outside the spans: the causal and
    # prefix rules aside) are inert: whatever they hold (NaN, inf) reaches no output and no gradient. A NaN
    # in a key or value that some query sees makes those queries' outputs NaN; other rows of the same batch
    # row may then be NaN too in the kernels, which work a tile or a block of rows at a time.
    valid = _valid(B, Sq, Sk, kv_lengths, q_lengths, spans, span_mode, q.device)
    kc = kc.masked_fill(~valid.any(dim=-2)[..., None], 0.0)
    qc = qc.masked_fill(~valid.any(dim=-1)[..., None], 0.0)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if alibi_slopes is not None:  # FlashAttention's ALiBi: -slope * |i + off - j|, on the scaled scores
        off = diagonal_offset(B, Sq, Sk, kv_lengths, q_lengths)
        dist = (torch.arange(Sq, device=q.device).view(1, -1, 1) + off
                - torch.arange(Sk, device=q.device).view(1, 1, -1)).abs()  # (1 or B, Sq, Sk)
        slopes = alibi_slopes.to(dt).reshape(-1, Hq, 1, 1)  # (H,) or (B, H)
        scores = scores - slopes * dist[:, None].to(dt)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            scores = scores + attn_mask.to(dt)
            vis = vis & (attn_mask != float("-inf"))
    vis = vis.expand(B, Hq, Sq, Sk)
    row_visible = vis.any(dim=-1, keepdim=True)
    # Invisible scores -> -inf; rows with nothing visible get finite scores so that softmax stays
    # finite, and the mask product then zeroes them: probabilities 0 and zero gradients, never NaN.
    scores = scores.masked_fill(~vis, float("-inf")).masked_fill(~row_visible, 0.0)
    return torch.softmax(scores, dim=-1) * vis


def _valid(B, Sq, Sk, kv_lengths, q_lengths, spans, span_mode, device) -> torch.Tensor:
    """(B, 1, Sq, Sk): pairs whose row and key the lengths and spans keep (the causal rules aside)."""
    return visibility(B, Sq, Sk, kv_lengths=kv_lengths, q_lengths=q_lengths, spans=spans, span_mode=span_mode,
                      device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, kv_lengths=None,
              q_lengths=None, prefix_lengths=None, spans=None, span_mode: str = "inside", window_size=(-1, -1),
              alibi_slopes=None, attn_mask=None, scale: float | None = None,
              compute_dtype: torch.dtype | None = None, dropout_p: float = 0.0, dropout_seed=0, dropout_offset=0,
              sample_ids=None) -> torch.Tensor:
    """Masked attention, (B, Hq, Sq, D) in q's dtype; computed in `compute_dtype` (default q's dtype).

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA / MQA: each group of Hq / Hkv
    query heads shares one key/value head). window_size (left, right): the sliding window (masks.py, -1
    unbounded); alibi_slopes (Hq,) or (B, Hq): -slope * |i + off - j| added to the scaled scores.
    dropout_p > 0: the probabilities that `dropout_keep` drops are 0, the others scaled by 1 / (1 - dropout_p).
    """
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dt = compute_dtype or q.dtype
    probs = attention_probs(q, k, causal=causal, kv_lengths=kv_lengths, q_lengths=q_lengths,
                            prefix_lengths=prefix_lengths, spans=spans, span_mode=span_mode,
                            window_size=window_size, alibi_slopes=alibi_slopes,
                            attn_mask=attn_mask, scale=scale, compute_dtype=dt)
    vc = v.to(dt)
    if Hkv != Hq:
        vc = vc.repeat_interleave(Hq // Hkv, dim=1)
    vc = vc.masked_fill(~_valid(B, Sq, Sk, kv_lengths, q_lengths, spans, span_mode, q.device).any(dim=-2)[..., None],
                        0.0)
    row_visible = (probs != 0).any(dim=-1, keepdim=True)
    if dropout_p > 0:
        keep = dropout_keep(B, Hq, Sq, Sk, p=dropout_p, seed=int(dropout_seed), offset=int(dropout_offset),
                            sample_ids=None if sample_ids is None else sample_ids.tolist()).to(q.device)
        probs = probs * keep / (1.0 - dropout_p)
    # masked_fill, not a product: its backward gives those rows a zero gradient whatever d_out holds there
    return torch.matmul(probs, vc).masked_fill(~row_visible, 0.0).to(q.dtype)


def visible_pairs(vis: torch.Tensor) -> int:
    """Number of visible (query, key) pairs of a visibility tensor: the work a kernel must do."""
    return int(vis.sum())


def tiles_needed(vis: torch.Tensor, block_q: int, block_k: int) -> int:
    """Tiles of `block_q` x `block_k` holding at least one visible pair, summed over batch and heads:
    what a kernel that skips fully invisible tiles computes (the work-efficiency figure: tiles computed /
    tiles needed)."""
    *lead, Sq, Sk = vis.shape
    pad_q, pad_k = (-Sq) % block_q, (-Sk) % block_k
    v = torch.nn.functional.pad(vis.to(torch.uint8), (0, pad_k, 0, pad_q))
    v = v.view(*lead, (Sq + pad_q) // block_q, block_q, (Sk + pad_k) // block_k, block_k)
    return int(v.amax(dim=(-3, -1)).sum())


def tiles_full(vis: torch.Tensor, block_q: int, block_k: int) -> int:
    """Tiles of `block_q` x `block_k` lying inside the (Sq, Sk) plane whose every pair is visible: those a
    kernel computes without per-element mask arithmetic."""
    *lead, Sq, Sk = vis.shape
    nq, nk = Sq // block_q, Sk // block_k
    v = vis[..., :nq * block_q, :nk * block_k].reshape(*lead, nq, block_q, nk, block_k)
    return int(v.all(dim=-1).all(dim=-2).sum())


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, causal: bool = False, window_size=(-1, -1),
                     alibi_slopes=None, scale: float | None = None,
                     compute_dtype: torch.dtype | None = None, dropout_p: float = 0.0, dropout_seed=0,
                     dropout_offset=0, sample_ids=None) -> torch.Tensor:
    """Packed layout (q: (total_q, Hq, D), k/v: (total_k, Hkv, D)): sequence b, tokens
    cu_seqlens[b]:cu_seqlens[b + 1], attends within itself, as a batch row of `attention` of its own
    (causal and the window bottom-right aligned per sequence; alibi_slopes (Hq,) or (B, Hq); dropout keyed
    by sample_ids[b], default b). Reads cu_seqlens on the host."""
    bounds = zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(),
                 cu_seqlens_k[1:].tolist())
    row = lambda t, a, b: t[a:b].transpose(0, 1).unsqueeze(0)  # noqa: E731 - (1, H, len, D)
    samples = range(cu_seqlens_q.shape[0] - 1) if sample_ids is None else sample_ids.tolist()
    Hq = q.shape[1]
    slopes = lambda n: (None if alibi_slopes is None  # noqa: E731 - sequence n's (Hq,) slopes
                        else alibi_slopes.reshape(-1, Hq)[n if alibi_slopes.dim() == 2 else 0])
    outs = [attention(row(q, a, b), row(k, c, d), row(v, c, d), causal=causal, window_size=window_size,
                      alibi_slopes=slopes(n), scale=scale, compute_dtype=compute_dtype,
                      dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_offset=dropout_offset,
                      sample_ids=torch.tensor([s]))[0].transpose(0, 1)
            for n, ((a, b, c, d), s) in enumerate(zip(bounds, samples))]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
