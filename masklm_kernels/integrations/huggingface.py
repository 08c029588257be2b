"""`patch_bert(model)`: run a Hugging Face `BertForMaskedLM` / `RobertaForMaskedLM` instance on the library's
kernels, in place (in the manner of Liger-Kernel's `apply_liger_kernel_to_*`, per instance rather than per
class, so other models in the process are untouched); `unpatch(model)` restores it.

* The encoder is unpadded once for all layers: the embeddings' padded (B, S, H) output is packed to the
  (1, tokens, H) of the real tokens, every layer (dense layers, LayerNorm, FFN) runs on real tokens only,
  self-attention runs `fused_attention_varlen` on the packed sequences, and the output is scattered back
  to (B, S, H) (zeros at padding). The lengths come from the 2-D `attention_mask` passed to the model
  (right padding, as Hugging Face tokenizers pad BERT by default), never a dense mask, and are handed from
  the model's forward to the encoder and attention modules through a context variable. When
  `output_hidden_states` / `output_attentions` is asked for, the encoder is not unpadded (the per-layer
  outputs keep their (B, S, H) shape) and attention runs `fused_attention(kv_lengths=...)`.
  Attention-probability dropout is not applied (the kernels have none): parity with the unpatched model
  holds with dropout off, as for any fused attention.
* With `labels`, the MLM head and the loss run `fused_linear_cross_entropy` on the labelled rows only;
  the returned `logits` is then None (no (tokens, vocab) logits are made). Without labels the original
  head runs and returns logits.
Decoder / cross-attention configurations are refused.
"""
from __future__ import annotations

import contextvars
import types

import torch
import torch.nn.functional as F

_LENGTHS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("masklm_hf_lengths", default=None)
# False while the model's forward was asked for per-layer outputs (the encoder then runs padded).
_UNPAD: contextvars.ContextVar[bool] = contextvars.ContextVar("masklm_hf_unpad", default=True)
# (cu_seqlens, max_seqlen) while the encoder runs on packed tokens; None when it runs padded.
_PACKED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("masklm_hf_packed", default=None)
_PATCHED = "_masklm_kernels_patched"


def _base_and_head(model):
    """(encoder model, transform(x), decoder weight, decoder bias) of a BERT or RoBERTa MLM instance."""
    if hasattr(model, "bert") and hasattr(model, "cls"):
        pred = model.cls.predictions
        return model.bert, pred.transform, pred.decoder.weight, pred.decoder.bias
    if hasattr(model, "roberta") and hasattr(model, "lm_head"):
        head = model.lm_head
        return model.roberta, (lambda x: head.layer_norm(F.gelu(head.dense(x)))), head.decoder.weight, \
            head.decoder.bias
    raise TypeError(f"patch_bert expects a BertForMaskedLM or RobertaForMaskedLM, got {type(model).__name__}")


def _attention_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    from ..attention import fused_attention, fused_attention_varlen

    B, S, _ = hidden_states.shape
    packed = _PACKED.get()
    if packed is not None:  # hidden_states is (1, tokens, H)
        cu, max_len = packed
        q, k, v = (lin(hidden_states[0]).view(S, -1, self.attention_head_size)
                   for lin in (self.query, self.key, self.value))
        return fused_attention_varlen(q, k, v, cu, cu, max_len, max_len).reshape(B, S, -1), None
    split = (B, S, -1, self.attention_head_size)
    q, k, v = (lin(hidden_states).view(split).transpose(1, 2) for lin in (self.query, self.key, self.value))
    out = fused_attention(q, k, v, kv_lengths=_LENGTHS.get())
    return out.transpose(1, 2).reshape(B, S, -1), None


