"""Public attention API: `fused_attention` and `fused_attention_varlen` (docs/SEMANTICS.md, "Attention")."""
from __future__ import annotations

import math
import numbers

import torch

from .._autocast import cast_inputs, no_autocast
from .._backends import Backend, select_backend, triton_cpu_reason, triton_installed, triton_requirement
from .._common import FLOAT_DTYPES, acc_dtype
from .._validation import check_int, check_range, check_tensor, values_checkable
from . import ops, reference
from .dropout import cpu_reasons, dropout_args
from .inputs import Dropout, Mask
from .masks import SPAN_MODES

DTYPES = FLOAT_DTYPES
HEAD_DIMS = tuple(range(16, 257, 8))  # every multiple of 8 from 16 to 256 (40, 80, 96 included)


def _no_mask_grad(x: dict) -> list[str]:
    return ["cannot differentiate attn_mask (requires_grad=True): use backend='reference' or detach the mask"] \
        if x.get("mask_grad") else []


# CUDA grids allow 65535 blocks on axes 1 and 2, where the kernels put the batch rows and the heads
GRID_YZ_LIMIT = 65535


def _triton_inputs(x: dict) -> list[str]:
    out = _no_mask_grad(x) + triton_cpu_reason(x["device"])
    for name in ("batch", "heads"):
        if x.get(name, 0) > GRID_YZ_LIMIT:
            out.append(f"{name} {x[name]} is above the CUDA grid limit of {GRID_YZ_LIMIT} (grid axes 1 and 2)")
    if x["device"].type != "cpu" and triton_installed() is None:
        from .triton_host import unsupported  # the kernels' own limits (triton is installed: requirement)

        reason = unsupported(x["dtype"], x["head_dim"])
        if reason:
            out.append(reason)
    return out


# auto order: cpu first, so that CPU tensors take the cpu backend even under Triton's interpreter
BACKENDS = (
    Backend("cpu", ("cpu",), description="ATen CPU flash kernel per (row, query block), invisible key blocks skipped",
            input_check=lambda x: _no_mask_grad(x) + cpu_reasons(x)),
    Backend("triton", ("cuda", "cpu"), requirement=triton_requirement, input_check=_triton_inputs,
            description="flash-attention kernels, tiles with no visible pair skipped (CPU: interpreter only)"),
    Backend("reference", ("cpu", "cuda"), description="dense PyTorch specification (builds B x H x Sq x Sk)"),
)


def _check_qkv(q, k, v, layout: str = "bhsd"):
    """q/k/v of a (B, H, S, D) ("bhsd") or packed (total, H, D) ("thd") layout; heads are dim 1 in both."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(layout):
            what = "(batch, heads, seq, head_dim)" if layout == "bhsd" else "(total_tokens, heads, head_dim)"
            raise ValueError(f"{name} must be {len(layout)}-D {what}, got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if t.shape[-1] != q.shape[-1] or (layout == "bhsd" and t.shape[0] != q.shape[0]):
            what = "batch and head_dim" if layout == "bhsd" else "head_dim"
            raise ValueError(f"{name} must have q's {what}, got shape {tuple(t.shape)} for q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k/v need at least one head, got {q.shape[1]} and {k.shape[1]} (dim 1)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k/v's heads ({k.shape[1]}) (GQA/MQA)")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported; supported: multiples of 8 from 16 to 256")


def _scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive finite float, got {type(scale).__name__}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return float(scale)


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


def _window(window_size, seq_q: int, seq_k: int) -> tuple[int, int]:
    """(left, right) from FlashAttention's `window_size`; a side reaching past every key is unbounded (-1)."""
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a (left, right) pair of ints (-1: unbounded), got {window_size!r}")
    sides = tuple(check_int(f"window_size[{n}]", w, lo=-1) for n, w in enumerate(window_size))
    # |i + off - j| < Sq + Sk for every pair: a wider side constrains nothing (and stays within int32)
    return tuple(-1 if w >= seq_q + seq_k else w for w in sides)


