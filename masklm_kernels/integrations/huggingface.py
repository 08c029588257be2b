"""`patch_bert(model)`: run a Hugging Face `BertForMaskedLM` / `RobertaForMaskedLM` instance on the library's
kernels, in place (in the manner of Liger-Kernel's `apply_liger_kernel_to_*`, per instance rather than per
class, so other models in the process are untouched); `unpatch(model)` restores it.

* Self-attention runs `fused_attention` with `kv_lengths` taken from the 2-D `attention_mask` passed to the
  model (right padding, as Hugging Face tokenizers pad BERT by default), not from a dense mask. The
  lengths are handed from the model's forward to its attention modules through a context variable.
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
    from ..attention import fused_attention

    lengths = _LENGTHS.get()
    B, S, _ = hidden_states.shape
    split = (B, S, -1, self.attention_head_size)
    q, k, v = (lin(hidden_states).view(split).transpose(1, 2) for lin in (self.query, self.key, self.value))
    out = fused_attention(q, k, v, kv_lengths=lengths)
    return out.transpose(1, 2).reshape(B, S, -1), None


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
    setattr(model, _PATCHED, False)
    return model
