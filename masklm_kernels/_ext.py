"""Loading of the compiled extension `masklm_kernels._C`, on first use, and why it is missing when it is.

Importing `_C` registers the CPU and CUDA kernels of the C++ ops under `torch.ops.masklm_kernels` (their
schemas and fake implementations are defined by the Python package, so torch.compile can trace them
before `_C` is loaded). The package works without it (pure-Python backends only); `load_error()` says why
it could not be used. The first call may happen while torch.compile traces: the load runs then as a
constant of the trace (`assume_constant_result`), never inside the graph.
"""
from __future__ import annotations

import torch

from . import _env

_STATE: tuple[bool, str | None, bool] | None = None  # (loaded, why not, has CUDA kernels), once known


@torch.compiler.assume_constant_result
def _state() -> tuple[bool, str | None, bool]:
    global _STATE
    if _STATE is None:
        _STATE = _load()
    return _STATE


def _load() -> tuple[bool, str | None, bool]:
    if _env.flag("MASKLM_NO_EXTENSION"):  # a value that is not a documented one raises, naming it
        return False, "MASKLM_NO_EXTENSION is set: the extension is disabled", False
    _env.cpu_isa()  # read by the C++ code on first use: a typo must not silently select scalar code
    try:
        from masklm_kernels import _C  # noqa: F401  (registers the kernels)
    except ImportError as e:  # not built, or built against another torch
        return False, (f"masklm_kernels._C could not be imported ({e}); build it with "
                       "`pip install --no-build-isolation -e .`"), False
    return True, None, torch._C._dispatch_has_kernel_for_dispatch_key("masklm_kernels::mask_tokens", "CUDA")


def available() -> bool:
    return _state()[0]


def load_error() -> str | None:
    return _state()[1]


def has_cuda_kernels() -> bool:
    """True when `_C` was built with the CUDA sources (the ops have a CUDA kernel registered)."""
    return _state()[2]
