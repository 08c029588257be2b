"""Backend selection shared by every op, in the manner of xformers' `not_supported_reasons`.

Each op lists its backends in order of preference; each backend says, for given inputs, why it cannot
run them (an empty list: it can). `backend="auto"` takes the first that can; an explicitly named backend
that cannot run raises `BackendUnavailableError` listing the reasons, never falling back silently.
"""
from __future__ import annotations

import importlib.util
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run these inputs (the message lists why)."""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    # extra reasons that do not depend on the inputs (e.g. a missing extension); None when fine
    requirement: Callable[[], str | None] = field(default=lambda: None)
    description: str = ""
    # reasons that depend on the inputs, from a dict of facts the op's api.py computes; [] when it can
    input_check: Callable[[dict], list[str]] | None = None

    def not_supported_reasons(self, device: torch.device | str | None = None, inputs: dict | None = None) -> list[str]:
        reasons = []
        req = self.requirement()
        if req:
            reasons.append(req)
        if device is not None:
            dtype = torch.device(device).type
            if dtype not in self.device_types:
                reasons.append(f"runs on {' / '.join(self.device_types)} tensors, not {dtype}")
        if inputs is not None and self.input_check is not None:
            reasons += self.input_check(inputs)
        return reasons


def triton_interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result  # evaluated once when traced: torch 2.11's dynamo cannot trace find_spec
def triton_installed() -> str | None:
    """None when triton can be imported, else the reason (without importing it)."""
    return None if importlib.util.find_spec("triton") else "triton is not installed (pip install triton)"


def triton_requirement() -> str | None:
    """Requirement of every Triton backend: triton installed, and a CUDA device or the interpreter."""
    if triton_installed():
        return triton_installed()
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (CPU tensors run only under Triton's interpreter, TRITON_INTERPRET=1)"
    return None


def triton_cpu_reason(device: torch.device) -> list[str]:
    """Triton backends take CPU tensors only under the interpreter."""
    if device.type == "cpu" and not triton_interpreting():
        return ["CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 before importing triton)"]
    return []


def split_fp32(x: float) -> tuple[float, float]:
    """x = hi + lo with both fp32-representable (to ~2^-48): Triton's float arguments and literals are fp32,
    and fp64 inputs (interpreter) need constants to more digits than that."""
    return (hi := _fp32(x)), _fp32(x - hi)


def _fp32(x: float) -> float:
    """x rounded to fp32 in plain Python (no tensor: nothing a torch function mode would see as a read)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def select_backend(op: str, backends: Sequence[Backend], requested: str, device: torch.device,
                   inputs: dict | None = None) -> Backend:
    names = [b.name for b in backends]
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, one of {['auto', *names]}, got {type(requested).__name__}")
    if requested == "auto":
        for b in backends:
            if not b.not_supported_reasons(device, inputs):
                return b
        detail = "; ".join(f"{b.name}: {', '.join(b.not_supported_reasons(device, inputs))}" for b in backends)
        raise BackendUnavailableError(f"{op}: no backend can run inputs on {device} ({detail})")
    for b in backends:
        if b.name == requested:
            reasons = b.not_supported_reasons(device, inputs)
            if reasons:
                raise BackendUnavailableError(f"{op}: backend={requested!r} cannot run here: " + "; ".join(reasons))
            return b
    raise ValueError(f"backend must be one of {['auto', *names]}, got {requested!r}")
