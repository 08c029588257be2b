"""torch.library registration of the masking ops.

* `masklm_kernels::mask_tokens` / `mass_mask` / `t5_span_corruption` / `bart_infill`: C++ ops. Their
  schemas are defined here, derived from the typed arguments of masking/inputs.py, with their fake
  implementations, so that torch.compile traces through them before the extension is loaded;
  `masklm_kernels._C` registers only the CPU and CUDA kernels (csrc/masking/masking_ops.cpp; a kernel
  whose C++ signature disagrees with the schema fails to register when `_C` is imported). `_C` is
  imported on first use (`native_op`, and the backends' requirement checks), not with the package; until
  then each op's kernel for every device is one that loads `_C` and calls the op again, so `torch.ops`
  callers need nothing more.
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


def _fake_t5_span_corruption(input_ids, *args):
    a = inputs.T5SpanCorruptionArgs(input_ids, *args)
    B = input_ids.shape[0]
    enc, dec = input_ids.new_empty((B, a.enc_width)), input_ids.new_empty((B, a.dec_width))
    lengths = input_ids.new_empty((B,), dtype=torch.int64)
    return enc, lengths, dec, torch.empty_like(dec), torch.empty_like(lengths)


def _fake_bart_infill(input_ids, *args):
    a = inputs.BartInfillArgs(input_ids, *args)
    B = input_ids.shape[0]
    lengths = input_ids.new_empty((B,), dtype=torch.int64)
    return (input_ids.new_empty((B, a.width)), lengths, torch.empty_like(input_ids), torch.empty_like(input_ids),
            torch.empty_like(lengths))


def _prototype(args_type, returns):
    def prototype(*args):
        raise AssertionError("a signature only")

    prototype.__signature__ = inputs.signature(args_type, returns)
    return prototype


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


_MASK_TOKENS_RETURNS = tuple[torch.Tensor, torch.Tensor]
_MASS_MASK_RETURNS = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_T5_RETURNS = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

_LIB = torch.library.Library("masklm_kernels", "FRAGMENT")  # kept alive: it owns the definitions below
_NATIVE = (("mask_tokens", inputs.MaskTokensArgs, _MASK_TOKENS_RETURNS, _fake_mask_tokens),
           ("mass_mask", inputs.MassMaskArgs, _MASS_MASK_RETURNS, _fake_mass_mask),
           ("t5_span_corruption", inputs.T5SpanCorruptionArgs, _T5_RETURNS, _fake_t5_span_corruption),
           ("bart_infill", inputs.BartInfillArgs, _T5_RETURNS, _fake_bart_infill))
for _name, _args_type, _returns, _fake in _NATIVE:
    # "int", not the inferred "SymInt": the C++ kernels take int64_t, and these are host-side constants
    _schema = torch.library.infer_schema(_prototype(_args_type, _returns), mutates_args=()).replace("SymInt", "int")
    _LIB.define(f"{_name}{_schema}")
    _LIB.impl(_name, _ext.loading_kernel(_name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"masklm_kernels::{_name}", lib=_LIB)(_fake)

mask_tokens_reference = _reference_op("masklm_kernels::mask_tokens_reference", inputs.MaskTokensArgs,
                                      _mask_tokens_spec, _MASK_TOKENS_RETURNS)
mass_mask_reference = _reference_op("masklm_kernels::mass_mask_reference", inputs.MassMaskArgs, reference.mass_mask,
                                    _MASS_MASK_RETURNS)
t5_span_corruption_reference = _reference_op("masklm_kernels::t5_span_corruption_reference",
                                             inputs.T5SpanCorruptionArgs, reference.t5_span_corruption, _T5_RETURNS)
mask_tokens_reference.register_fake(_fake_mask_tokens)
mass_mask_reference.register_fake(_fake_mass_mask)
t5_span_corruption_reference.register_fake(_fake_t5_span_corruption)
bart_infill_reference = _reference_op("masklm_kernels::bart_infill_reference", inputs.BartInfillArgs,
                                      lambda *a: reference.bart_infill(*inputs.BartInfillArgs(*a)._replace(
                                          poisson_cdf=list(a[6]))), _T5_RETURNS)
bart_infill_reference.register_fake(_fake_bart_infill)


def native_op(name: str):
    """The C++/CUDA op, its kernels loaded (the backends' requirement checks have loaded `_C` already, or
    said why it cannot be)."""
    _ext.available()
    return getattr(torch.ops.masklm_kernels, name).default


def reference_op(name: str):
    return getattr(torch.ops.masklm_kernels, name + "_reference").default
