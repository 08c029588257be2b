"""CPU backend of masked cross-entropy and of the LM head fused with it: only labelled rows are computed,
in fp32 (fp64 for fp64 inputs), CHUNK_ROWS rows at a time, so that extra memory is O(CHUNK_ROWS x V)
whatever N is (plus, for the fused head, an fp32 copy of the weight and its gradient accumulator).

Forward: per labelled row the log-sum-exp (saved) and the loss. Backward: d loss_i / d x_ij =
g_i * (softmax_ij * (1 + 2 z lse_i) - (1 - eps) [j == y_i] - eps / V), recomputed from the saved lse
chunk by chunk; unlabelled rows get exactly 0.
"""
from __future__ import annotations

import torch

# Rows per chunk. 4096 x 30522 fp32 would be 500 MB; 256 rows keep a chunk at ~31 MB for BERT's vocabulary
# and still amortise the per-chunk Python overhead (measured ~0.1 ms per chunk on 2 cores).
CHUNK_ROWS = 256


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunks(labels: torch.Tensor, ignore_index: int):
    """Index tensors of the labelled rows, CHUNK_ROWS at a time (CPU tensors: reading them syncs nothing)."""
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return rows.split(CHUNK_ROWS)


def _chunk_loss(x: torch.Tensor, y: torch.Tensor, label_smoothing: float, z_loss: float):
    """(loss, lse) of a chunk of labelled rows: logits x (c, V) in the accumulation dtype, labels y (c,)."""
    lse = torch.logsumexp(x, dim=1)
    target = x.gather(1, y[:, None]).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - target) + label_smoothing * (lse - x.mean(dim=1)) + z_loss * lse * lse
    return loss, lse


def _chunk_grad(x: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, label_smoothing: float,
                z_loss: float) -> torch.Tensor:
    """d loss / d x (c, V) of a chunk, for the per-row upstream gradient g (c,)."""
    d = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse[:, None]) - label_smoothing / x.shape[1]
    d.scatter_add_(1, y[:, None], torch.full((y.numel(), 1), -(1.0 - label_smoothing), dtype=x.dtype))
    return d * g[:, None]


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
            z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss (N,), per-row lse (N,)), both in the accumulation dtype; 0 on unlabelled rows."""
    acc = _acc_dtype(logits)
    loss = torch.zeros(labels.shape[0], dtype=acc)
    lse = torch.zeros(labels.shape[0], dtype=acc)
    for idx in _chunks(labels, ignore_index):
        row, l = _chunk_loss(logits.index_select(0, idx).to(acc), labels.index_select(0, idx), label_smoothing,
                             z_loss)
        loss.index_copy_(0, idx, row)
        lse.index_copy_(0, idx, l)
    return loss, lse


def backward(grad_rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """d loss / d logits (N, V) in the logits' dtype for the upstream per-row gradient (N,)."""
    acc = _acc_dtype(logits)
    grad = torch.zeros_like(logits)
    for idx in _chunks(labels, ignore_index):
        d = _chunk_grad(logits.index_select(0, idx).to(acc), labels.index_select(0, idx), lse.index_select(0, idx),
                        grad_rows.index_select(0, idx).to(acc), label_smoothing, z_loss)
        grad.index_copy_(0, idx, d.to(logits.dtype))
    return grad


# ------------------------------------------------------------------------------------------------
# LM head fused with the loss: logits = hidden @ weight.T + bias, for labelled rows only, chunk by chunk
# ------------------------------------------------------------------------------------------------

def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    x = h @ w.T
    return x if b is None else x + b


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                   ignore_index: int, label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss (N,), lse (N,)) without ever holding more than CHUNK_ROWS x V logits."""
    acc = _acc_dtype(hidden)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    loss = torch.zeros(labels.shape[0], dtype=acc)
    lse = torch.zeros(labels.shape[0], dtype=acc)
    for idx in _chunks(labels, ignore_index):
        x = _logits(hidden.index_select(0, idx).to(acc), w, b)
        row, l = _chunk_loss(x, labels.index_select(0, idx), label_smoothing, z_loss)
        loss.index_copy_(0, idx, row)
        lse.index_copy_(0, idx, l)
    return loss, lse


def linear_backward(grad_rows, hidden, weight, bias, labels, lse, ignore_index: int, label_smoothing: float,
                    z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) for the per-row upstream gradient; the labelled rows' logits are
    recomputed chunk by chunk (one more matmul than keeping them, O(CHUNK_ROWS x V) memory instead of
    O(N x V)); d weight and d bias accumulate in fp32 (fp64) over the chunks, in a fixed order."""
    acc = _acc_dtype(hidden)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    d_hidden = torch.zeros_like(hidden)
    d_weight = torch.zeros_like(w)
    d_bias = torch.zeros(weight.shape[0], dtype=acc)
    for idx in _chunks(labels, ignore_index):
        h = hidden.index_select(0, idx).to(acc)
        d = _chunk_grad(_logits(h, w, b), labels.index_select(0, idx), lse.index_select(0, idx),
                        grad_rows.index_select(0, idx).to(acc), label_smoothing, z_loss)
        d_hidden.index_copy_(0, idx, (d @ w).to(hidden.dtype))
        d_weight.addmm_(d.T, h)
        d_bias += d.sum(dim=0)
    return d_hidden, d_weight.to(weight.dtype), d_bias.to(weight.dtype)
