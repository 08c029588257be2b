"""What the patched Hugging Face models hand from their forward to their layers: the padding lengths of
the call, and the `Layout` object that replaces Hugging Face's attention mask inside a patched encoder.
Shared by every patched family (`huggingface.py` for BERT and its relatives, `modernbert.py`)."""
from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass

import torch

from ..padding import lengths_from_mask

_PATCHED = "_masklm_kernels_patch"  # the attribute holding a patched model's state (None once unpatched)

# Hugging Face's keyword arguments of a flattened (packed) batch, which the patched models refuse
_PACKED_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(frozen=True, eq=False)
class Layout:
    """Replaces Hugging Face's attention mask between a patched encoder and self-attention.

    packed: hidden states are (1, tokens, H), sequences delimited by `cu_seqlens` (B + 1,) int32, each at
    most `max_seqlen` long. Else padded (B, S, H): keys at positions >= `lengths[b]` are padding (None:
    no padding). `probs`: self-attention also returns its attention probabilities.

    Being an argument of every layer call, it is saved and replayed by gradient checkpointing (reentrant or
    not), so the recomputation in the backward attends exactly as the forward did."""
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


def _lengths(attention_mask) -> torch.Tensor | None:
    return None if attention_mask is None else lengths_from_mask(attention_mask, "patched model: attention_mask")


def _flag(self, kwargs, name) -> bool:
    value = kwargs.get(name)
    return bool(getattr(self.config, name, False) if value is None else value)


def _call_of(self, named: dict) -> _Call:
    """The call's lengths (from the 2-D `attention_mask`) and whether per-layer outputs are asked for;
    refuses a flattened batch (DataCollatorWithFlattening), in which attending across sequences would be
    wrong."""
    packed = [n for n in _PACKED_INPUTS if named.get(n) is not None]
    if packed:
        raise ValueError(f"patched model: packed inputs ({', '.join(packed)}) are not supported; pass the padded "
                         "batch and its 2-D attention_mask (the patched model packs it itself)")
    hidden, attentions = _flag(self, named, "output_hidden_states"), _flag(self, named, "output_attentions")
    return _Call(_lengths(named.get("attention_mask")), padded=hidden or attentions, probs=attentions)


def _with_signature(fn, signature: inspect.Signature):
    """`fn(self, *args, **kwargs)` presenting `self` + `signature`: what Trainer reads to keep the dataset's
    columns the forward accepts (and what `help(model.forward)` shows)."""
    def forward(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    forward.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
    forward.__doc__ = fn.__doc__
    return forward