def _alibi(slopes, B: int, Hq: int, device) -> torch.Tensor | None:
    """(B, Hq) contiguous fp32 slopes from (Hq,) or (B, Hq); never differentiated (as FlashAttention)."""
    if slopes is None:
        return None
    check_tensor("alibi_slopes", slopes, device=device, like="q")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (FlashAttention's), got {slopes.dtype}")
    if tuple(slopes.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}) (query heads), got "
                         f"{tuple(slopes.shape)}")
    if values_checkable(slopes) and slopes.numel() and not bool(torch.isfinite(slopes).all()):
        raise ValueError("alibi_slopes must be finite")
    return slopes.detach().expand(B, Hq).contiguous()


def fused_attention(q, k, v, *, causal=False, kv_lengths=None, q_lengths=None, prefix_lengths=None, spans=None,
                    span_mode="inside", window_size=(-1, -1), alibi_slopes=None, attn_mask=None, scale=None,
                    dropout_p=0.0, dropout_seed=None, dropout_offset=0, sample_ids=None, generator=None,
                    backend="auto"):
    """Masked attention with masks computed on the fly from O(B) metadata; forward and backward.

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq % Hkv == 0 (GQA / MQA); fp16, bf16, fp32 (fp64 too);
            D a multiple of 8 in [16, 256].
        causal: key j visible to query i only when j <= i + off_b, bottom-right aligned: off_b =
            kv_lengths[b] - q_lengths[b] when both are given (each row's real lengths: the padded layout
            then means what the packed one does), else Sk - Sq.
        kv_lengths: (B,) int, keys j >= kv_lengths[b] are padding.
        q_lengths: (B,) int, rows i >= q_lengths[b] are padding: output 0, no gradient.
        prefix_lengths: (B,) int, with causal=True: keys j < prefix_lengths[b] are also visible (prefix-LM).
        spans: (B, 2) or (B, K, 2) int [start, end) in [0, Sk], with
        span_mode: "inside" (keys in a span, rows in a span: MASS decoder) or "outside" (keys in no span).
        window_size: (left, right) sliding window, FlashAttention's: key j visible to query i only when
            i + off_b - left <= j <= i + off_b + right (off_b as for causal; -1 = unbounded on that side),
            AND-ed with every other rule. ModernBERT's local layers: (64, 64); Mistral's: (4095, 0).
        alibi_slopes: (Hq,) or (B, Hq) float32: -slope * |i + off_b - j| is added to the scaled scores
            (ALiBi, Press et al. 2022, as FlashAttention); not differentiated.
        attn_mask: broadcastable to (B, Hq, Sq, Sk); bool (True = visible) is AND-ed, float is added.
        scale: score scale, default 1 / sqrt(D).
        dropout_p: attention-probability dropout in [0, 1) (FlashAttention-2's semantics: on the normalised
            probabilities, kept ones scaled by 1 / (1 - p); the backward regenerates the mask, nothing of
            size Sq x Sk is stored). Pass 0 in eval mode. fp16 inputs: p below 1 - 2^-16 (the scaled
            probabilities must stay finite in fp16). Which pairs are kept is a pure function of the seed, the
            offset, the sample ids and the positions (docs/SEMANTICS.md, "Attention dropout"):
        dropout_seed, dropout_offset: ints or 0-dim integer tensors (CPU or q's device; host values reach
            the device through a fill kernel, no copy or synchronisation); seed None draws one from
            `generator` (default torch's default CPU generator). Same seed, offset and sample ids: same mask,
            on every backend and device. A model gives each attention call of a step its own offset (e.g.
            step x layers + layer); only its low 32 bits count. Pass device tensors to capture the call in a
            CUDA graph, and to compile it once for every offset.
        sample_ids: (B,) int sample keys (default: the batch row): under data parallelism pass each row's
            global sample id, and N ranks drop what one rank would.
        generator: torch.Generator the seed is drawn from when dropout_seed is None.
        backend: "auto" (triton on CUDA tensors, cpu on CPU tensors; reference for what neither supports:
            a float attn_mask that requires grad, fp64 on CUDA, fp32 with D > 128 on CUDA), "triton", "cpu" or
            "reference".

    Returns (B, Hq, Sq, D) in q's dtype. Rows with no visible key are 0, with zero gradients (dropout or
    not; masked pairs stay 0). `dropout.dropout_mask` returns the keep mask a call used.

    On CUDA tensors the values of lengths and spans are not range-checked (that would synchronise the
    host); the kernels clip lengths to [0, S] and treat a span with start >= end as empty.

    Non-finite values, the same on every backend: keys, values and query rows that the lengths and spans
    exclude (padding, outside the spans) are never read into a result, so whatever they hold (NaN, inf)
    reaches no output and no gradient; spans of shape (B, 0, 2) mean "no key visible" ("inside") or "no
    key excluded" ("outside"). A NaN in a key, value or query that some query sees makes those queries'
    outputs NaN (others of the same batch row and head may be NaN too: kernels work a tile at a time).

    Equivalent PyTorch (dense, for rows with a visible key)::

        vis = masks.visibility(B, Sq, Sk, causal=..., kv_lengths=..., window_size=..., ...) & bool_attn_mask
        bias = -alibi_slopes.view(-1, Hq, 1, 1) * (i + off - j).abs()     # i (Sq, 1), j (1, Sk); 0 without
        F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                       attn_mask=bias.masked_fill(~vis, -inf), scale=scale)
        # dropout: probs = softmax(scores masked by vis) * keep / (1 - p), keep = dropout_mask(...)
    """
    q, k, v = cast_inputs(q, k, v)  # under autocast: its dtype, as SDPA (the policy: _autocast.py)
    _check_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if span_mode not in SPAN_MODES:
        raise ValueError(f"span_mode must be one of {SPAN_MODES}, got {span_mode!r}")
    if prefix_lengths is not None and not causal:
        raise ValueError("prefix_lengths requires causal=True (prefix-LM: bidirectional prefix, causal rest)")
    scale = _scale(scale, D)
    dev = q.device
    kv_lengths = _lengths("kv_lengths", kv_lengths, B, Sk, dev)
    q_lengths = _lengths("q_lengths", q_lengths, B, Sq, dev)
    prefix_lengths = _lengths("prefix_lengths", prefix_lengths, B, Sk, dev)
    spans = _spans(spans, B, Sk, dev)
    attn_mask = _attn_mask(attn_mask, (B, Hq, Sq, Sk), dev)
    left, right = _window(window_size, Sq, Sk)
    mask = Mask(kv_lengths=kv_lengths, q_lengths=q_lengths, prefix_lengths=prefix_lengths, spans=spans,
                attn_mask=attn_mask, causal=causal, span_mode=span_mode, window_left=left, window_right=right,
                alibi_slopes=_alibi(alibi_slopes, B, Hq, dev))
    drop = dropout_args(dropout_p, dropout_seed, dropout_offset, sample_ids, generator, B, dev)
    facts = dict(device=dev, dtype=q.dtype, head_dim=D, mask_grad=attn_mask is not None and attn_mask.requires_grad,
                 batch=B, heads=Hq, dropout=drop.active)
    chosen = select_backend("fused_attention", BACKENDS, backend, dev, facts)
    if chosen.name != "reference":
        out, _ = ops.FORWARD[chosen.name](q.contiguous(), k.contiguous(), v.contiguous(), *mask.op_args(), scale,
                                          *drop.op_args())
        return out
    with no_autocast(dev):  # the specification computes in `compute_dtype` whatever autocast says
        return reference.attention(q, k, v, **mask.visibility_kwargs(), attn_mask=mask.attn_mask,
                                   alibi_slopes=mask.alibi_slopes, scale=scale, compute_dtype=acc_dtype(q),
                                   **_reference_dropout(drop))


