"""Visibility of (query, key) pairs from the O(B) mask metadata (docs/SEMANTICS.md, "Attention").

Shared by the reference (whole (Sq, Sk) plane) and the CPU backend (one block of query rows at a time,
so that it never holds more than (B, block, Sk)). Key j is visible to query i when every given
condition holds:

* causal: `j <= i + off_b`, bottom-right aligned: `off_b = kv_lengths[b] - q_lengths[b]` when both
  lengths are given (the diagonal ends at each row's last real query and key, as in the packed layout
  and FlashAttention's varlen), else `Sk - Sq` (padded sizes: self-attention with `kv_lengths` alone
  keeps the top-left diagonal); with `prefix_lengths`, also `j < prefix[b]`;

        q_lengths = [5], kv_lengths = [8], Sq = Sk = 8: off = 3      (x visible, . not)
            j: 0 1 2 3 4 5 6 7
        i=0    x x x x . . . .
        i=1    x x x x x . . .
          ...
        i=4    x x x x x x x x
        i=5-7  . . . . . . . .   (padding rows)
* kv_lengths: `j < kv_lengths[b]`;  q_lengths: row `i < q_lengths[b]` (padding rows see nothing);
* spans `[start, end)` (B, 2) or (B, K, 2): `"inside"` -- j in a span, and row i in a span (the MASS
  decoder: rows outside every span are not computed); `"outside"` -- j in no span;
* window `(left, right)` (sliding window, FlashAttention's `window_size`; -1 = unbounded on that side):
  `i + off_b - left <= j <= i + off_b + right`, with the causal rule's offset, AND-ed with every other
  rule (a prefix does not widen it):

        window (2, 1), Sq = Sk = 6, off = 0        with causal=True: window (2, 0)
            j: 0 1 2 3 4 5                            j: 0 1 2 3 4 5
        i=0    x x . . . .                        i=0    x . . . . .
        i=1    x x x . . .                        i=1    x x . . . .
        i=2    x x x x . .                        i=2    x x x . . .
        i=3    . x x x x .                        i=3    . x x x . .
        i=4    . . x x x x                        i=4    . . x x x .
        i=5    . . . x x x                        i=5    . . . x x x
"""
from __future__ import annotations

import torch

SPAN_MODES = ("inside", "outside")


def in_spans(spans: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: position p of row b lies in one of the row's `[start, end)` spans.

    `spans` is (B, 2) or (B, K, 2); empty spans (start >= end) contain nothing."""
    if spans.dim() == 2:
        spans = spans[:, None, :]
    start, end = spans[..., 0:1], spans[..., 1:2]  # (B, K, 1)
    pos = positions.view(1, 1, -1)
    return ((pos >= start) & (pos < end)).any(dim=1)


def diagonal_offset(batch: int, seq_q: int, seq_k: int, kv_lengths=None, q_lengths=None):
    """The causal / window offset `off_b`: an int, or (B, 1, 1) when both lengths are given (clipped to the
    sizes, as the kernels do)."""
    if kv_lengths is not None and q_lengths is not None:
        return (kv_lengths.clamp(0, seq_k) - q_lengths.clamp(0, seq_q)).view(batch, 1, 1)
    return seq_k - seq_q


def visibility(batch: int, seq_q: int, seq_k: int, *, causal: bool = False, kv_lengths=None, q_lengths=None,
               prefix_lengths=None, spans=None, span_mode: str = "inside", window_size=(-1, -1), device=None,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, 1, R, Sk) bool visibility of query rows `rows = (i0, i1)` (default all: R = Sq)."""
    window_left, window_right = window_size
    if span_mode not in SPAN_MODES:
        raise ValueError(f"span_mode must be one of {SPAN_MODES}, got {span_mode!r}")
    if prefix_lengths is not None and not causal:
        raise ValueError("prefix_lengths requires causal=True")
    i0, i1 = rows if rows is not None else (0, seq_q)
    i = torch.arange(i0, i1, device=device).view(1, -1, 1)
    j = torch.arange(seq_k, device=device).view(1, 1, seq_k)
    vis = torch.ones(batch, i1 - i0, seq_k, dtype=torch.bool, device=device)
    off = diagonal_offset(batch, seq_q, seq_k, kv_lengths, q_lengths)
    if window_left >= 0:
        vis &= j >= i + off - window_left
    if window_right >= 0:
        vis &= j <= i + off + window_right
    if causal:
        allowed = j <= i + off
        if prefix_lengths is not None:
            allowed = allowed | (j < prefix_lengths.view(batch, 1, 1))
        vis &= allowed
    if kv_lengths is not None:
        vis &= j < kv_lengths.view(batch, 1, 1)
    if q_lengths is not None:
        vis &= i < q_lengths.view(batch, 1, 1)
    if spans is not None:
        key_in = in_spans(spans, j.view(-1))  # (B, Sk)
        if span_mode == "inside":
            vis &= key_in[:, None, :] & in_spans(spans, i.view(-1))[:, :, None]
        else:
            vis &= ~key_in[:, None, :]
    return vis[:, None]
