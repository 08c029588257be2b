"""Public attention API: `fused_attention` (BRIEF.md, "Attention semantics")."""
from __future__ import annotations

import math
import numbers

import torch

from .._backends import Backend, BackendUnavailableError, select_backend
from .._validation import check_range, check_tensor
from . import ops, reference
from .masks import SPAN_MODES

BACKENDS = (
    Backend("cpu", ("cpu",), description="ATen CPU flash kernel per (row, query block), invisible key blocks skipped"),
    Backend("reference", ("cpu", "cuda"), description="dense PyTorch specification (builds B x H x Sq x Sk)"),
)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = tuple(range(16, 257, 8))  # every multiple of 8 from 16 to 256 (40, 80, 96 included)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must have q's batch and head_dim ({q.shape[0]}, {q.shape[3]}), got shape "
                             f"{tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k/v's heads ({k.shape[1]}) (GQA/MQA)")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[3]} is not supported; supported: multiples of 8 from 16 to 256")


def _lengths(name, t, B, hi, device):
    if t is None:
        return None
    check_tensor(name, t, device=device, shape=(B,), integer=True, like="q")
    t = t.to(torch.int64).contiguous()
    check_range(name, t, 0, hi)
    return t


def _spans(spans, B, Sk, device):
    if spans is None:
        return None
    check_tensor("spans", spans, device=device, integer=True, like="q")
    if not (spans.dim() in (2, 3) and spans.shape[0] == B and spans.shape[-1] == 2):
        raise ValueError(f"spans must have shape ({B}, 2) or ({B}, K, 2), got {tuple(spans.shape)}")
    spans = spans.to(torch.int64).contiguous()
    check_range("spans", spans, 0, Sk)
    if spans.numel() and spans.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool((spans[..., 0] > spans[..., 1]).any()):
            raise ValueError("spans must have start <= end in every [start, end) pair")
    return spans


def _attn_mask(mask, shape, device):
    if mask is None:
        return None
    check_tensor("attn_mask", mask, device=device, like="q")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool (True = visible) or floating (added to scores), got {mask.dtype}")
    if mask.dim() > 4 or any(m not in (1, s) for m, s in zip(mask.shape[::-1], shape[::-1])):
        raise ValueError(f"attn_mask must be broadcastable to {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def fused_attention(q, k, v, *, causal=False, kv_lengths=None, q_lengths=None, prefix_lengths=None, spans=None,
                    span_mode="inside", attn_mask=None, scale=None, backend="auto"):
    """Masked attention with masks computed on the fly from O(B) metadata; forward and backward.

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq % Hkv == 0 (GQA / MQA); fp16, bf16, fp32 (fp64 too);
            D a multiple of 8 in [16, 256].
        causal: key j visible to query i only when j <= i + (Sk - Sq) (bottom-right aligned).
        kv_lengths: (B,) int, keys j >= kv_lengths[b] are padding.
        q_lengths: (B,) int, rows i >= q_lengths[b] are padding: output 0, no gradient.
        prefix_lengths: (B,) int, with causal=True: keys j < prefix_lengths[b] are also visible (prefix-LM).
        spans: (B, 2) or (B, K, 2) int [start, end) in [0, Sk], with
        span_mode: "inside" (keys in a span, rows in a span: MASS decoder) or "outside" (keys in no span).
        attn_mask: broadcastable to (B, Hq, Sq, Sk); bool (True = visible) is AND-ed, float is added.
        scale: score scale, default 1 / sqrt(D).
        backend: "auto" (cpu on CPU tensors, else reference), "cpu" or "reference".

    Returns (B, Hq, Sq, D) in q's dtype. Rows with no visible key are 0, with zero gradients.

    Equivalent PyTorch (dense, for rows with a visible key)::

        vis = masks.visibility(B, Sq, Sk, causal=..., kv_lengths=..., ...) & bool_attn_mask
        F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                       attn_mask=vis, scale=scale)
    """
    _check_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if span_mode not in SPAN_MODES:
        raise ValueError(f"span_mode must be one of {SPAN_MODES}, got {span_mode!r}")
    if prefix_lengths is not None and not causal:
        raise ValueError("prefix_lengths requires causal=True (prefix-LM: bidirectional prefix, causal rest)")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive finite float, got {type(scale).__name__}")
    elif not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    dev = q.device
    kv_lengths = _lengths("kv_lengths", kv_lengths, B, Sk, dev)
    q_lengths = _lengths("q_lengths", q_lengths, B, Sq, dev)
    prefix_lengths = _lengths("prefix_lengths", prefix_lengths, B, Sk, dev)
    spans = _spans(spans, B, Sk, dev)
    attn_mask = _attn_mask(attn_mask, (B, Hq, Sq, Sk), dev)
    chosen = select_backend("fused_attention", BACKENDS, backend, dev)
    if chosen.name == "cpu" and attn_mask is not None and attn_mask.requires_grad:
        # The blockwise backward returns no gradient for an additive mask; the dense reference does.
        if backend != "auto":
            raise BackendUnavailableError("fused_attention: backend='cpu' cannot differentiate attn_mask "
                                          "(requires_grad=True); use backend='reference' or detach the mask")
        chosen = BACKENDS[1]
    if chosen.name == "cpu":
        out, _ = ops.attention_cpu_fwd(q.contiguous(), k.contiguous(), v.contiguous(), kv_lengths, q_lengths,
                                       prefix_lengths, spans, attn_mask, causal, span_mode, float(scale))
        return out
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return reference.attention(q, k, v, causal=causal, kv_lengths=kv_lengths, q_lengths=q_lengths,
                               prefix_lengths=prefix_lengths, spans=spans, span_mode=span_mode, attn_mask=attn_mask,
                               scale=float(scale), compute_dtype=compute)