def _reference_dropout(drop: Dropout) -> dict:
    if not drop.active:
        return {}
    return dict(dropout_p=drop.p, dropout_seed=int(drop.seed), dropout_offset=int(drop.offset),
                sample_ids=drop.sample_ids)


def _cu_seqlens(name: str, t, device, total: int, max_seqlen: int) -> torch.Tensor:
    check_tensor(name, t, device=device, like="q")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor (FlashAttention's layout), got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {tuple(t.shape)}")
    if values_checkable(t):  # on CUDA tensors this would synchronise: not checked there (as flash-attn)
        lens = t[1:] - t[:-1]
        if int(t[0]) != 0 or int(t[-1]) != total or bool((lens < 0).any()):
            raise ValueError(f"{name} must start at 0, never decrease and end at the number of tokens ({total}), "
                             f"got {t.tolist()}")
        if lens.numel() and int(lens.max()) > max_seqlen:
            raise ValueError(f"a sequence of {name} is longer ({int(lens.max())}) than its max_seqlen ({max_seqlen})")
    return t.contiguous()


def fused_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           window_size=(-1, -1), alibi_slopes=None, scale=None, dropout_p=0.0, dropout_seed=None,
                           dropout_offset=0, sample_ids=None, generator=None, backend="auto"):
    """Attention over packed variable-length sequences (FlashAttention's varlen layout); forward and backward.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D), Hq % Hkv == 0; sequence b is tokens
            cu_seqlens[b]:cu_seqlens[b + 1] of each. fp16, bf16, fp32 (fp64 on CPU); D a multiple of 8 in [16, 256].
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on q's device, starting at 0, ending at total_q / total_k.
        max_seqlen_q, max_seqlen_k: Python ints >= every sequence's length (the grid size: no host sync);
            values above the token count are taken as the token count.
        causal: key j visible to query i of the same sequence when j <= i + (len_k - len_q) (bottom-right).
        window_size, alibi_slopes: as `fused_attention`, per sequence (off = len_k - len_q); slopes (Hq,)
            or (B, Hq), B the number of sequences.
        scale: score scale, default 1 / sqrt(D).
        dropout_p, dropout_seed, dropout_offset, generator: as `fused_attention`; sequence b is keyed by
            sample_ids[b] (a (B,) int tensor; default b), so a sequence drops the same pairs packed or padded.
        backend: "auto" (triton on CUDA tensors, cpu on CPU tensors), "triton", "cpu" or "reference".

    Returns (total_q, Hq, D) in q's dtype; a query with no visible key (e.g. an empty key sequence) gives 0.

    cu_seqlens are checked on CPU tensors only (on a GPU it would synchronise the host). On CUDA, values
    that break the rules above give undefined results but never a read or write outside q, k, v, the output
    and the gradients: the kernels clamp each bound to [previous bound, total tokens] and each length to
    max_seqlen, and tokens outside every sequence get 0 (output and gradients).

    Equivalent PyTorch::

        out = torch.cat([fused_attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                                         v[c:d].transpose(0, 1)[None], causal=causal)[0].transpose(0, 1)
                         for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])])
    """
    q, k, v = cast_inputs(q, k, v)  # under autocast: its dtype, as SDPA (the policy: _autocast.py)
    _check_qkv(q, k, v, layout="thd")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    # An upper bound (FlashAttention's meaning): the padded length S is a valid one even when the batch
    # holds fewer tokens than S. No sequence is longer than all tokens together, so larger values are
    # clamped to the token count: they would only inflate the grid.
    max_seqlen_q = min(check_int("max_seqlen_q", max_seqlen_q, lo=0), q.shape[0])
    max_seqlen_k = min(check_int("max_seqlen_k", max_seqlen_k, lo=0), k.shape[0])
    dev = q.device
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, dev, q.shape[0], max_seqlen_q)
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, dev, k.shape[0], max_seqlen_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    scale = _scale(scale, q.shape[-1])
    B = cu_q.shape[0] - 1
    left, right = _window(window_size, max_seqlen_q, max_seqlen_k)
    slopes = _alibi(alibi_slopes, B, q.shape[1], dev)
    drop = dropout_args(dropout_p, dropout_seed, dropout_offset, sample_ids, generator, B, dev)
    chosen = select_backend("fused_attention_varlen", BACKENDS, backend, dev,
                            dict(device=dev, dtype=q.dtype, head_dim=q.shape[-1], batch=cu_q.shape[0] - 1,
                                 heads=q.shape[1], dropout=drop.active))
    if chosen.name != "reference":
        out, _ = ops.VARLEN_FORWARD[chosen.name](q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k,
                                                 max_seqlen_q, max_seqlen_k, causal, left, right, slopes, scale,
                                                 *drop.op_args())
        return out
    compute = acc_dtype(q)
    with no_autocast(dev):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, window_size=(left, right),
                                          alibi_slopes=slopes, scale=scale, compute_dtype=compute,
                                          **_reference_dropout(drop))
