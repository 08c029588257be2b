"""Masked cross-entropy, the plain specification (docs/SEMANTICS.md, "Cross-entropy"); also the test oracle.

Dense on purpose: it computes every row in `compute_dtype` (float64 for the oracle) with autograd, the way
`F.cross_entropy` defines the loss, plus the z-loss. Per labelled row i with target y:

    lse_i   = logsumexp_j x_ij
    loss_i  = (1 - eps) * (lse_i - x_iy) + eps * (lse_i - mean_j x_ij) + z * lse_i ** 2

(torch's label smoothing: eps / V on every class), 0 on rows whose label is `ignore_index`. Reductions:
"none" (per row, the labels' shape), "sum", "mean" = sum / (num_items, or the number of labelled rows);
with no labelled row the mean is 0 with zero gradients (torch gives NaN).
"""
from __future__ import annotations

import torch


def row_losses(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N,) loss of each row of 2-D `logits` (N, V) in `compute_dtype`; 0 where labels == ignore_index."""
    x = logits.to(compute_dtype or logits.dtype)
    keep = labels != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, torch.where(keep, labels, 0)[:, None]).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - target)
    # terms whose weight is 0 are left out, not multiplied by 0: a -inf logit makes them infinite, and 0 * inf
    # would turn F.cross_entropy's finite loss into NaN
    if label_smoothing:
        loss = loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(keep, loss, torch.zeros_like(loss))


def reduce(rows: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str, num_items) -> torch.Tensor:
    """Applies `reduction` to per-row losses (N,) of labels of any shape; no host synchronisation."""
    if reduction == "none":
        return rows.reshape(labels.shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum() if num_items is None else num_items
    # every row ignored: total is exactly 0 (and so is its gradient), divided by 1 instead of 0
    return total / (count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1))


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean", num_items=None,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The loss for logits (..., V) and labels (...), in `compute_dtype` (default the logits' dtype)."""
    V = logits.shape[-1]
    rows = row_losses(logits.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index,
                      label_smoothing=label_smoothing, z_loss=z_loss, compute_dtype=compute_dtype)
    return reduce(rows, labels, ignore_index, reduction, num_items)
