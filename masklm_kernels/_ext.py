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


@torch.compiler.assume_constant_result
def has_kernel(name: str, device_type: str) -> bool:
    """`_C` is loaded and registers a `device_type` ("CPU", "CUDA") kernel for `masklm_kernels::<name>` (an
    extension built before the op existed does not). A constant of a torch.compile trace."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"masklm_kernels::{name}", device_type)


def loading_kernel(name: str):
    """The kernel for every device of the C++ op `masklm_kernels::<name>` until `_C` is loaded (registered
    as CompositeExplicitAutograd: a device kernel, once registered, takes precedence): loads `_C` and calls
    the op again, so that calling it through `torch.ops` (or running a saved graph that holds it) works
    before any public function has loaded it."""
    qualname = f"masklm_kernels::{name}"

    def kernel(*args):
        if not available():
            raise RuntimeError(f"{qualname}: the C++ extension is not available: {load_error()}")
        key = args[0].device.type.upper()
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
            raise RuntimeError(f"{qualname}: masklm_kernels._C has no {key} kernel (built without it)")
        return getattr(torch.ops.masklm_kernels, name).default(*args)

    return kernel
