"""Argument checks shared by every op's api.py: messages name the argument and what was expected.

Checks that need tensor *values* (ranges) read them only from CPU tensors and never while
torch.compile traces: on CUDA tensors they would synchronise the host; the kernels clamp instead
(documented per op).
"""
from __future__ import annotations

import numbers

import torch

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def values_checkable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int (bool refused) within [lo, hi)."""
    # `type(...) is int` first: the numbers.Integral ABC check costs ~1 us, and this runs per argument.
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value >= hi):
        want = f"in [{lo}, {hi})" if lo is not None and hi is not None else f">= {lo}" if hi is None else f"< {hi}"
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def check_prob(name: str, value, *, open_low: bool = False) -> float:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")
    return value


def check_tensor(name: str, t, *, device: torch.device, shape: tuple | None = None, integer: bool = False,
                 floating: bool = False, boolean_ok: bool = False, like: str = "input_ids") -> torch.Tensor:
    """A tensor on `device` (the device of the op's main input, named `like` in the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as {like} ({device}), got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if integer and not (t.dtype in INT_DTYPES or (boolean_ok and t.dtype == torch.bool)):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_range(name: str, t: torch.Tensor, lo: float, hi: float) -> None:
    """Values within [lo, hi], checked where that costs no device sync (see module docstring)."""
    if t.numel() and values_checkable(t):
        # One aminmax pass (~1 us at B=32) instead of comparison masks; NaN propagates into both.
        mn, mx = (float(v) for v in torch.aminmax(t))
        if not (lo <= mn and mx <= hi):
            bad = (t < lo) | (t > hi) | (t != t)
            raise ValueError(f"{name} must have all values in [{lo}, {hi}], got {t[bad].flatten()[0].item()}")


def scalar_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    """An int or 0-dim integer tensor → 0-dim int64 tensor (host ints stay on the CPU: no copy to the device)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype not in INT_DTYPES:
            raise TypeError(f"{name} must be an int or a 0-dim integer tensor, got {value.dtype} of shape "
                            f"{tuple(value.shape)}")
        if value.device.type != "cpu" and value.device != device:
            where = "the CPU" if device.type == "cpu" else f"the CPU or {device} (the device of input_ids)"
            raise ValueError(f"{name} must be on {where}, got {value.device}")
        return value.to(torch.int64)
    value = check_int(name, value, lo=-(2**63), hi=2**64)
    if value >= 2**63:
        value -= 2**64
    return torch.scalar_tensor(value, dtype=torch.int64)  # exact for all int64; 3x cheaper than torch.tensor
