"""Padded <-> packed layouts (as flash-attn's `bert_padding`), used by the models and the Hugging Face
integration alike.

A right-padded batch (B, S, ...) with row lengths `lengths` holds T = sum(lengths) real tokens; the packed
layout keeps those only, row after row, and `cu_seqlens` delimits the rows (FlashAttention's varlen
convention)::

    attention_mask      lengths   token_indices (flat b * S + s)   cu_seqlens
    1 1 1 0 0           3         0 1 2                            [0, 3, 8]
    1 1 1 1 1           5         5 6 7 8 9

    packed = unpad(x, idx)            # (B, S, H) -> (T, H)
    x2 = pad(packed, idx, B, S)       # (T, H) -> (B, S, H), zeros at padding

`token_indices` counts the real tokens on the host (`nonzero`): one synchronisation on a GPU, as any
unpadding (the packed tensor's size depends on it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import values_checkable


def lengths_from_mask(attention_mask: torch.Tensor, name: str = "attention_mask") -> torch.Tensor:
    """(B,) int64 lengths of a (B, S) right-padded 0/1 (or bool) mask. On CPU tensors in eager mode a mask
    that is not ones-then-zeros raises ValueError (the check is free there; on CUDA it would synchronise,
    and torch.compile cannot trace a data-dependent check)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{name} must be the (batch, seq) 0/1 padding mask, got {got}")
    lengths = attention_mask.to(torch.int64).sum(1)
    if values_checkable(attention_mask):
        S = attention_mask.shape[1]
        if not torch.equal(attention_mask.bool(), torch.arange(S) < lengths[:, None]):
            raise ValueError(f"{name} must be right-padded (ones, then zeros) in every row")
    return lengths


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """(B + 1,) int32 row offsets of the packed layout: [0, l0, l0 + l1, ...]."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def token_indices(lengths: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(T,) int64 flat positions b * seqlen + s of the real tokens (s < lengths[b]), in row-major order."""
    valid = torch.arange(seqlen, device=lengths.device) < lengths[:, None]
    return valid.flatten().nonzero().squeeze(1)


def unpad(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) -> (T, ...): the tokens at `indices` (from `token_indices`)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices)


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(T, ...) -> (batch, seqlen, ...): `packed` scattered back to `indices`, zeros elsewhere."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:]).index_copy(0, indices, packed)
    return out.view(batch, seqlen, *packed.shape[1:])
