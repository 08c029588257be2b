"""`patch_model(model)`: run a Hugging Face masked-LM instance on the library's kernels, in place;
`unpatch(model)` restores it. Per instance (other models in the process are untouched), in the manner of
Liger-Kernel's `apply_liger_kernel_to_*`. Supported: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA
(generator) and DistilBERT `...ForMaskedLM` (`SUPPORTED`); `patch_bert` is the same function.

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
  Trainer's `num_items_in_batch`, so gradient accumulation behaves exactly as unpatched. `logits` then
  follows `logits=` (see `patch_model`); without labels the model's own head runs.
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

import contextvars
import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .._autocast import no_autocast
from ..padding import cu_seqlens, lengths_from_mask, pad, token_indices, unpad

_PATCHED = "_masklm_kernels_patch"
LOGITS_MODES = ("eval", "labelled", "never")


# ------------------------------------------------------------------------------------------------
# Model families: where the pieces are
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    base: str                                  # attribute of the encoder model (e.g. "bert")
    encoder: str                               # attribute of the layer stack inside it
    qkv: tuple[str, str, str]                  # the self-attention's projections
    heads: str                                 # its head-count attribute
    out_proj: str | None                       # a projection applied inside self-attention (DistilBERT)
    transform: Callable                        # model, hidden -> the head's input to the decoder
    decoder: Callable                          # model -> (weight (V, E), bias (V,) or None)
    dropout: Callable                          # config -> attention-probability dropout rate


def _roberta_transform(m, x):
    h = m.lm_head
    return h.layer_norm(F.gelu(h.dense(x)))  # RobertaLMHead: exact (erf) GELU whatever hidden_act says


_BERT_ATTN = dict(encoder="encoder", qkv=("query", "key", "value"), heads="num_attention_heads", out_proj=None,
                  dropout=lambda c: c.attention_probs_dropout_prob)
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
        decoder=lambda m: (m.vocab_projector.weight, m.vocab_projector.bias), dropout=lambda c: c.attention_dropout),
}
SUPPORTED = tuple(FAMILIES)


def _family(model) -> _Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise TypeError(f"patch_model supports {', '.join(SUPPORTED)}; got {name}")
    return FAMILIES[name]


# ------------------------------------------------------------------------------------------------
# The layout handed from the encoder to its layers
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Layout:
    """Replaces Hugging Face's attention mask between the patched encoder and self-attention.

    packed: hidden states are (1, tokens, H), sequences delimited by `cu_seqlens` (B + 1,) int32, each at
    most `max_seqlen` long. Else padded (B, S, H): keys at positions >= `lengths[b]` are padding (None:
    no padding). `probs`: self-attention also returns its attention probabilities."""
    lengths: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    probs: bool = False


@dataclass(frozen=True)
class _Call:
    """What the patched model's forward tells its encoder (set for the duration of that forward)."""
    lengths: torch.Tensor | None
    padded: bool  # per-layer outputs asked for: keep (B, S, H) in every layer
    probs: bool


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("masklm_hf_call", default=None)


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

def _lengths(attention_mask) -> torch.Tensor | None:
    return None if attention_mask is None else lengths_from_mask(attention_mask, "patched model: attention_mask")


# Hugging Face's keyword arguments of a flattened (packed) batch, which the patched model refuses
_PACKED_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _flag(self, kwargs, name) -> bool:
    value = kwargs.get(name)
    return bool(getattr(self.config, name, False) if value is None else value)


