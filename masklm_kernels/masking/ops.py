"""torch.library registration of the masking ops.

* `masklm_kernels::mask_tokens` / `masklm_kernels::mass_mask`: C++ ops (schemas in
  csrc/masking/masking_ops.cpp, CPU and CUDA kernels); their fake implementations are registered here
  so that torch.compile traces through them.
* `masklm_kernels::mask_tokens_reference` / `masklm_kernels::mass_mask_reference`: the NumPy
  specification wrapped as custom ops with the same schema, so every backend is reachable the same way.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import inputs, reference


def _fake_mask_tokens(input_ids, *args):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


def _fake_mass_mask(input_ids, *args):
    spans = input_ids.new_empty((input_ids.shape[0], 2), dtype=torch.int64)
    return torch.empty_like(input_ids), torch.empty_like(input_ids), torch.empty_like(input_ids), spans


def _reference_op(name: str, args_type, spec, returns):
    """The NumPy specification `spec` as the custom op `name`, its schema from `args_type`."""
    def op(*args):
        args = args_type(*args)
        res = spec(*args._replace(seed=int(args.seed), step=int(args.step)))
        return tuple(torch.from_numpy(x).to(args.input_ids.device) for x in res)

    op.__signature__ = inputs.signature(args_type, returns)
    op.__name__ = name.split("::")[1]
    return torch.library.custom_op(name, op, mutates_args=())


def _mask_tokens_spec(*args):
    a = inputs.MaskTokensArgs(*args)
    return reference.mask_tokens(*a._replace(span_cdf=list(a.span_cdf)))


mask_tokens_reference = _reference_op("masklm_kernels::mask_tokens_reference", inputs.MaskTokensArgs,
                                      _mask_tokens_spec, tuple[torch.Tensor, torch.Tensor])
mass_mask_reference = _reference_op("masklm_kernels::mass_mask_reference", inputs.MassMaskArgs, reference.mass_mask,
                                    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor])
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
