"""Differences between the Triton versions the library supports (3.6, the GPU image's, to the newest),
kept in one place so that the kernels and launchers are written once.

Interpreter scalars. Triton's interpreter (TRITON_INTERPRET=1) holds a scalar as a shape-(1,) NumPy array.
Up to Triton 3.6 it converts one to a Python int for `range()` and indexing with `int(array)`, which NumPy
2.4 turned from a deprecation into a `TypeError` ("only 0-dimensional arrays can be converted to Python
scalars"): every kernel loop with a runtime bound then fails. Later Triton squeezes the array first.
`interpreter_scalars()` makes the older interpreters do the same, for the duration of one launch only: it
wraps the interpreter's per-launch patching of `tl.tensor`, adds a squeezing `__index__` to it (restored
with the rest of that launch's patches) and puts the interpreter back as it was on exit. It does nothing
when the interpreter is off or already squeezes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading

from ._backends import triton_interpreting

_LOCK = threading.Lock()


def _squeezing_index(self) -> int:
    return int(self.handle.data.item())  # as Triton 3.9's: size-1 arrays of any shape; larger ones raise


@functools.lru_cache(maxsize=None)
def _needs_scalar_fix(interp) -> bool:
    patch = getattr(interp, "_patch_lang_tensor", None)
    if patch is None:
        return False
    try:
        src = inspect.getsource(patch)
    except (OSError, TypeError):
        return False
    return "int(self.handle.data)" in src


@contextlib.contextmanager
def interpreter_scalars():
    """Within this block, Triton's interpreter (if on, and if it needs it) converts its shape-(1,) scalars to
    Python ints as newer Triton does. Nothing changes outside the block."""
    if not triton_interpreting():
        yield
        return
    from triton.runtime import interpreter as interp

    if not _needs_scalar_fix(interp):
        yield
        return
    with _LOCK:  # the interpreter itself patches module globals per launch: one launch at a time
        original = interp._patch_lang_tensor

        def patch_lang_tensor(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", _squeezing_index)

        interp._patch_lang_tensor = patch_lang_tensor
        try:
            yield
        finally:
            interp._patch_lang_tensor = original
