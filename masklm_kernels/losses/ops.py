"""torch.library registration of the loss backends: custom ops with fake implementations, joined by
`register_autograd` (the in-place gradient variant, which mutates the logits, by an autograd.Function).

Two shapes of op per loss:
* per-row ops `<loss>_<backend>_fwd` / `_bwd`: the forward returns the per-row loss, the backward
  recomputes and writes the gradient for any per-row upstream gradient (reduction "none", or no
  gradient wanted); the reduction is applied outside, in differentiable torch (reference.reduce), so that
  the mean needs no host synchronisation.
* reduced ops `<loss>_<backend>_reduced` (Triton CE; both backends of the fused head): for "mean" and
  "sum" with a gradient wanted, the forward computes the gradient of scale * sum(loss) in the same pass
  (FlashAttention-style fusion, as Liger's), and the backward only multiplies it by the upstream scalar,
  in place on the saved gradient (whose version counter then makes a second backward through it raise
  instead of returning twice-scaled gradients).

Under autocast the fused head's forward ops take hidden, weight and bias in the autocast dtype, as
F.linear does; the cross-entropy ops take the logits as they are (_autocast.py).

The backend modules are imported when an op first runs: triton is an optional dependency.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _autocast
from .._common import acc_dtype
from . import cpu, linear


@torch.library.custom_op("masklm_kernels::cross_entropy_cpu_fwd", mutates_args=(), device_types="cpu")
def cross_entropy_cpu_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu.forward(logits, labels, ignore_index, label_smoothing, z_loss)


@cross_entropy_cpu_fwd.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss):
    n = labels.shape[0]
    return logits.new_empty(n, dtype=acc_dtype(logits)), logits.new_empty(n, dtype=acc_dtype(logits))


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



def _scaled(saved: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """saved * g, in place on plain eager tensors (no second buffer; the bumped version counter makes a second
    backward through the same graph raise). Traced (torch.compile, AOT autograd: functional tensor
    subclasses) or any other subclass: out of place."""
    g = g.to(saved.dtype)
    if type(saved) is not torch.Tensor or torch.compiler.is_compiling():
        return saved * g
    return saved.mul_(g)


# ------------------------------------------------------------------------------------------------
# masked_cross_entropy, Triton: per-row ops, the reduced op, and the in-place variant
# ------------------------------------------------------------------------------------------------

def _triton():
    return importlib.import_module(f"{__package__}.triton_ce")


@torch.library.custom_op("masklm_kernels::cross_entropy_triton_fwd", mutates_args=())
def cross_entropy_triton_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                             z_loss: float) -> torch.Tensor:
    return _triton().rows(logits, labels, ignore_index, label_smoothing, z_loss)[0]


@cross_entropy_triton_fwd.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(labels.shape[0], dtype=acc_dtype(logits))


@torch.library.custom_op("masklm_kernels::cross_entropy_triton_bwd", mutates_args=())
def cross_entropy_triton_bwd(grad_rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float) -> torch.Tensor:
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _triton().rows(logits, labels, ignore_index, label_smoothing, z_loss, grad, grad_rows.to(acc_dtype(logits)))
    return grad


@cross_entropy_triton_bwd.register_fake
def _(grad_rows, logits, labels, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _triton_setup(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(logits, labels)
    ctx.options = (ignore_index, label_smoothing, z_loss)


def _triton_backward(ctx, grad_rows):
    logits, labels = ctx.saved_tensors
    return cross_entropy_triton_bwd(grad_rows.contiguous(), logits, labels, *ctx.options), None, None, None, None


cross_entropy_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


@torch.library.custom_op("masklm_kernels::cross_entropy_triton_reduced", mutates_args=())
def cross_entropy_triton_reduced(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                                 label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * sum of the row losses, its gradient d/d logits), one launch."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    rows, _ = _triton().rows(logits, labels, ignore_index, label_smoothing, z_loss, grad, scale)
    return rows.sum() * scale, grad


@cross_entropy_triton_reduced.register_fake
def _(logits, labels, scale, ignore_index, label_smoothing, z_loss):
    return logits.new_empty((), dtype=acc_dtype(logits)), torch.empty_like(logits,
                                                                             memory_format=torch.contiguous_format)


def _reduced_setup(ctx, inputs, output):
    # the gradient output carries no gradient: without this autograd would allocate zeros of its size
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _reduced_backward(ctx, g, _g_grad):
    (grad,) = ctx.saved_tensors
    return _scaled(grad, g), None, None, None, None, None


cross_entropy_triton_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)


@torch.library.custom_op("masklm_kernels::cross_entropy_triton_reduced_inplace", mutates_args=("logits",))
def cross_entropy_triton_reduced_inplace(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                                         ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """As cross_entropy_triton_reduced, with the gradient written over the logits."""
    rows, _ = _triton().rows(logits, labels, ignore_index, label_smoothing, z_loss, logits, scale)
    return rows.sum() * scale


@cross_entropy_triton_reduced_inplace.register_fake
def _(logits, labels, scale, ignore_index, label_smoothing, z_loss):
    return logits.new_empty((), dtype=acc_dtype(logits))


class InplaceGradCrossEntropy(torch.autograd.Function):
    """The loss, with d loss / d logits written over the logits buffer in the forward (no second N x V
    buffer); the backward scales that buffer in place and returns it."""

    @staticmethod
    def forward(ctx, logits, labels, scale, ignore_index, label_smoothing, z_loss):
        total = cross_entropy_triton_reduced_inplace(logits, labels, scale, ignore_index, label_smoothing, z_loss)
        ctx.save_for_backward(logits)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g.to(grad.dtype)), None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy: one registration per backend around linear.run
# ------------------------------------------------------------------------------------------------

def _linear_run(backend: str, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, max_rows,
                row_weight=None):
    if backend == "cpu":
        acc = acc_dtype(hidden)
        rows_fn, compute, chunk = cpu.rows_inplace, acc, cpu.chunk_rows(weight.shape[0], torch.finfo(acc).bits // 8)
    else:
        tri = _triton()
        rows_fn, compute, chunk = tri.rows, hidden.dtype, tri.chunk_rows(weight.shape[0], hidden.element_size())
    return linear.run(hidden, weight, bias, labels, rows_fn, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, z_loss=z_loss, max_rows=max_rows, chunk_rows=chunk,
                      compute_dtype=compute, row_weight=row_weight)


def _register_linear(backend: str):
    """(fwd, bwd, reduced) ops of the fused LM head + loss for one backend."""
    device_types = "cpu" if backend == "cpu" else None
    name = f"masklm_kernels::linear_cross_entropy_{backend}"

    @torch.library.custom_op(f"{name}_fwd", mutates_args=(), device_types=device_types)
    def fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
            ignore_index: int, label_smoothing: float, z_loss: float, max_rows: int) -> torch.Tensor:
        return _linear_run(backend, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, max_rows)[0]

    @fwd.register_fake
    def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, max_rows):
        return hidden.new_empty(labels.shape[0], dtype=acc_dtype(hidden))

    @torch.library.custom_op(f"{name}_bwd", mutates_args=(), device_types=device_types)
    def bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, max_rows: int,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, dh, dw, db = _linear_run(backend, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                                    max_rows, grad_rows)
        db = weight.new_zeros(weight.shape[0]) if db is None else db.to(weight.dtype)
        return dh, dw.to(weight.dtype), db

    @bwd.register_fake
    def _(grad_rows, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, max_rows):
        return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(weight.shape[0])

    def setup(ctx, inputs, output):
        hidden, weight, bias, labels, *options = inputs
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.options = options

    def backward(ctx, grad_rows):
        hidden, weight, bias, labels = ctx.saved_tensors
        dh, dw, db = bwd(grad_rows.contiguous(), hidden, weight, bias, labels, *ctx.options)
        return dh, dw, (db if bias is not None else None), None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup)

    @torch.library.custom_op(f"{name}_reduced", mutates_args=(), device_types=device_types)
    def reduced(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                scale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, max_rows: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale * sum of the row losses, and its gradients: d hidden, d weight and d bias in the
        accumulation dtype), computed in one pass over the labelled rows."""
        rows, dh, dw, db = _linear_run(backend, hidden, weight, bias, labels, ignore_index, label_smoothing,
                                       z_loss, max_rows, scale.to(acc_dtype(hidden)))
        return rows.sum() * scale, dh, dw, (dw.new_zeros(weight.shape[0]) if db is None else db)

    @reduced.register_fake
    def _(hidden, weight, bias, labels, scale, ignore_index, label_smoothing, z_loss, max_rows):
        acc = acc_dtype(hidden)
        return (hidden.new_empty((), dtype=acc), torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=acc),
                weight.new_empty(weight.shape[0], dtype=acc))

    def reduced_setup(ctx, inputs, output):
        _, dh, dw, db = output
        ctx.set_materialize_grads(False)  # else autograd allocates zero gradients for dh, dw and db
        ctx.mark_non_differentiable(dh, dw, db)
        ctx.save_for_backward(dh, dw, db if inputs[2] is not None else None)
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)

    def reduced_backward(ctx, g, _gdh, _gdw, _gdb):
        dh, dw, db = ctx.saved_tensors
        d_weight = _scaled(dw, g).to(ctx.dtypes[1])
        d_bias = None if db is None else _scaled(db, g).to(ctx.dtypes[1])
        d_hidden = _scaled(dh, g)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None

    reduced.register_autograd(reduced_backward, setup_context=reduced_setup)
    for op in ("fwd", "reduced"):  # hidden, weight, bias in the autocast dtype, as F.linear (_autocast.py)
        _autocast.register(f"{name}_{op}", positions=(0, 1, 2))
    _autocast.register(f"{name}_bwd", positions=())  # a backward run inside autocast: computed as without
    return fwd, bwd, reduced


LINEAR = {backend: _register_linear(backend) for backend in ("cpu", "triton")}

# The cross-entropy ops take the logits in their own dtype; registered without casts, so that what they
# compute inside (a backward run inside an autocast block included) is what they compute outside one.
for _name in ("cross_entropy_cpu_fwd", "cross_entropy_cpu_bwd", "cross_entropy_triton_fwd", "cross_entropy_triton_bwd",
              "cross_entropy_triton_reduced"):
    _autocast.register(f"masklm_kernels::{_name}", positions=())
