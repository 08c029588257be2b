"""The LM head fused with the masked loss, independent of the backend: compaction of the labelled rows, the
loop over chunks of them, and the gradient matmuls. A backend supplies `rows_fn`, which turns a chunk of
logits into per-row (loss, lse) and, when asked, overwrites the chunk with its weighted gradient in the
same pass (cpu.rows_inplace: PyTorch ops; triton_ce.rows: the Triton kernel).

Per chunk of c labelled rows: x = h_c @ W.T + b (c x V, the only large buffer), loss and gradient in place,
then d h_c = x @ W, d W += x.T @ h_c, d b += sum_rows x, with d W and d b accumulated in fp32 (fp64 for fp64
inputs) whatever the input dtype. So the peak extra memory is one c x V chunk plus d W's accumulator, and
the work is proportional to the labelled rows: (2 + 4) x c x H x V flops per chunk with gradients.

Finding the labelled rows: with `max_rows` < 0, `nonzero` counts them, which synchronises the host with a
CUDA device (free for CPU tensors). With a caller-given upper bound `max_rows` (masking with an exact count
provides one) nothing synchronises: `nonzero_static` pads the row list with a sentinel row N whose label is
ignore_index (it costs bound - count rows of work), and if more rows than the bound are labelled the loss
and every gradient are NaN rather than silently dropping rows.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from .._common import acc_dtype
from .inputs import LossOptions


def labelled_rows(labels: torch.Tensor, ignore_index: int, max_rows: int):
    """(row indices (M,) into labels padded with a sentinel row N, their labels (M,), overflow flag or None)."""
    keep = labels != ignore_index
    n = labels.shape[0]
    if max_rows < 0:
        idx = keep.nonzero().squeeze(1)
        return idx, labels.index_select(0, idx), None
    idx = torch.nonzero_static(keep, size=max_rows, fill_value=n).squeeze(1)
    padded = torch.cat([labels, labels.new_full((1,), ignore_index)])
    return idx, padded.index_select(0, idx), keep.sum() > max_rows


@functools.cache
def _mm_out_dtype_on_cuda() -> bool:
    """torch.mm(a, b, out_dtype=torch.float32) for bf16/fp16 operands (cuBLAS, fp32 output) exists here."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")


def _addmm_acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with out's (fp32 / fp64) accumulation, never a low-precision partial sum."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda and _mm_out_dtype_on_cuda():
        out.add_(torch.mm(a, b, out_dtype=out.dtype))
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
        rows_fn: Callable, opts: LossOptions, *, max_rows: int,
        chunk_rows: int, compute_dtype: torch.dtype, row_weight: torch.Tensor | None = None):
    """(per-row loss (N,), d hidden (N, H), d weight (V, H), d bias (V,)) for hidden (N, H) and labels (N,).

    `row_weight` None: the loss only (the gradients are None). Otherwise the gradients of
    sum_i w_i * loss_i, with w a 0-dim tensor (one weight for every row) or (N,) per row. The loss is in the
    accumulation dtype, d hidden in hidden's dtype, d weight and d bias in the accumulation dtype.
    Logits are computed in `compute_dtype` (the accumulation dtype for the cpu backend; the input dtype for
    Triton, whose kernel accumulates in fp32 and whose matmuls accumulate in fp32 in cuBLAS).
    """
    N, H = hidden.shape
    acc = acc_dtype(hidden)
    idx, y, overflow = labelled_rows(labels, opts.ignore_index, max_rows)
    src = idx.clamp_max(max(N - 1, 0))  # the sentinel row N reads row N - 1 (its label is ignore_index)
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    loss = torch.zeros(N + 1, dtype=acc, device=hidden.device)
    want_grad = row_weight is not None
    if want_grad:
        d_hidden = torch.zeros(N + 1, H, dtype=hidden.dtype, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=acc, device=hidden.device)
        d_bias = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if bias is not None else None
        if overflow is not None:  # more labelled rows than max_rows: NaN gradients, never silently partial
            row_weight = row_weight * torch.where(overflow, float("nan"), 1.0).to(row_weight.dtype)
        if row_weight.dim():
            row_weight = torch.cat([row_weight.to(acc), row_weight.new_zeros(1, dtype=acc)])
    for start in range(0, idx.shape[0] if N else 0, chunk_rows):
        i, s = idx[start:start + chunk_rows], src[start:start + chunk_rows]
        h = hidden.index_select(0, s).to(compute_dtype)
        x = torch.nn.functional.linear(h, w, b)
        wc = None
        if want_grad:
            wc = row_weight.index_select(0, i) if row_weight.dim() else row_weight.to(acc)
        row_loss, _ = rows_fn(x, y[start:start + chunk_rows], opts, x if want_grad else None, wc)
        loss.index_copy_(0, i, row_loss)
        if want_grad:  # x now holds d loss / d logits of the chunk
            d_hidden.index_copy_(0, i, (x @ w).to(hidden.dtype))
            _addmm_acc(d_weight, x.T, h)
            if d_bias is not None:
                d_bias += x.sum(dim=0, dtype=acc)
        del x, h  # before the next chunk's matmul allocates its buffer: one chunk alive at a time
    loss = loss[:N]
    if overflow is not None:
        loss = torch.where(overflow, float("nan"), loss)
    if not want_grad:
        return loss, None, None, None
    return loss, d_hidden[:N], d_weight, d_bias
