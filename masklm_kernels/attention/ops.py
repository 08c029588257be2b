"""torch.library registration of the attention CPU backend: forward and backward custom ops with fake
implementations, joined by `register_autograd`, so that torch.compile traces through them."""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu


def _meta(causal, kv_lengths, q_lengths, prefix_lengths, spans, span_mode) -> dict:
    return dict(causal=causal, kv_lengths=kv_lengths, q_lengths=q_lengths, prefix_lengths=prefix_lengths,
                spans=spans, span_mode=span_mode)


@torch.library.custom_op("masklm_kernels::attention_cpu_fwd", mutates_args=(), device_types="cpu")
def attention_cpu_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: Optional[torch.Tensor],
    q_lengths: Optional[torch.Tensor], prefix_lengths: Optional[torch.Tensor], spans: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor], causal: bool, span_mode: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    meta = _meta(causal, kv_lengths, q_lengths, prefix_lengths, spans, span_mode)
    return cpu.forward(q, k, v, meta, attn_mask, scale)


@attention_cpu_fwd.register_fake
def _(q, k, v, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask, causal, span_mode, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("masklm_kernels::attention_cpu_bwd", mutates_args=(), device_types="cpu")
def attention_cpu_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_lengths: Optional[torch.Tensor], q_lengths: Optional[torch.Tensor], prefix_lengths: Optional[torch.Tensor],
    spans: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor], causal: bool, span_mode: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = _meta(causal, kv_lengths, q_lengths, prefix_lengths, spans, span_mode)
    return cpu.backward(dout.contiguous(), q, k, v, out, lse, meta, attn_mask, scale)


@attention_cpu_bwd.register_fake
def _(dout, q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask, causal, span_mode, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask, causal, span_mode, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask)
    ctx.causal, ctx.span_mode, ctx.scale = causal, span_mode, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans, attn_mask = ctx.saved_tensors
    dq, dk, dv = attention_cpu_bwd(dout, q, k, v, out, lse, kv_lengths, q_lengths, prefix_lengths, spans,
                                   attn_mask, ctx.causal, ctx.span_mode, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)
