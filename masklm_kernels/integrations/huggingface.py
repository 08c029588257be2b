"""`patch_model(model)`: run a Hugging Face masked-LM instance on the library's kernels, in place;
`unpatch(model)` restores it. Per instance (other models in the process are untouched), in the manner of
Liger-Kernel's `apply_liger_kernel_to_*`. Supported: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA
(generator) and DistilBERT `...ForMaskedLM`, and ModernBERT (`ModernBertForMaskedLM`, `ModernBertModel`:
local layers on the sliding-window kernels; what is its own is in `modernbert.py`) (`SUPPORTED`);
`patch_bert` and `patch_modernbert` are the same function.

What changes:

* The encoder runs on real tokens only. The embeddings' padded (B, S, H) output is packed to the
  (1, tokens, H) of the real tokens; every layer (dense layers, LayerNorm, FFN) runs on those, with
  `fused_attention_varlen`; the result is scattered back to (B, S, H) (zeros at padding). Lengths come
  from the 2-D, right-padded `attention_mask` given to the model (never a dense mask)::

      attention_mask        packed tokens (1, 3 + 5, H)      cu_seqlens
      1 1 1 0 0     ->      a a a | b b b b b           ->   [0, 3, 8]
      1 1 1 1 1

  With `output_hidden_states` or `output_attentions` the encoder runs padded instead (the per-layer
  outputs keep Hugging Face's (B, S, H) shapes) on `fused_attention(kv_lengths=...)`, and with
  `output_attentions` each layer also returns its attention probabilities (B, heads, S, S), computed by
  the library's PyTorch specification (`reference.attention_probs`; padding keys get 0).
* How each layer learns the layout: the patched encoder hands its layers a `Layout` object in place of
  Hugging Face's attention mask, which the layers pass to self-attention untouched. Being an argument
  of every layer call, it is saved and replayed by gradient checkpointing (reentrant or not), so the
  recomputation in the backward attends exactly as the forward did.
* With `labels`, the head and the loss run `fused_linear_cross_entropy` on the labelled rows only: the
  mean over the batch's labelled tokens, as these models' own `CrossEntropyLoss()`. Like them it ignores
  Trainer's `num_items_in_batch`, so gradient accumulation behaves exactly as unpatched (ModernBERT's
  loss divides the sum by it when given, and so does its patch). `logits` then follows `logits=` (see
  `patch_model`); without labels the model's own head runs.
* Mixed precision: the ops follow `torch.autocast` (attention and the head in its dtype, the loss in
  fp32), so `Trainer(bf16=True)` / `fp16=True` work unchanged.

* Attention-probability dropout (`attention_probs_dropout_prob`, DistilBERT's `attention_dropout`) is
  applied inside the fused kernels in train() and off in eval(), each call with a seed drawn from torch's
  generator (as nn.Dropout: `torch.manual_seed` reproduces a run). Its masks are the library's
  (counter-based), not torch's, so outputs equal the unpatched model's exactly with it off (eval, or p = 0)
  and in distribution with it on. `output_attentions` returns the probabilities before dropout.

Decoder / cross-attention configurations are refused.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .._autocast import no_autocast
from ..padding import cu_seqlens, pad, token_indices, unpad
from . import modernbert
from ._hf_layout import _CALL, _PATCHED, Layout, _call_of, _with_signature

LOGITS_MODES = ("eval", "labelled", "never")


# ------------------------------------------------------------------------------------------------
# Model families: where the pieces are
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    base: str | None                           # attribute of the encoder model (e.g. "bert"); None: the model
    transform: Callable | None                 # model, hidden -> the head's input to the decoder (None: no head)
    decoder: Callable | None                   # model -> (weight (V, E), bias (V,) or None)
    dropout: Callable                          # config -> attention-probability dropout rate
    install: Callable                          # (encoder model, family, dropout) -> the modules it patched
    encoder: str = "encoder"                   # BERT-like: attribute of the layer stack inside the base
    qkv: tuple[str, str, str] = ("query", "key", "value")  # its self-attention's projections
    heads: str = "num_attention_heads"         # its head-count attribute
    out_proj: str | None = None                # a projection applied inside self-attention (DistilBERT)
    num_items: bool = False                    # the model's loss divides by Trainer's num_items_in_batch
    sparse: Callable = lambda m: False         # model -> eval logits are the labelled rows' only


def _roberta_transform(m, x):
    h = m.lm_head
    return h.layer_norm(F.gelu(h.dense(x)))  # RobertaLMHead: exact (erf) GELU whatever hidden_act says


def _install_bert(base, fam: _Family, dropout: float) -> list:
    """BERT-like families: each self-attention module and the encoder, patched in place; returns them."""
    encoder = getattr(base, fam.encoder)
    attention = [m for m in encoder.modules() if all(hasattr(m, n) for n in fam.qkv)]  # one per layer
    for m in attention:
        m._masklm_family = fam
        m._masklm_dropout = dropout
        m._masklm_original_forward = m.forward
        m.forward = types.MethodType(_attention_forward, m)
    encoder._masklm_original_forward = encoder.forward
    encoder.forward = types.MethodType(_encoder_forward, encoder)
    return [*attention, encoder]


_BERT_ATTN = dict(dropout=lambda c: c.attention_probs_dropout_prob, install=_install_bert)
_MODERNBERT = dict(dropout=lambda c: c.attention_dropout, install=lambda base, fam, p: modernbert.install(base))
_ROBERTA = _Family(base="roberta", transform=_roberta_transform,
                   decoder=lambda m: (m.lm_head.decoder.weight, m.lm_head.decoder.bias), **_BERT_ATTN)
FAMILIES = {
    "BertForMaskedLM": _Family(base="bert", transform=lambda m, x: m.cls.predictions.transform(x),
                               decoder=lambda m: (m.cls.predictions.decoder.weight, m.cls.predictions.decoder.bias),
                               **_BERT_ATTN),
    "RobertaForMaskedLM": _ROBERTA,
    "XLMRobertaForMaskedLM": _ROBERTA,
    "CamembertForMaskedLM": _ROBERTA,
    "ElectraForMaskedLM": _Family(base="electra", transform=lambda m, x: m.generator_predictions(x),
                                  decoder=lambda m: (m.generator_lm_head.weight, m.generator_lm_head.bias),
                                  **_BERT_ATTN),
    "DistilBertForMaskedLM": _Family(
        base="distilbert", encoder="transformer", qkv=("q_lin", "k_lin", "v_lin"), heads="n_heads",
        out_proj="out_lin", transform=lambda m, x: m.vocab_layer_norm(m.activation(m.vocab_transform(x))),
        decoder=lambda m: (m.vocab_projector.weight, m.vocab_projector.bias), dropout=lambda c: c.attention_dropout,
        install=_install_bert),
    "ModernBertForMaskedLM": _Family(base="model", transform=lambda m, x: m.head(x),
                                     decoder=lambda m: (m.decoder.weight, m.decoder.bias), num_items=True,
                                     sparse=lambda m: bool(m.config.sparse_prediction), **_MODERNBERT),
    "ModernBertModel": _Family(base=None, transform=None, decoder=None, **_MODERNBERT),
}
SUPPORTED = tuple(FAMILIES)


def _family(model) -> _Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise TypeError(f"patch_model supports {', '.join(SUPPORTED)}; got {name}")
    return FAMILIES[name]


# ------------------------------------------------------------------------------------------------
# BERT-like families: self-attention and the encoder
# ------------------------------------------------------------------------------------------------

def _attention_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    layout = attention_mask
    if not isinstance(layout, Layout):  # called outside a patched encoder: Hugging Face's own code
        return self._masklm_original_forward(hidden_states, attention_mask, *args, **kwargs)
    from ..attention import fused_attention, fused_attention_varlen, reference

    fam: _Family = self._masklm_family
    B, S, _ = hidden_states.shape
    heads = getattr(self, fam.heads)
    q, k, v = (getattr(self, n)(hidden_states).view(B, S, heads, -1) for n in fam.qkv)
    probs = None
    p = self._masklm_dropout if self.training else 0.0
    if layout.cu_seqlens is not None:
        cu, n = layout.cu_seqlens, layout.max_seqlen
        out = fused_attention_varlen(q[0], k[0], v[0], cu, cu, n, n, dropout_p=p).reshape(B, S, -1)
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = fused_attention(q, k, v, kv_lengths=layout.lengths, dropout_p=p).transpose(1, 2).reshape(B, S, -1)
        if layout.probs:
            acc = torch.float32 if q.element_size() < 4 else q.dtype  # fp16 / bf16 inputs: softmax in fp32
            with no_autocast(q.device):  # the specification computes in `acc`
                probs = reference.attention_probs(q, k, kv_lengths=layout.lengths, compute_dtype=acc).to(q.dtype)
    if fam.out_proj is not None:
        out = getattr(self, fam.out_proj)(out)
    return out, probs


def _encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    call = _CALL.get()
    if call is None:  # called outside the patched model's forward
        return self._masklm_original_forward(hidden_states, attention_mask, *args, **kwargs)
    lengths = call.lengths
    if lengths is None or call.padded:
        layout = Layout(lengths=lengths, probs=call.probs)
        return self._masklm_original_forward(hidden_states, layout, *args, **kwargs)
    B, S, _ = hidden_states.shape
    lengths = lengths.to(hidden_states.device)
    idx = token_indices(lengths, S)  # host sync: the token count (once per forward, as any unpadding)
    layout = Layout(cu_seqlens=cu_seqlens(lengths), max_seqlen=S)
    out = self._masklm_original_forward(unpad(hidden_states, idx)[None], layout, *args, **kwargs)
    padded = pad(out[0][0], idx, B, S)
    if isinstance(out, tuple):
        return (padded, *out[1:])
    out["last_hidden_state"] = padded
    return out


# ------------------------------------------------------------------------------------------------
# The model's forward
# ------------------------------------------------------------------------------------------------

def _model_forward(self, *args, **kwargs):
    state = getattr(self, _PATCHED)
    bound = state.signature.bind(*args, **kwargs)
    named = dict(bound.arguments)
    named.update(named.pop(state.var_kwargs, None) or {})
    labels = named.pop("labels", None)
    return_dict = named.pop("return_dict", None)
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    token = _CALL.set(_call_of(self, named))
    try:
        if labels is None:
            return self._masklm_original_forward(*args, **kwargs)
        return _labelled_forward(self, state, named, labels, return_dict)
    finally:
        _CALL.reset(token)


def _labelled_forward(self, state, named: dict, labels, return_dict: bool):
    from transformers.modeling_outputs import MaskedLMOutput

    from ..losses import fused_linear_cross_entropy

    fam = state.family
    num_items = named.pop("num_items_in_batch", None)  # BERT-like models' own loss ignores it (module docstring)
    outputs = getattr(self, fam.base)(**named, return_dict=True)
    seq = outputs[0]
    x = seq.reshape(-1, seq.shape[-1])
    if labels.numel() != x.shape[0]:
        raise ValueError(f"patched model: labels must have input_ids' shape {tuple(seq.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    y = labels.reshape(-1).to(x.device)
    keep = (y != -100).nonzero().squeeze(1)  # only labelled rows reach the head (host sync: the count)
    weight, bias = fam.decoder(self)
    h = fam.transform(self, x.index_select(0, keep))
    loss = fused_linear_cross_entropy(h, weight, y.index_select(0, keep), bias=bias,
                                      num_items=num_items if fam.num_items else None)
    logits = None
    if state.logits == "labelled":
        with torch.no_grad():
            logits = F.linear(h, weight, bias)
    elif state.logits == "eval" and not self.training:
        logits = F.linear(h if fam.sparse(self) else fam.transform(self, seq), weight, bias)
    out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    if return_dict:
        return out
    # positions as Hugging Face's (loss, logits, hidden_states, attentions), logits kept even when None
    return (loss, logits) + tuple(t for t in (out.hidden_states, out.attentions) if t is not None)


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------

@dataclass
class _State:
    family: _Family
    logits: str
    signature: inspect.Signature
    var_kwargs: str | None
    dropout: float
    modules: list


def patch_model(model, *, logits: str = "eval"):
    """Patch a Hugging Face masked-LM instance in place (see the module docstring); returns it.

    Args:
        model: one of `SUPPORTED` (e.g. `BertForMaskedLM`), without decoder / cross-attention settings.
            `ModernBertModel` (an encoder without head) gets the unpadded encoder only.
        logits: what the `logits` output holds when `labels` are given (the loss never needs them):
            "eval" (default): (B, S, V) when the model is in eval mode, equal to the unpatched model's at
            real tokens (at padding the head sees zeros: those positions have no meaning), so that
            `Trainer.evaluate` and `compute_metrics` work unchanged (ModernBERT with
            `config.sparse_prediction`: (N, V) for the labelled positions, as unpatched); None in training
            (never materialised);
            "labelled": (N, V) for the N labelled positions only, in the order of
            `labels[labels != -100]`, in both modes, without gradient (for metrics);
            "never": None.
            Without labels the model's own head runs and returns (B, S, V) logits.

    With `return_dict=False` and labels the output is `(loss, logits, [hidden_states], [attentions])`,
    logits in second place even when None. A batch with no labelled position has loss 0 (with zero
    gradients) where Hugging Face's mean gives NaN. Packed (flattened) batches are refused: pass the padded
    batch. `nn.DataParallel` replicas do not carry the patch (use DDP). Patching twice is a no-op;
    `unpatch` undoes it.
    """
    fam = _family(model)
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("patch_model: decoder / cross-attention configurations are not supported")
    if getattr(model, _PATCHED, None) is not None:
        return model
    dropout = float(fam.dropout(cfg) or 0.0)
    signature = inspect.signature(model.forward)
    var_kwargs = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    modules = fam.install(model if fam.base is None else getattr(model, fam.base), fam, dropout)
    if fam.transform is not None:  # a masked LM: its forward runs the head and the loss (an encoder: as patched)
        model._masklm_original_forward = model.forward
        model.forward = types.MethodType(_with_signature(_model_forward, signature), model)
        modules.append(model)
    setattr(model, _PATCHED, _State(fam, logits, signature, var_kwargs, dropout, modules))
    return model


patch_bert = patch_model  # the first name of patch_model, when it covered BERT and RoBERTa
patch_modernbert = patch_model  # ModernBERT's entry point: the same function (see modernbert.py)


def unpatch(model):
    """Undo `patch_model`: the instance runs Hugging Face's own code again; returns it."""
    state = getattr(model, _PATCHED, None)
    if state is None:
        return model
    for m in state.modules:
        for attr in ("forward", "_masklm_original_forward", "_masklm_family", "_masklm_dropout", "_masklm_rotary"):
            m.__dict__.pop(attr, None)
    setattr(model, _PATCHED, None)
    return model
