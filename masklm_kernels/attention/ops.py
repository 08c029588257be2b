"""torch.library registration of the attention backends: for each of `cpu` and `triton`, forward and
backward custom ops with fake implementations, joined by `register_autograd`, so that torch.compile
traces through them -- for the padded layout (`attention_<backend>_fwd/_bwd`, whose schema is derived
from `inputs.Mask`) and the packed varlen layout (`attention_varlen_<backend>_fwd/_bwd`), both ending
with `inputs.Dropout`'s fields. Under autocast
the forward ops take q, k, v in the autocast dtype (_autocast.py).

The backend modules are imported when an op first runs: triton is an optional dependency, and the
package imports without it. The triton ops accept any device: on CPU tensors they run under Triton's
interpreter (api.py only sends CPU tensors there when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
from typing import Optional

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
_FWD_RETURNS = tuple[torch.Tensor, torch.Tensor]
_BWD_RETURNS = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# The packed layout's arguments between q, k, v and the Dropout fields (the padded layout's: inputs.Mask's
# fields and the scale, inputs.op_signature's default).
_VARLEN_MIDDLE = {"cu_seqlens_q": torch.Tensor, "cu_seqlens_k": torch.Tensor, "max_seqlen_q": int,
                  "max_seqlen_k": int, "causal": bool, "window_left": int, "window_right": int,
                  "alibi_slopes": Optional[torch.Tensor], "scale": float}


def _custom_op(name: str, signature, impl, device_types):
    """`impl(*args)` as the custom op `name`, its schema inferred from `signature`."""
    def op(*args):
        return impl(*args)

    op.__signature__ = signature
    op.__name__ = name.split("::")[1]
    return torch.library.custom_op(name, op, mutates_args=(), device_types=device_types)


def _padded_middle(middle) -> tuple:
    """(Mask, scale) from the padded layout's middle arguments."""
    return op_inputs.Mask.from_op_args(middle[:op_inputs.N_MASK_ARGS]), middle[op_inputs.N_MASK_ARGS]


def _padded_lse(q):
    return q.new_empty(q.shape[:3], dtype=acc_dtype(q))


def _varlen_lse(q):
    return q.new_empty((q.shape[1], q.shape[0]), dtype=acc_dtype(q))


def _register(backend: str, layout: str):
    """(fwd, bwd) custom ops of one layout: the padded (B, H, S, D) one (`attention_<backend>_fwd/_bwd`:
    q, k, v, the `inputs.Mask` fields in order, the scale, the `inputs.Dropout` fields) or the packed
    (total, H, D) one (`attention_varlen_<backend>_fwd/_bwd`: q, k, v, int32 cu_seqlens, max_seqlen,
    causal, the window sides, the ALiBi slopes, scale, the Dropout fields). The backend functions take
    (q, k, v, <middle>, Dropout), the padded middle as (Mask, scale)."""
    padded = layout == "padded"
    name = f"masklm_kernels::attention_{backend}" if padded else f"masklm_kernels::attention_varlen_{backend}"
    middle_types = None if padded else _VARLEN_MIDDLE
    n_middle = len(op_inputs.op_signature((), None, middle_types).parameters) - op_inputs.N_DROPOUT_ARGS
    pack = _padded_middle if padded else tuple
    prefix = "" if padded else "varlen_"

    def split(args, n_leading: int):
        """(leading args, middle args as the backends take them, Dropout)."""
        lead, middle = args[:n_leading], args[n_leading:n_leading + n_middle]
        return lead, pack(middle), op_inputs.Dropout.from_op_args(args[n_leading + n_middle:])

    def fwd_impl(*args):
        lead, middle, dropout = split(args, 3)
        return _impl(backend, f"{prefix}forward")(*lead, *middle, dropout)

    fwd = _custom_op(f"{name}_fwd", op_inputs.op_signature(_QKV, _FWD_RETURNS, middle_types), fwd_impl,
                     _DEVICE_TYPES[backend])
    lse_like = _padded_lse if padded else _varlen_lse

    @fwd.register_fake
    def _(q, k, v, *rest):
        return torch.empty_like(q), lse_like(q)

    def bwd_impl(*args):
        (dout, *lead), middle, dropout = split(args, 6)
        return _impl(backend, f"{prefix}backward")(dout.contiguous(), *lead, *middle, dropout)

    bwd = _custom_op(f"{name}_bwd", op_inputs.op_signature(_GRAD_IN, _BWD_RETURNS, middle_types), bwd_impl,
                     _DEVICE_TYPES[backend])

    @bwd.register_fake
    def _(dout, q, k, v, *rest):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):  # torch passes `inputs` by keyword
        q, k, v, *rest = inputs
        # tensors (optional ones included) go through save_for_backward, the rest (flags, sizes) on ctx
        is_tensor = [isinstance(a, torch.Tensor) for a in rest]
        ctx.save_for_backward(q, k, v, *output, *(a for a, t in zip(rest, is_tensor) if t))
        ctx.rest = tuple(None if t else a for a, t in zip(rest, is_tensor))
        ctx.is_tensor = is_tensor

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        saved = iter(saved)
        rest = [next(saved) if t else a for a, t in zip(ctx.rest, ctx.is_tensor)]
        dq, dk, dv = bwd(dout, q, k, v, out, lse, *rest)
        return (dq, dk, dv) + (None,) * len(rest)

    fwd.register_autograd(backward, setup_context=setup_context)
    _autocast.register(f"{name}_fwd", positions=(0, 1, 2))  # q, k, v
    _autocast.register(f"{name}_bwd", positions=())  # a backward run inside autocast: computed as without
    return fwd, bwd


attention_cpu_fwd, attention_cpu_bwd = _register("cpu", "padded")
attention_triton_fwd, attention_triton_bwd = _register("triton", "padded")
attention_varlen_cpu_fwd, attention_varlen_cpu_bwd = _register("cpu", "varlen")
attention_varlen_triton_fwd, attention_varlen_triton_bwd = _register("triton", "varlen")

#: backend name -> forward op (padded, varlen); the autograd formula is registered on each.
FORWARD = {"cpu": attention_cpu_fwd, "triton": attention_triton_fwd}
VARLEN_FORWARD = {"cpu": attention_varlen_cpu_fwd, "triton": attention_varlen_triton_fwd}
