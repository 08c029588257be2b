"""Backend selection shared by every op, in the manner of xformers' `not_supported_reasons`.

Each op lists its backends in order of preference; each backend says, for given inputs, why it cannot
run them (an empty list: it can). `backend="auto"` takes the first that can; an explicitly named backend
that cannot run raises `BackendUnavailableError` listing the reasons, never falling back silently.
"""
from __future__ import annotations

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

    def not_supported_reasons(self, device: torch.device | str | None = None) -> list[str]:
        reasons = []
        req = self.requirement()
        if req:
            reasons.append(req)
        if device is not None:
            dtype = torch.device(device).type
            if dtype not in self.device_types:
                reasons.append(f"runs on {' / '.join(self.device_types)} tensors, not {dtype}")
        return reasons


def select_backend(op: str, backends: Sequence[Backend], requested: str, device: torch.device) -> Backend:
    names = [b.name for b in backends]
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, one of {['auto', *names]}, got {type(requested).__name__}")
    if requested == "auto":
        for b in backends:
            if not b.not_supported_reasons(device):
                return b
        detail = "; ".join(f"{b.name}: {', '.join(b.not_supported_reasons(device))}" for b in backends)
        raise BackendUnavailableError(f"{op}: no backend can run inputs on {device} ({detail})")
    for b in backends:
        if b.name == requested:
            reasons = b.not_supported_reasons(device)
            if reasons:
                raise BackendUnavailableError(f"{op}: backend={requested!r} cannot run here: " + "; ".join(reasons))
            return b
    raise ValueError(f"backend must be one of {['auto', *names]}, got {requested!r}")
