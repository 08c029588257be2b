"""torch.library registration of the attention backends: for each of `cpu` and `triton`, forward and
backward custom ops with fake implementations, joined by `register_autograd`, so that torch.compile
traces through them -- for the padded layout (`attention_<backend>_fwd/_bwd`) and the packed varlen
layout (`attention_varlen_<backend>_fwd/_bwd`). Under autocast the forward ops take q, k, v in the
autocast dtype (_autocast.py).

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

# backend -> (module of the forward, module of the backward), under masklm_kernels.attention
_MODULES = {"cpu": ("cpu", "cpu"), "triton": ("triton_fwd", "triton_bwd")}
_DEVICE_TYPES = {"cpu": "cpu", "triton": None}


def _impl(backend: str, name: str):
    fwd_mod, bwd_mod = _MODULES[backend]
    mod = bwd_mod if "backward" in name else fwd_mod
    return getattr(importlib.import_module(f"{__package__}.{mod}"), name)


def _meta(causal, kv_lengths, q_lengths, prefix_lengths, spans, span_mode) -> dict:
    return dict(causal=causal, kv_lengths=kv_lengths, q_lengths=q_lengths, prefix_lengths=prefix_lengths,
                spans=spans, span_mode=span_mode)


def _register_padded(backend: str):
    """(fwd, bwd) ops for (B, H, S, D) inputs with the O(B) mask metadata and an optional dense mask."""

    @torch.library.custom_op(f"masklm_kernels::attention_{backend}_fwd", mutates_args=(),
                             device_types=_DEVICE_TYPES[backend])
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: Optional[torch.Tensor],
            q_lengths: Optional[torch.Tensor], prefix_lengths: Optional[torch.Tensor], spans: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor], causal: bool, span_mode: str, scale: float,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        meta = _meta(causal, kv_lengths, q_lengths, prefix_lengths, spans, span_mode)
        return _impl(backend, "forward")(q, k, v, meta, attn_mask, scale)

    @fwd.register_fake
    def _(q, k, v, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask, causal, span_mode, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=acc_dtype(q))

    @torch.library.custom_op(f"masklm_kernels::attention_{backend}_bwd", mutates_args=(),
                             device_types=_DEVICE_TYPES[backend])
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, kv_lengths: Optional[torch.Tensor], q_lengths: Optional[torch.Tensor],
            prefix_lengths: Optional[torch.Tensor], spans: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
            causal: bool, span_mode: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        meta = _meta(causal, kv_lengths, q_lengths, prefix_lengths, spans, span_mode)
        return _impl(backend, "backward")(dout.contiguous(), q, k, v, out, lse, meta, attn_mask, scale)

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask, causal, span_mode, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask, causal, span_mode, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask)
        ctx.causal, ctx.span_mode, ctx.scale = causal, span_mode, scale

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask,
                         ctx.causal, ctx.span_mode, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    _autocast.register(f"masklm_kernels::attention_{backend}_fwd", positions=(0, 1, 2))  # q, k, v
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
    return fwd, bwd


attention_cpu_fwd, attention_cpu_bwd = _register_padded("cpu")
attention_triton_fwd, attention_triton_bwd = _register_padded("triton")
attention_varlen_cpu_fwd, attention_varlen_cpu_bwd = _register_varlen("cpu")
attention_varlen_triton_fwd, attention_varlen_triton_bwd = _register_varlen("triton")

#: backend name -> forward op (padded, varlen); the autograd formula is registered on each.
FORWARD = {"cpu": attention_cpu_fwd, "triton": attention_triton_fwd}
VARLEN_FORWARD = {"cpu": attention_varlen_cpu_fwd, "triton": attention_varlen_triton_fwd}
