"""Automatic mixed precision (`torch.autocast`), one policy for every op.

Under autocast, PyTorch runs matmul-like ops in the autocast dtype (bf16 / fp16) and losses in fp32.
The library's ops follow suit:

* attention (`fused_attention`, `fused_attention_varlen`): q, k, v are cast to the autocast dtype,
  as `F.scaled_dot_product_attention` is (a float `attn_mask` is left as given: it is added to fp32
  scores);
* `fused_linear_cross_entropy`: hidden, weight and bias are cast to the autocast dtype, as `F.linear`
  is, so fp32 master weights are taken as they are and receive fp32 gradients through the cast;
* `masked_cross_entropy`: the logits stay in their dtype (the kernels accumulate in fp32 whatever it is:
  no fp32 copy of an N x V tensor is made);
* both losses return the loss in fp32 under autocast (autocast's rule for losses), else in the input's
  dtype;
* masking ops take no floating-point activations: their rate tensors are probabilities and are never
  cast (that would change the masks).

Casting follows autocast's eligibility rule: floating-point tensors on the autocast device, float64
excepted. The public functions apply the policy before they validate (so k in fp32 with q in bf16 is
accepted under autocast, as SDPA accepts it), and the same policy is registered on the custom ops'
Autocast dispatch keys, so `torch.ops.masklm_kernels.*` called directly behaves the same; the cast is a
differentiable `Tensor.to`, so gradients reach the original dtype.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIB = torch.library.Library("masklm_kernels", "IMPL")  # kept for the registrations' lifetime


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for tensors on `device`, or None when autocast is off there."""
    if device.type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def no_autocast(device: torch.device):
    """A context with autocast off on `device` (the reference paths compute in the dtype they choose)."""
    return torch.autocast(device.type, enabled=False) if device.type in _AUTOCAST_KEYS else \
        contextlib.nullcontext()


def _eligible(t, device_type: str) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and \
        t.device.type == device_type


def cast_inputs(*tensors):
    """`tensors` with the autocast-eligible ones cast to the autocast dtype in force on the first one's
    device (unchanged when autocast is off there, or when the first is not a tensor: validation then
    reports it)."""
    if not isinstance(tensors[0], torch.Tensor):
        return tensors
    device = tensors[0].device
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _eligible(t, device.type) else t for t in tensors)


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of a loss computed from `x`: fp32 under autocast (its rule for losses; float64 stays), else x's."""
    if autocast_dtype(x.device) is not None and x.dtype != torch.float64:
        return torch.float32
    return x.dtype


def register(qualname: str, positions: Sequence[int]) -> None:
    """Registers the policy on op `qualname` ("masklm_kernels::name") for CPU and CUDA autocast: the
    arguments at `positions` are cast to the autocast dtype in force, then the op runs with autocast
    excluded (`positions=()`: no cast, only the exclusion, for ops whose inner PyTorch calls autocast
    would otherwise change, e.g. a backward called inside an autocast block). Ops without a registration
    fall through autocast unchanged."""
    name = qualname.split("::", 1)[1]

    for device_type, key in _AUTOCAST_KEYS.items():
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=exclude):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(a.to(dtype) if i in positions and _eligible(a, _device_type) else a
                         for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return getattr(torch.ops.masklm_kernels, name).default(*args)

        _LIB.impl(name, kernel, key, with_keyset=True)
