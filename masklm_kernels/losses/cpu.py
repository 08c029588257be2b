"""CPU backend of masked cross-entropy and of the LM head fused with it: only labelled rows are computed,
in fp32 (fp64 for fp64 inputs), `chunk_rows(V)` rows at a time, so that extra memory is O(chunk x V)
whatever N is (plus, for the fused head, an fp32 copy of a low-precision weight and the gradient accumulator).

masked_cross_entropy: forward, per labelled row the log-sum-exp (saved) and the loss; backward, d loss_i / d x_ij
= g_i * (softmax_ij * (1 + 2 z lse_i) - (1 - eps) [j == y_i] - eps / V), recomputed from the saved lse chunk
by chunk; unlabelled rows get exactly 0. The fused LM head: `rows_inplace`, run chunk by chunk by linear.run.
"""
from __future__ import annotations

import torch

from .._common import acc_dtype
from .inputs import LossOptions

# Rows per chunk: as many as fit in CHUNK_BYTES of fp32 logits, at least MIN_CHUNK_ROWS. Measured for the
# fused head (N = 4096, H = 256, V = 30522, 15% labelled, fwd+bwd, 2 cores, torch 2.13; time / peak memory,
# of which 33.8 MiB are the returned gradients): 32 rows 182 ms / 37.6 MiB, 64 rows 149 / 41.4, 128 rows
# 123 / 49.0, 256 rows 125 / 64.1, 512 rows 135 / 94.5. 8 MiB (68 rows at V = 30522) keeps the extra memory
# near 8 MiB at 1.2x the fastest time; fewer rows than 32 cost more in per-chunk overhead than they save.
CHUNK_BYTES = 8 << 20
MIN_CHUNK_ROWS = 32


def chunk_rows(V: int, itemsize: int = 4) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (V * itemsize))


def _chunks(labels: torch.Tensor, ignore_index: int, V: int, itemsize: int):
    """Index tensors of the labelled rows, a chunk at a time (CPU tensors: reading them syncs nothing)."""
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return rows.split(chunk_rows(V, itemsize))


def _chunk_loss(x: torch.Tensor, y: torch.Tensor, label_smoothing: float, z_loss: float):
    """(loss, lse) of a chunk of labelled rows: logits x (c, V) in the accumulation dtype, labels y (c,)."""
    lse = torch.logsumexp(x, dim=1)
    target = x.gather(1, y[:, None]).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - target)
    if label_smoothing:  # left out when 0, not multiplied: 0 * inf (a -inf logit) would be NaN
        loss = loss + label_smoothing * (lse - x.mean(dim=1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return loss, lse


def _chunk_grad(x: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, label_smoothing: float,
                z_loss: float) -> torch.Tensor:
    """d loss / d x (c, V) of a chunk, for the per-row upstream gradient g (c,)."""
    d = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse[:, None]) - label_smoothing / x.shape[1]
    d.scatter_add_(1, y[:, None], torch.full((y.numel(), 1), -(1.0 - label_smoothing), dtype=x.dtype))
    return d * g[:, None]


def forward(logits: torch.Tensor, labels: torch.Tensor, opts: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss (N,), per-row lse (N,)), both in the accumulation dtype; 0 on unlabelled rows."""
    acc = acc_dtype(logits)
    loss = torch.zeros(labels.shape[0], dtype=acc)
    lse = torch.zeros(labels.shape[0], dtype=acc)
    for idx in _chunks(labels, opts.ignore_index, logits.shape[1], torch.finfo(acc).bits // 8):
        row, l = _chunk_loss(logits.index_select(0, idx).to(acc), labels.index_select(0, idx), opts.label_smoothing,
                             opts.z_loss)
        loss.index_copy_(0, idx, row)
        lse.index_copy_(0, idx, l)
    return loss, lse


def backward(grad_rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             opts: LossOptions) -> torch.Tensor:
    """d loss / d logits (N, V) in the logits' dtype for the upstream per-row gradient (N,)."""
    acc = acc_dtype(logits)
    grad = torch.zeros_like(logits)
    for idx in _chunks(labels, opts.ignore_index, logits.shape[1], torch.finfo(acc).bits // 8):
        d = _chunk_grad(logits.index_select(0, idx).to(acc), labels.index_select(0, idx), lse.index_select(0, idx),
                        grad_rows.index_select(0, idx).to(acc), opts.label_smoothing, opts.z_loss)
        grad.index_copy_(0, idx, d.to(logits.dtype))
    return grad


# ------------------------------------------------------------------------------------------------
# LM head fused with the loss (driven by linear.run): a chunk's loss and gradient, in place
# ------------------------------------------------------------------------------------------------

def rows_inplace(x: torch.Tensor, y: torch.Tensor, opts: LossOptions, grad: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None):
    """(loss (c,), lse (c,)) of a chunk of logits x (c, V) in the accumulation dtype; with `grad` (which must
    be x) x is overwritten by weight_i * d loss_i / d x_i. No second c x V buffer: exp, the normalisation
    and the smoothing and true-class terms are applied in place (the chunk is the peak memory)."""
    assert grad is None or grad is x
    ignore_index, label_smoothing, z_loss = opts
    keep = y != ignore_index
    ys = torch.where(keep, y, 0)[:, None]
    target = x.gather(1, ys).squeeze(1)
    mean = x.mean(dim=1) if label_smoothing else None
    m = x.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = x.sub_(m).exp_().sum(dim=1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - target)
    if z_loss:
        loss = loss + z_loss * lse * lse
    if label_smoothing:
        loss = loss + label_smoothing * (lse - mean)
    loss, lse = torch.where(keep, loss, 0.0), torch.where(keep, lse, 0.0)
    if grad is not None:
        w = torch.where(keep, weight.expand(keep.shape), 0.0)
        x.mul_(((1.0 + 2.0 * z_loss * lse) * w)[:, None] / s)
        if label_smoothing:
            x.sub_((label_smoothing / x.shape[1] * w)[:, None])
        x.scatter_add_(1, ys, (-(1.0 - label_smoothing) * w)[:, None])
    return loss, lse
