"""The masking ops' arguments, described once per op, in the order of their schema.

The native ops' schemas are defined in C++ (csrc/masking/masking_ops.cpp, `TORCH_LIBRARY_FRAGMENT`); these
typed tuples are their Python side: `api.py` validates the user's arguments into one, every backend is
called with it (`op(*args)`), the reference custom ops take their signatures from it (`signature`), and
`tests/test_masking_compile.py` checks that the field names and types equal the C++ schema's, so that the
two sides cannot drift apart. The selection modes' numbers (`mode`) are reference.py's MODE_* constants,
which csrc/masking/masking_core.h mirrors.
"""
from __future__ import annotations

import inspect
import typing
from typing import NamedTuple, Optional, Sequence

import torch


class MaskTokensArgs(NamedTuple):
    input_ids: torch.Tensor                      # (B, S) int64 / int32
    lengths: Optional[torch.Tensor]              # (B,) int64
    attention_mask: Optional[torch.Tensor]       # (B, S) uint8 0/1
    special_tokens_mask: Optional[torch.Tensor]  # (B, S) uint8 0/1
    special_token_ids: torch.Tensor              # (n,) int64, possibly empty
    word_ids: Optional[torch.Tensor]             # (B, S) int64, -1 = no word
    rates: torch.Tensor                          # float32, () / (B,) / (B, S)
    sample_ids: Optional[torch.Tensor]           # (B,) int64
    seed: torch.Tensor                           # 0-dim int64
    step: torch.Tensor                           # 0-dim int64
    mode: int                                    # reference.MODE_BERNOULLI / MODE_EXACT / MODE_SPAN
    span_cdf: Sequence[int]                      # span-length CDF thresholds (span mode), else []
    mask_token_id: int
    t_mask: int                                  # replacement thresholds on 32-bit words
    t_rand: int
    rand_lo: int                                 # random replacement ids in [rand_lo, rand_hi)
    rand_hi: int
    ignore_index: int


class MassMaskArgs(NamedTuple):
    input_ids: torch.Tensor
    lengths: torch.Tensor
    special_token_ids: torch.Tensor
    sample_ids: Optional[torch.Tensor]
    seed: torch.Tensor
    step: torch.Tensor
    ratio_fx: int                                # fragment ratio in 2^-24 units
    mask_token_id: int
    t_mask: int
    t_rand: int
    rand_lo: int
    rand_hi: int
    pad_token_id: int
    ignore_index: int


class T5SpanCorruptionArgs(NamedTuple):
    input_ids: torch.Tensor                      # (B, S) int64 / int32
    lengths: Optional[torch.Tensor]              # (B,) int64; None: every row is S tokens
    sample_ids: Optional[torch.Tensor]           # (B,) int64
    seed: torch.Tensor                           # 0-dim int64
    step: torch.Tensor                           # 0-dim int64
    noise_density: float
    mean_noise_span_length: float
    sentinel_start_id: int                       # <extra_id_0>; span k gets sentinel_start_id - k
    eos_token_id: int
    pad_token_id: int
    decoder_start_token_id: int
    ignore_index: int
    enc_width: int                               # output widths: the most any row length <= S needs
    dec_width: int


class BartInfillArgs(NamedTuple):
    input_ids: torch.Tensor                      # (B, S) int64 / int32
    lengths: Optional[torch.Tensor]              # (B,) int64; None: every row is S tokens
    sample_ids: Optional[torch.Tensor]           # (B,) int64
    seed: torch.Tensor                           # 0-dim int64
    step: torch.Tensor                           # 0-dim int64
    mask_ratio: float
    poisson_cdf: Sequence[int]                   # floor(P(L <= k) * 2^32), k = 0 .. (at most 64 entries)
    replace_length: int                          # -1, 0 or 1 (fairseq's)
    mask_token_id: int
    t_mask: int                                  # floor((1 - random_ratio) * 2^32): below it the mask id
    rand_lo: int                                 # random ids in [rand_lo, rand_hi)
    rand_hi: int
    pad_token_id: int
    decoder_start_token_id: int
    ignore_index: int
    width: int                                   # output width: the most any row length <= S needs


def signature(args_type: type, returns) -> inspect.Signature:
    """A custom-op signature with `args_type`'s fields, in order, as parameters (torch.library infers the
    schema from it)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    hints = typing.get_type_hints(args_type)  # evaluated: this module's annotations are strings
    return inspect.Signature([inspect.Parameter(n, kind, annotation=hints[n]) for n in args_type._fields],
                             return_annotation=returns)
