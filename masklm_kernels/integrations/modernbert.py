"""Hugging Face ModernBERT (`ModernBertForMaskedLM`, `ModernBertModel`) on the library's kernels: the part
of `patch_model` that is ModernBERT's own (`patch_modernbert` is `patch_model`).

ModernBERT alternates global attention with sliding-window ("local") attention: layer i is global when
i % global_attn_every_n_layers == 0, local otherwise, and a local layer lets token i see the keys j with
|i - j| <= local_attention // 2 (`config.sliding_window`). Without flash-attn Hugging Face runs every layer
on SDPA over the padded batch with a dense (B, 1, S, S) mask carrying the padding and the window, so every
pair of positions is computed. Patched:

* `ModernBertModel.forward` unpads once: the real tokens' ids (or embeddings) and their position ids go
  through Hugging Face's own forward as a (1, tokens) batch, so the embeddings, every layer (norms, GLU
  MLP, the rotary tables of each layer type) and the final norm run on real tokens only; its
  `attention_mask` is a `Layout` per layer type in place of the dense masks; the result is scattered back
  to (B, S, H), zeros at padding::

      attention_mask        packed tokens (1, 3 + 5)      position ids        cu_seqlens
      1 1 1 0 0     ->      a a a | b b b b b       ->    0 1 2 | 0 1 2 3 4   [0, 3, 8]
      1 1 1 1 1

* Each `ModernBertAttention` projects q, k, v, applies Hugging Face's rotary embedding exactly as it does
  (the same function, on the (tokens, heads, D) layout), and runs `fused_attention_varlen` with
  `window_size=(w, w)` on local layers (w = `config.sliding_window`) and unbounded on global ones: the
  kernels skip every tile outside the band, so a local layer's work grows with S * w, not S^2.
  Attention-probability dropout (`config.attention_dropout`) runs inside the kernel in train().
* With `output_hidden_states` / `output_attentions` the encoder runs padded (Hugging Face's per-layer
  shapes) on `fused_attention(kv_lengths=..., window_size=...)`; the attention probabilities come from the
  library's PyTorch specification (0 on padding keys and outside the window).
* `ModernBertForMaskedLM` with `labels`: the prediction head (dense, activation, norm) and the tied
  decoder run on the labelled rows only, through `fused_linear_cross_entropy`; the loss is Hugging Face's
  `ForMaskedLMLoss` (the mean over labelled tokens, or their sum over Trainer's `num_items_in_batch` when
  given). Logits follow `patch_model(logits=...)`; in eval mode with `config.sparse_prediction` they are
  the labelled rows' (N, V), as unpatched.
"""
from __future__ import annotations

import inspect
import types

import torch

from ..padding import cu_seqlens, pad, token_indices, unpad
from ._hf_layout import _CALL, Layout, _call_of, _with_signature


def _window(module) -> int:
    """The half-width w of a layer's window (|i - j| <= w), -1 on global layers."""
    cfg = module.config
    return int(cfg.sliding_window) if cfg.layer_types[module.layer_idx] == "sliding_attention" else -1


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    layout = attention_mask
    if not isinstance(layout, Layout):  # called outside a patched model: Hugging Face's own code
        return self._masklm_original_forward(hidden_states, position_embeddings=position_embeddings,
                                             attention_mask=attention_mask, **kwargs)
    from ..attention import fused_attention, fused_attention_varlen, reference

    shape = hidden_states.shape[:-1]  # (B, S) padded, (1, tokens) packed
    q, k, v = self.Wqkv(hidden_states).view(*shape, 3, -1, self.head_dim).unbind(dim=-3)  # (*shape, heads, D)
    cos, sin = position_embeddings  # (*shape, D) (padded: batch 1 broadcast)
    q, k = self._masklm_rotary(q, k, cos, sin, unsqueeze_dim=2)  # heads are dim 2 here, 1 in Hugging Face's
    w = _window(self)
    p = float(self.attention_dropout) if self.training else 0.0
    probs = None
    if layout.cu_seqlens is not None:
        cu, n = layout.cu_seqlens, layout.max_seqlen
        out = fused_attention_varlen(q[0], k[0], v[0], cu, cu, n, n, window_size=(w, w), dropout_p=p)
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = fused_attention(q, k, v, kv_lengths=layout.lengths, window_size=(w, w), dropout_p=p).transpose(1, 2)
        if layout.probs:
            from .._autocast import no_autocast

            acc = torch.float32 if q.element_size() < 4 else q.dtype  # fp16 / bf16 inputs: softmax in fp32
            with no_autocast(q.device):  # the specification computes in `acc`
                probs = reference.attention_probs(q, k, kv_lengths=layout.lengths, window_size=(w, w),
                                                  compute_dtype=acc).to(q.dtype)
    out = self.out_drop(self.Wo(out.reshape(*shape, -1)))
    return out, probs


def _base_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    original = self._masklm_original_forward
    if isinstance(attention_mask, dict):
        raise ValueError("patched ModernBERT: attention_mask must be the 2-D (batch, seq) padding mask, not a "
                         "mapping of prepared masks (the patched model builds its own layout)")
    call = _CALL.get()  # set by the patched ModernBertForMaskedLM around this call
    if call is None:
        call = _call_of(self, {"attention_mask": attention_mask, **kwargs})
    kinds = set(self.config.layer_types)
    if call.lengths is None or call.padded:
        layout = Layout(lengths=call.lengths, probs=call.probs)
        return original(input_ids=input_ids, attention_mask=dict.fromkeys(kinds, layout), position_ids=position_ids,
                        inputs_embeds=inputs_embeds, **kwargs)
    x = input_ids if input_ids is not None else inputs_embeds
    if x is None:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    B, S = x.shape[:2]
    lengths = call.lengths.to(x.device)
    idx = token_indices(lengths, S)  # host sync: the token count (once per forward, as any unpadding)
    if position_ids is None:
        position_ids = torch.arange(S, device=x.device)[None]
    packed = dict(input_ids=None, inputs_embeds=None, position_ids=unpad(position_ids.expand(B, S), idx)[None])
    packed["input_ids" if input_ids is not None else "inputs_embeds"] = unpad(x, idx)[None]
    layout = Layout(cu_seqlens=cu_seqlens(lengths), max_seqlen=S)
    out = original(attention_mask=dict.fromkeys(kinds, layout), **packed, **kwargs)
    padded = pad(out[0][0], idx, B, S)
    if isinstance(out, tuple):
        return (padded, *out[1:])
    out["last_hidden_state"] = padded
    return out


def install(base) -> list:
    """Patches `base` (the ModernBertModel) and its attention modules in place; returns them (`unpatch`
    restores their `forward` and drops the `_masklm_*` attributes)."""
    attention = [m for m in base.modules() if type(m).__name__ == "ModernBertAttention"]
    rotary = inspect.getmodule(type(base)).apply_rotary_pos_emb  # Hugging Face's (or a hub kernel's) rotary
    for m in attention:
        m._masklm_rotary = rotary
        m._masklm_original_forward = m.forward
        m.forward = types.MethodType(_attention_forward, m)
    base._masklm_original_forward = base.forward
    base.forward = types.MethodType(_with_signature(_base_forward, inspect.signature(base.forward)), base)
    return [*attention, base]