def _encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """Runs the layers on the real tokens only (see the module docstring)."""
    lengths = _LENGTHS.get()
    if lengths is None or not _UNPAD.get():
        return self._masklm_original_forward(hidden_states, attention_mask, *args, **kwargs)
    B, S, H = hidden_states.shape
    lengths = lengths.to(hidden_states.device)
    valid = torch.arange(S, device=hidden_states.device) < lengths[:, None]
    idx = valid.flatten().nonzero().squeeze(1)  # host sync: the token count (once per forward, as unpadding)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    token = _PACKED.set((cu, S))
    try:
        # The layers get no mask: packed attention needs none (the dense one HF built is (B, 1, S, S)).
        out = self._masklm_original_forward(hidden_states.reshape(B * S, H).index_select(0, idx)[None], None,
                                            *args, **kwargs)
    finally:
        _PACKED.reset(token)
    packed = out[0][0]
    padded = packed.new_zeros(B * S, packed.shape[-1]).index_copy(0, idx, packed).view(B, S, -1)
    if isinstance(out, tuple):
        return (padded, *out[1:])
    out["last_hidden_state"] = padded
    return out


def _wants_per_layer_outputs(model, kwargs) -> bool:
    return any(kwargs.get(k) or getattr(model.config, k, False) for k in ("output_hidden_states", "output_attentions"))


def _lengths(attention_mask) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("patched model: attention_mask must be the (batch, seq) 0/1 padding mask")
    lengths = attention_mask.to(torch.int64).sum(1)
    if attention_mask.device.type == "cpu":  # a host check is free here (on CUDA it would synchronise)
        S = attention_mask.shape[1]
        if not torch.equal(attention_mask.bool(), torch.arange(S) < lengths[:, None]):
            raise ValueError("patched model: attention_mask must be right-padded (ones, then zeros)")
    return lengths


def _model_forward(self, input_ids=None, attention_mask=None, *args, labels=None, **kwargs):
    token = _LENGTHS.set(_lengths(attention_mask))
    unpad = _UNPAD.set(not _wants_per_layer_outputs(self, kwargs))
    try:
        if labels is None:
            return self._masklm_original_forward(input_ids, attention_mask, *args, **kwargs)
        from transformers.modeling_outputs import MaskedLMOutput

        from ..losses import fused_linear_cross_entropy

        base, transform, weight, bias = _base_and_head(self)
        kwargs.pop("return_dict", None)
        outputs = base(input_ids, attention_mask, *args, return_dict=True, **kwargs)
        x = outputs[0].reshape(-1, outputs[0].shape[-1])
        y = labels.reshape(-1).to(x.device)
        keep = (y != -100).nonzero().squeeze(1)  # only labelled rows reach the head (host sync: the count)
        loss = fused_linear_cross_entropy(transform(x.index_select(0, keep)), weight, y.index_select(0, keep),
                                          bias=bias)
        return MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)
    finally:
        _UNPAD.reset(unpad)
        _LENGTHS.reset(token)


def patch_bert(model):
    """Patch a BertForMaskedLM / RobertaForMaskedLM instance in place (see the module docstring); returns it."""
    base, *_ = _base_and_head(model)
    if getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False):
        raise ValueError("patch_bert: decoder / cross-attention configurations are not supported")
    if getattr(model, _PATCHED, False):
        return model
    model._masklm_original_forward = model.forward
    model.forward = types.MethodType(_model_forward, model)
    for module in base.modules():
        if type(module).__name__.endswith("SelfAttention") and hasattr(module, "query"):
            module.forward = types.MethodType(_attention_forward, module)
    base.encoder._masklm_original_forward = base.encoder.forward
    base.encoder.forward = types.MethodType(_encoder_forward, base.encoder)
    setattr(model, _PATCHED, True)
    return model


def unpatch(model):
    """Undo `patch_bert`: the instance runs Hugging Face's own code again; returns it."""
    if not getattr(model, _PATCHED, False):
        return model
    del model.forward
    del model._masklm_original_forward
    base, *_ = _base_and_head(model)
    for module in base.modules():
        if "forward" in module.__dict__:
            del module.forward
    del base.encoder._masklm_original_forward
    setattr(model, _PATCHED, False)
    return model
