"""Files the library writes are written atomically: a reader (or a crash, a full disk, a kill) sees the old
file or the new one, never a torn mix. The data goes to a temporary file in the same directory, is flushed
and fsync'ed, and `os.replace` puts it in place (atomic on POSIX and Windows within one file system); the
directory is fsync'ed too, so that the rename itself survives a power loss."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """`open()` for writing whose file appears at `path` only when the block ends without an exception
    (mode "w" or "wb"); on an exception the temporary file is removed and `path` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every platform / file system can open a directory
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def strict_json(value):
    """`value` with every float NaN / inf replaced by None, so that `json.dump(..., allow_nan=False)` writes
    strict JSON (NaN is not JSON: other parsers reject it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | os.PathLike, value, indent: int = 2) -> None:
    """Strict JSON (non-finite floats as null), written atomically."""
    with atomic_open(path, "w") as f:
        json.dump(strict_json(value), f, indent=indent, allow_nan=False)
        f.write("\n")