def _model_forward(self, *args, **kwargs):
    state = getattr(self, _PATCHED)
    bound = state.signature.bind(*args, **kwargs)
    named = dict(bound.arguments)
    named.update(named.pop(state.var_kwargs, None) or {})
    labels = named.pop("labels", None)
    return_dict = named.pop("return_dict", None)
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    packed = [n for n in _PACKED_INPUTS if named.get(n) is not None]
    if packed:  # a flattened batch (DataCollatorWithFlattening): attending across its sequences would be wrong
        raise ValueError(f"patched model: packed inputs ({', '.join(packed)}) are not supported; pass the padded "
                         "batch and its 2-D attention_mask (the patched model packs it itself)")
    hidden, attentions = _flag(self, named, "output_hidden_states"), _flag(self, named, "output_attentions")
    token = _CALL.set(_Call(_lengths(named.get("attention_mask")), padded=hidden or attentions, probs=attentions))
    try:
        if labels is None:
            return self._masklm_original_forward(*args, **kwargs)
        return _labelled_forward(self, state, named, labels, return_dict)
    finally:
        _CALL.reset(token)


def _labelled_forward(self, state, named: dict, labels, return_dict: bool):
    from transformers.modeling_outputs import MaskedLMOutput

    from ..losses import fused_linear_cross_entropy

    named.pop("num_items_in_batch", None)  # the models' own loss ignores it (see the module docstring)
    outputs = getattr(self, state.family.base)(**named, return_dict=True)
    seq = outputs[0]
    x = seq.reshape(-1, seq.shape[-1])
    if labels.numel() != x.shape[0]:
        raise ValueError(f"patched model: labels must have input_ids' shape {tuple(seq.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    y = labels.reshape(-1).to(x.device)
    keep = (y != -100).nonzero().squeeze(1)  # only labelled rows reach the head (host sync: the count)
    weight, bias = state.family.decoder(self)
    h = state.family.transform(self, x.index_select(0, keep))
    loss = fused_linear_cross_entropy(h, weight, y.index_select(0, keep), bias=bias)
    logits = None
    if state.logits == "labelled":
        with torch.no_grad():
            logits = F.linear(h, weight, bias)
    elif state.logits == "eval" and not self.training:
        logits = F.linear(state.family.transform(self, seq), weight, bias)
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
        logits: what the `logits` output holds when `labels` are given (the loss never needs them):
            "eval" (default): (B, S, V) when the model is in eval mode, equal to the unpatched model's at
            real tokens (at padding the head sees zeros: those positions have no meaning), so that
            `Trainer.evaluate` and `compute_metrics` work unchanged; None in training (never materialised);
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
    base = getattr(model, fam.base)
    encoder = getattr(base, fam.encoder)
    attention = [m for m in encoder.modules() if all(hasattr(m, n) for n in fam.qkv)]  # one per layer
    modules = attention + [encoder, model]
    signature = inspect.signature(model.forward)
    var_kwargs = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    state = _State(fam, logits, signature, var_kwargs, float(fam.dropout(cfg) or 0.0), modules)
    for m in modules[:-2]:
        m._masklm_family = fam
        m._masklm_dropout = state.dropout
        m._masklm_original_forward = m.forward
        m.forward = types.MethodType(_attention_forward, m)
    encoder._masklm_original_forward = encoder.forward
    encoder.forward = types.MethodType(_encoder_forward, encoder)
    model._masklm_original_forward = model.forward
    model.forward = types.MethodType(_with_signature(_model_forward, signature), model)
    setattr(model, _PATCHED, state)
    return model


def _with_signature(fn, signature: inspect.Signature):
    """`fn(self, *args, **kwargs)` presenting `self` + `signature`: what Trainer reads to keep the dataset's
    columns the forward accepts (and what `help(model.forward)` shows)."""
    def forward(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    forward.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
    forward.__doc__ = fn.__doc__
    return forward


patch_bert = patch_model  # the first name of patch_model, when it covered BERT and RoBERTa


def unpatch(model):
    """Undo `patch_model`: the instance runs Hugging Face's own code again; returns it."""
    state = getattr(model, _PATCHED, None)
    if state is None:
        return model
    for m in state.modules:
        for attr in ("forward", "_masklm_original_forward", "_masklm_family", "_masklm_dropout"):
            m.__dict__.pop(attr, None)
    setattr(model, _PATCHED, None)
    return model
