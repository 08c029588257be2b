"""torch.library registration of the masking ops.

* `masklm_kernels::mask_tokens` / `masklm_kernels::mass_mask`: C++ ops (schemas in
  csrc/masking/masking_ops.cpp, CPU and CUDA kernels); their fake implementations are registered here
  so that torch.compile traces through them.
* `masklm_kernels::mask_tokens_reference` / `masklm_kernels::mass_mask_reference`: the NumPy
  specification wrapped as custom ops with the same schema, so every backend is reachable the same way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _ext
from . import reference


def _fake_mask_tokens(input_ids, *args):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


def _fake_mass_mask(input_ids, *args):
    spans = input_ids.new_empty((input_ids.shape[0], 2), dtype=torch.int64)
    return torch.empty_like(input_ids), torch.empty_like(input_ids), torch.empty_like(input_ids), spans


@torch.library.custom_op("masklm_kernels::mask_tokens_reference", mutates_args=())
def mask_tokens_reference(
    input_ids: torch.Tensor, lengths: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
    special_tokens_mask: Optional[torch.Tensor], special_token_ids: torch.Tensor, word_ids: Optional[torch.Tensor],
    rates: torch.Tensor, sample_ids: Optional[torch.Tensor], seed: torch.Tensor, step: torch.Tensor, mode: int,
    span_cdf: Sequence[int], mask_token_id: int, t_mask: int, t_rand: int, rand_lo: int, rand_hi: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, labels = reference.mask_tokens(
        input_ids, lengths, attention_mask, special_tokens_mask, special_token_ids, word_ids, rates, sample_ids,
        int(seed), int(step), mode, list(span_cdf), mask_token_id, t_mask, t_rand, rand_lo, rand_hi, ignore_index)
    return tuple(torch.from_numpy(x).to(input_ids.device) for x in (out, labels))


@torch.library.custom_op("masklm_kernels::mass_mask_reference", mutates_args=())
def mass_mask_reference(
    input_ids: torch.Tensor, lengths: torch.Tensor, special_token_ids: torch.Tensor,
    sample_ids: Optional[torch.Tensor], seed: torch.Tensor, step: torch.Tensor, ratio_fx: int, mask_token_id: int,
    t_mask: int, t_rand: int, rand_lo: int, rand_hi: int, pad_token_id: int, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    res = reference.mass_mask(input_ids, lengths, special_token_ids, sample_ids, int(seed), int(step), ratio_fx,
                              mask_token_id, t_mask, t_rand, rand_lo, rand_hi, pad_token_id, ignore_index)
    return tuple(torch.from_numpy(x).to(input_ids.device) for x in res)


mask_tokens_reference.register_fake(_fake_mask_tokens)
mass_mask_reference.register_fake(_fake_mass_mask)

try:
    _native = _ext.available()
except ValueError:  # an invalid environment switch: the ops' backend check raises it, naming the variable
    _native = False
if _native:
    torch.library.register_fake("masklm_kernels::mask_tokens")(_fake_mask_tokens)
    torch.library.register_fake("masklm_kernels::mass_mask")(_fake_mass_mask)


def native_op(name: str):
    """The C++/CUDA op (`_C` must be loaded; the backend requirement checks that first)."""
    return getattr(torch.ops.masklm_kernels, name).default


def reference_op(name: str):
    return getattr(torch.ops.masklm_kernels, name + "_reference").default
