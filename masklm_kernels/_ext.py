"""Loading of the compiled extension `masklm_kernels._C`, and why it is missing when it is.

Importing `_C` registers the C++/CUDA ops under `torch.ops.masklm_kernels`. The package works without
it (pure-Python backends only); `load_error()` says why it could not be used.
"""
from __future__ import annotations

from . import _env

_LOAD_ERROR: str | None = None
_LOADED = False
_HAS_CUDA_KERNELS = False  # set once by _load(): a plain bool that torch.compile can constant-fold


def _load() -> None:
    global _LOAD_ERROR, _LOADED, _HAS_CUDA_KERNELS
    if _LOADED or _LOAD_ERROR is not None:
        return
    if _env.flag("MASKLM_NO_EXTENSION"):  # a value that is not a documented one raises, naming it
        _LOAD_ERROR = "MASKLM_NO_EXTENSION is set: the extension is disabled"
        return
    _env.cpu_isa()  # read by the C++ code on first use: a typo must not silently select scalar code
    try:
        from masklm_kernels import _C  # noqa: F401  (registers the ops)
    except ImportError as e:  # not built, or built against another torch
        _LOAD_ERROR = (f"masklm_kernels._C could not be imported ({e}); build it with "
                       "`pip install --no-build-isolation -e .`")
        return
    import torch

    _HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("masklm_kernels::mask_tokens", "CUDA")
    _LOADED = True


def available() -> bool:
    _load()
    return _LOADED


def load_error() -> str | None:
    _load()
    return _LOAD_ERROR


def has_cuda_kernels() -> bool:
    """True when `_C` was built with the CUDA sources (the ops have a CUDA kernel registered)."""
    return available() and _HAS_CUDA_KERNELS
