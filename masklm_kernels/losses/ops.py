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

Every op's schema is its leading tensors, the fields of `inputs.LossOptions`, then any trailing scalars;
`_Op` derives the schema from that description and hands its implementation, fake and autograd formulas
the options as one `LossOptions`.

Under autocast the fused head's forward ops take hidden, weight and bias in the autocast dtype, as
F.linear does; the cross-entropy ops take the logits as they are (_autocast.py).

The backend modules are imported when an op first runs: triton is an optional dependency.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .. import _autocast
from .._common import acc_dtype
from . import cpu, linear
from .inputs import LossOptions, op_signature

_T = torch.Tensor
_N_OPTIONS = len(LossOptions._fields)


class _Op:
    """The custom op `name` with the schema `leading..., <LossOptions' fields>, trailing...` -> `returns`.
    `impl` and `fake` take (*leading, options: LossOptions, *trailing); call it the same way."""

    def __init__(self, name: str, leading, returns, impl: Callable, fake: Callable, trailing=(),
                 device_types=None, mutates_args=()):
        self.n_leading, self.n_inputs = len(leading), len(leading) + _N_OPTIONS + len(trailing)

        def op(*args):
            return impl(*self.split(args))

        op.__signature__ = op_signature(leading, returns, trailing)
        op.__name__ = name.split("::")[1]
        self.op = torch.library.custom_op(name, op, mutates_args=mutates_args, device_types=device_types)
        self.op.register_fake(lambda *args: fake(*self.split(args)))
        self.name = name

    @property
    def default(self):
        """The registered operator overload (`torch.ops.masklm_kernels.<name>.default`), flat arguments."""
        return getattr(torch.ops.masklm_kernels, self.name.split("::")[1]).default

    def split(self, args) -> tuple:
        """Flat op arguments -> (*leading, LossOptions, *trailing)."""
        n = self.n_leading
        return (*args[:n], LossOptions(*args[n:n + _N_OPTIONS]), *args[n + _N_OPTIONS:])

    def __call__(self, *args):
        flat = [x for a in args for x in (a if isinstance(a, LossOptions) else (a,))]
        return self.op(*flat)

    def grads(self, *leading_grads) -> tuple:
        """The backward's return: gradients of the leading inputs, None for the options and the rest."""
        return (*leading_grads, *(None,) * (self.n_inputs - len(leading_grads)))

    def register_autograd(self, backward, setup_context):
        """`setup_context(ctx, (*leading, options, *trailing), output)`."""
        self.op.register_autograd(backward, setup_context=lambda ctx, inputs, output: setup_context(
            ctx, self.split(inputs), output))


