"""torch.library registration of the attention backends: for each of `cpu` and `triton`, forward and
backward custom ops with fake implementations, joined by `register_autograd`, so that torch.compile
traces through them -- for the padded layout (`attention_<backend>_fwd/_bwd`, whose schema is derived
from `inputs.Mask`) and the packed varlen layout (`attention_varlen_<backend>_fwd/_bwd`). Under autocast
the forward ops take q, k, v in the autocast dtype (_autocast.py).

The backend modules are imported when an op first runs: triton is an optional dependency, and the
package imports without it. The triton ops accept any device: on CPU tensors they run under Triton's
interpreter (api.py only sends CPU tensors there when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib

import torch

from .. import _autocast
from .._common import acc_dtype
from . import inputs as op_inputs

# backend -> (module of the forward, module of the backward), under masklm_kernels.attention
_MODULES = {"cpu": ("cpu", "cpu"), "triton": ("triton_fwd", "triton_bwd")}
_DEVICE_TYPES = {"cpu": "cpu", "triton": None}


def _impl(backend: str, name: str):
    fwd_mod, bwd_mod = _MODULES[backend]
    mod = bwd_mod if "backward" in name else fwd_mod
    return getattr(importlib.import_module(f"{__package__}.{mod}"), name)


_QKV = (("q", torch.Tensor), ("k", torch.Tensor), ("v", torch.Tensor))
_GRAD_IN = (("dout", torch.Tensor), *_QKV, ("out", torch.Tensor), ("lse", torch.Tensor))
# Mask fields that are tensors (saved for the backward with save_for_backward) and the others (kept on ctx)
_TENSOR_FIELDS = tuple(i for i, p in enumerate(op_inputs.op_signature((), None).parameters.values())
                       if p.name != "scale" and p.annotation is not bool and p.annotation is not str)


def _custom_op(name: str, signature, impl, device_types):
    """`impl(*args)` as the custom op `name`, its schema inferred from `signature`."""
    def op(*args):
        return impl(*args)

    op.__signature__ = signature
    op.__name__ = name.split("::")[1]
    return torch.library.custom_op(name, op, mutates_args=(), device_types=device_types)


def _split(args, n_leading: int):
    """(leading args, Mask, scale) of a padded op's positional arguments."""
    lead, rest = args[:n_leading], args[n_leading:]
    return lead, op_inputs.Mask.from_op_args(rest[:op_inputs.N_MASK_ARGS]), rest[op_inputs.N_MASK_ARGS]


def _register_padded(backend: str):
    """(fwd, bwd) ops for (B, H, S, D) inputs: q, k, v, the `inputs.Mask` fields in order, the scale."""
    name = f"masklm_kernels::attention_{backend}"

    def fwd_impl(*args):
        (q, k, v), mask, scale = _split(args, 3)
        return _impl(backend, "forward")(q, k, v, mask, scale)

    fwd = _custom_op(f"{name}_fwd", op_inputs.op_signature(_QKV, tuple[torch.Tensor, torch.Tensor]), fwd_impl,
                     _DEVICE_TYPES[backend])

    @fwd.register_fake
    def _(q, k, v, *rest):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=acc_dtype(q))

    def bwd_impl(*args):
        (dout, q, k, v, out, lse), mask, scale = _split(args, 6)
        return _impl(backend, "backward")(dout.contiguous(), q, k, v, out, lse, mask, scale)

    bwd = _custom_op(f"{name}_bwd", op_inputs.op_signature(_GRAD_IN, tuple[torch.Tensor, torch.Tensor, torch.Tensor]),
                     bwd_impl, _DEVICE_TYPES[backend])

    @bwd.register_fake
    def _(dout, q, k, v, *rest):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):  # torch passes `inputs` by keyword
        (q, k, v), mask, scale = _split(inputs, 3)
        fields = mask.op_args()
        ctx.save_for_backward(q, k, v, *output, *(fields[i] for i in _TENSOR_FIELDS))
        ctx.fields = tuple(None if i in _TENSOR_FIELDS else f for i, f in enumerate(fields))  # the flags
        ctx.scale = scale

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        fields = list(ctx.fields)
        for i, t in zip(_TENSOR_FIELDS, saved):
            fields[i] = t
        dq, dk, dv = bwd(dout, q, k, v, out, lse, *fields, ctx.scale)
        return (dq, dk, dv) + (None,) * (op_inputs.N_MASK_ARGS + 1)

    fwd.register_autograd(backward, setup_context=setup_context)
    _autocast.register(f"{name}_fwd", positions=(0, 1, 2))  # q, k, v
    _autocast.register(f"{name}_bwd", positions=())  # a backward run inside autocast: computed as without
    return fwd, bwd


def _register_varlen(backend: str):
    """(fwd, bwd) ops for packed (total, H, D) inputs delimited by int32 cu_seqlens."""

    @torch.library.custom_op(f"masklm_kernels::attention_varlen_{backend}_fwd", mutates_args=(),
                             device_types=_DEVICE_TYPES[backend])
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        return _impl(backend, "varlen_forward")(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                causal, scale)

    @fwd.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=acc_dtype(q))

    @torch.library.custom_op(f"masklm_kernels::attention_varlen_{backend}_bwd", mutates_args=(),
                             device_types=_DEVICE_TYPES[backend])
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
            max_seqlen_k: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _impl(backend, "varlen_backward")(dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal, scale)

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.causal, ctx.scale = max_q, max_k, causal, scale

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    _autocast.register(f"masklm_kernels::attention_varlen_{backend}_fwd", positions=(0, 1, 2))  # q, k, v
    _autocast.register(f"masklm_kernels::attention_varlen_{backend}_bwd", positions=())
    return fwd, bwd


attention_cpu_fwd, attention_cpu_bwd = _register_padded("cpu")
attention_triton_fwd, attention_triton_bwd = _register_padded("triton")
attention_varlen_cpu_fwd, attention_varlen_cpu_bwd = _register_varlen("cpu")
attention_varlen_triton_fwd, attention_varlen_triton_bwd = _register_varlen("triton")

#: backend name -> forward op (padded, varlen); the autograd formula is registered on each.
FORWARD = {"cpu": attention_cpu_fwd, "triton": attention_triton_fwd}
VARLEN_FORWARD = {"cpu": attention_varlen_cpu_fwd, "triton": attention_varlen_triton_fwd}
