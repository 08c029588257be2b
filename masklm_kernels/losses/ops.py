"""torch.library registration of the CPU backend of `masked_cross_entropy` and `fused_linear_cross_entropy`:
per-row forward and backward custom ops with fake implementations, joined by `register_autograd`. The
reduction is applied outside the op, in plain
differentiable torch (reference.reduce), so that no host synchronisation is needed for the mean."""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("masklm_kernels::cross_entropy_cpu_fwd", mutates_args=(), device_types="cpu")
def cross_entropy_cpu_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu.forward(logits, labels, ignore_index, label_smoothing, z_loss)


@cross_entropy_cpu_fwd.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss):
    n = labels.shape[0]
    return logits.new_empty(n, dtype=_acc_dtype(logits)), logits.new_empty(n, dtype=_acc_dtype(logits))


@torch.library.custom_op("masklm_kernels::cross_entropy_cpu_bwd", mutates_args=(), device_types="cpu")
def cross_entropy_cpu_bwd(grad_rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                          ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    return cpu.backward(grad_rows, logits, labels, lse, ignore_index, label_smoothing, z_loss)


@cross_entropy_cpu_bwd.register_fake
def _(grad_rows, logits, labels, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = ignore_index, label_smoothing, z_loss


def _backward(ctx, grad_rows, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad = cross_entropy_cpu_bwd(grad_rows.contiguous(), logits, labels, lse, ctx.ignore_index,
                                 ctx.label_smoothing, ctx.z_loss)
    return grad, None, None, None, None


cross_entropy_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("masklm_kernels::linear_cross_entropy_cpu_fwd", mutates_args=(), device_types="cpu")
def linear_cross_entropy_cpu_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu.linear_forward(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss)


@linear_cross_entropy_cpu_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss):
    n = labels.shape[0]
    return hidden.new_empty(n, dtype=_acc_dtype(hidden)), hidden.new_empty(n, dtype=_acc_dtype(hidden))


@torch.library.custom_op("masklm_kernels::linear_cross_entropy_cpu_bwd", mutates_args=(), device_types="cpu")
def linear_cross_entropy_cpu_bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
                                 ignore_index: int, label_smoothing: float, z_loss: float,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu.linear_backward(grad_rows, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, z_loss)


@linear_cross_entropy_cpu_bwd.register_fake
def _(grad_rows, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = ignore_index, label_smoothing, z_loss


def _linear_backward(ctx, grad_rows, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    d_hidden, d_weight, d_bias = linear_cross_entropy_cpu_bwd(grad_rows.contiguous(), hidden, weight, bias, labels,
                                                              lse, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss)
    return d_hidden, d_weight, (d_bias if bias is not None else None), None, None, None, None


linear_cross_entropy_cpu_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)