def _acc_rows(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return x.new_empty(shape, dtype=acc_dtype(x))


def _like_contiguous(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_CE = (("logits", _T), ("labels", _T))

# ------------------------------------------------------------------------------------------------
# masked_cross_entropy, CPU: per-row ops
# ------------------------------------------------------------------------------------------------

cross_entropy_cpu_fwd = _Op("masklm_kernels::cross_entropy_cpu_fwd", _CE, tuple[_T, _T], cpu.forward,
                            lambda logits, labels, opts: (_acc_rows(logits, labels.shape[0]),
                                                          _acc_rows(logits, labels.shape[0])),
                            device_types="cpu")
cross_entropy_cpu_bwd = _Op("masklm_kernels::cross_entropy_cpu_bwd",
                            (("grad_rows", _T), *_CE, ("lse", _T)), _T, cpu.backward,
                            lambda grad_rows, logits, labels, lse, opts: torch.empty_like(logits), device_types="cpu")


def _cpu_setup(ctx, inputs, output):
    logits, labels, ctx.options = inputs
    ctx.save_for_backward(logits, labels, output[1])


def _cpu_backward(ctx, grad_rows, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    return cross_entropy_cpu_fwd.grads(cross_entropy_cpu_bwd(grad_rows.contiguous(), logits, labels, lse, ctx.options))


cross_entropy_cpu_fwd.register_autograd(_cpu_backward, setup_context=_cpu_setup)


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


def _triton_bwd(grad_rows, logits, labels, opts):
    grad = _like_contiguous(logits)
    _triton().rows(logits, labels, opts, grad, grad_rows.to(acc_dtype(logits)))
    return grad


def _triton_reduced(logits, labels, scale, opts):
    """(scale * sum of the row losses, its gradient d/d logits), one launch."""
    grad = _like_contiguous(logits)
    rows, _ = _triton().rows(logits, labels, opts, grad, scale)
    return rows.sum() * scale, grad


def _triton_reduced_inplace(logits, labels, scale, opts):
    """As the reduced op, with the gradient written over the logits."""
    rows, _ = _triton().rows(logits, labels, opts, logits, scale)
    return rows.sum() * scale


cross_entropy_triton_fwd = _Op("masklm_kernels::cross_entropy_triton_fwd", _CE, _T,
                               lambda logits, labels, opts: _triton().rows(logits, labels, opts)[0],
                               lambda logits, labels, opts: _acc_rows(logits, labels.shape[0]))
cross_entropy_triton_bwd = _Op("masklm_kernels::cross_entropy_triton_bwd", (("grad_rows", _T), *_CE), _T, _triton_bwd,
                               lambda grad_rows, logits, labels, opts: _like_contiguous(logits))
cross_entropy_triton_reduced = _Op("masklm_kernels::cross_entropy_triton_reduced", (*_CE, ("scale", _T)),
                                   tuple[_T, _T], _triton_reduced,
                                   lambda logits, labels, scale, opts: (_acc_rows(logits),
                                                                        _like_contiguous(logits)))
cross_entropy_triton_reduced_inplace = _Op("masklm_kernels::cross_entropy_triton_reduced_inplace",
                                           (*_CE, ("scale", _T)), _T, _triton_reduced_inplace,
                                           lambda logits, labels, scale, opts: _acc_rows(logits),
                                           mutates_args=("logits",))


def _triton_setup(ctx, inputs, output):
    logits, labels, ctx.options = inputs
    ctx.save_for_backward(logits, labels)


def _triton_backward(ctx, grad_rows):
    logits, labels = ctx.saved_tensors
    return cross_entropy_triton_fwd.grads(cross_entropy_triton_bwd(grad_rows.contiguous(), logits, labels,
                                                                   ctx.options))


cross_entropy_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


def _reduced_setup(ctx, inputs, output):
    # the gradient output carries no gradient: without this autograd would allocate zeros of its size
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _reduced_backward(ctx, g, _g_grad):
    (grad,) = ctx.saved_tensors
    return cross_entropy_triton_reduced.grads(_scaled(grad, g))


cross_entropy_triton_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)


class InplaceGradCrossEntropy(torch.autograd.Function):
    """The loss, with d loss / d logits written over the logits buffer in the forward (no second N x V
    buffer); the backward scales that buffer in place and returns it."""

    @staticmethod
    def forward(ctx, logits, labels, scale, opts: LossOptions):
        total = cross_entropy_triton_reduced_inplace(logits, labels, scale, opts)
        ctx.save_for_backward(logits)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g.to(grad.dtype)), None, None, None


# ------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy: one registration per backend around linear.run
# ------------------------------------------------------------------------------------------------

_HEAD = (("hidden", _T), ("weight", _T), ("bias", Optional[_T]), ("labels", _T))
_MAX_ROWS = (("max_rows", int),)


def _linear_run(backend: str, hidden, weight, bias, labels, opts: LossOptions, max_rows: int, row_weight=None):
    if backend == "cpu":
        acc = acc_dtype(hidden)
        rows_fn, compute, chunk = cpu.rows_inplace, acc, cpu.chunk_rows(weight.shape[0], torch.finfo(acc).bits // 8)
    else:
        tri = _triton()
        rows_fn, compute, chunk = tri.rows, hidden.dtype, tri.chunk_rows(weight.shape[0], hidden.element_size())
    return linear.run(hidden, weight, bias, labels, rows_fn, opts, max_rows=max_rows, chunk_rows=chunk,
                      compute_dtype=compute, row_weight=row_weight)


def _register_linear(backend: str):
    """(fwd, bwd, reduced) ops of the fused LM head + loss for one backend."""
    device_types = "cpu" if backend == "cpu" else None
    name = f"masklm_kernels::linear_cross_entropy_{backend}"

    def bwd_impl(grad_rows, hidden, weight, bias, labels, opts, max_rows):
        _, dh, dw, db = _linear_run(backend, hidden, weight, bias, labels, opts, max_rows, grad_rows)
        db = weight.new_zeros(weight.shape[0]) if db is None else db.to(weight.dtype)
        return dh, dw.to(weight.dtype), db

    def reduced_impl(hidden, weight, bias, labels, scale, opts, max_rows):
        """(scale * sum of the row losses, and its gradients: d hidden, d weight and d bias in the
        accumulation dtype), computed in one pass over the labelled rows."""
        rows, dh, dw, db = _linear_run(backend, hidden, weight, bias, labels, opts, max_rows,
                                       scale.to(acc_dtype(hidden)))
        return rows.sum() * scale, dh, dw, (dw.new_zeros(weight.shape[0]) if db is None else db)

    def reduced_fake(hidden, weight, bias, labels, scale, opts, max_rows):
        acc = acc_dtype(hidden)
        return (hidden.new_empty((), dtype=acc), torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=acc),
                weight.new_empty(weight.shape[0], dtype=acc))

    fwd = _Op(f"{name}_fwd", _HEAD, _T,
              lambda hidden, weight, bias, labels, opts, max_rows: _linear_run(
                  backend, hidden, weight, bias, labels, opts, max_rows)[0],
              lambda hidden, weight, bias, labels, opts, max_rows: _acc_rows(hidden, labels.shape[0]),
              _MAX_ROWS, device_types)
    bwd = _Op(f"{name}_bwd", (("grad_rows", _T), *_HEAD), tuple[_T, _T, _T], bwd_impl,
              lambda grad_rows, hidden, weight, bias, labels, opts, max_rows: (
                  torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(weight.shape[0])),
              _MAX_ROWS, device_types)
    reduced = _Op(f"{name}_reduced", (*_HEAD, ("scale", _T)), tuple[_T, _T, _T, _T], reduced_impl, reduced_fake,
                  _MAX_ROWS, device_types)

    def setup(ctx, inputs, output):
        hidden, weight, bias, labels, *ctx.options = inputs
        ctx.save_for_backward(hidden, weight, bias, labels)

    def backward(ctx, grad_rows):
        hidden, weight, bias, labels = ctx.saved_tensors
        dh, dw, db = bwd(grad_rows.contiguous(), hidden, weight, bias, labels, *ctx.options)
        return fwd.grads(dh, dw, (db if bias is not None else None))

    fwd.register_autograd(backward, setup_context=setup)

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
        return reduced.grads(_scaled(dh, g), d_weight, d_bias)

    reduced.register_autograd(reduced_backward, setup_context=reduced_setup)
    for op in ("fwd", "reduced"):  # hidden, weight, bias in the autocast dtype, as F.linear (_autocast.py)
        _autocast.register(f"{name}_{op}", positions=(0, 1, 2))
    _autocast.register(f"{name}_bwd", positions=())  # a backward run inside autocast: computed as without
    return fwd, bwd, reduced


LINEAR = {backend: _register_linear(backend) for backend in ("cpu", "triton")}

# The cross-entropy ops take the logits in their own dtype; registered without casts, so that what they
# compute inside (a backward run inside an autocast block included) is what they compute outside one.
for _op in (cross_entropy_cpu_fwd, cross_entropy_cpu_bwd, cross_entropy_triton_fwd, cross_entropy_triton_bwd,
            cross_entropy_triton_reduced):
    _autocast.register(_op.name, positions=())
