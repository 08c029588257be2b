"""The environment switches the library reads, in one place: each accepts only its documented values (a
typo is a clear `ValueError`, never a silently different behaviour), and `describe()` says what each is set
to and what that does (`python -m masklm_kernels.info` prints it)."""
from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
CPU_ISAS = ("avx512", "avx2", "scalar")

SWITCHES = {
    "MASKLM_NO_EXTENSION": "1/true/yes/on: do not load (or build) masklm_kernels._C; the pure-Python backends run",
    "MASKLM_CPU_ISA": f"one of {', '.join(CPU_ISAS)}: cap the SIMD code of the CPU masking kernels (unset: the "
                      "best this CPU has)",
    "MASKLM_CACHE": "folder of the training command's tokenizer cache and the test venvs (default "
                    "~/.cache/masklm_kernels)",
    "MASKLM_FORCE_CUDA": "1/true/yes/on at build time: compile the CUDA sources even without a CUDA torch",
    "TRITON_INTERPRET": "1: Triton kernels run under Triton's interpreter on CPU tensors (set before triton is "
                        "imported)",
}


def flag(name: str) -> bool:
    """A boolean switch: unset or one of 0/false/no/off (any case) is False, 1/true/yes/on is True."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of {', '.join(_TRUE)} (on) or "
                     f"{', '.join(v for v in _FALSE if v)} (off)")


def cpu_isa() -> str | None:
    """MASKLM_CPU_ISA, validated (None when unset)."""
    raw = os.environ.get("MASKLM_CPU_ISA")
    if raw is None or raw == "":
        return None
    if raw not in CPU_ISAS:
        raise ValueError(f"environment variable MASKLM_CPU_ISA={raw!r}: expected one of {', '.join(CPU_ISAS)}")
    return raw


def describe() -> list[tuple[str, str, str]]:
    """(name, value or "(unset)", meaning) of every switch; an invalid value is shown as such."""
    out = []
    for name, meaning in SWITCHES.items():
        raw = os.environ.get(name)
        shown = "(unset)" if raw is None else repr(raw)
        try:
            if name in ("MASKLM_NO_EXTENSION", "MASKLM_FORCE_CUDA"):
                flag(name)
            elif name == "MASKLM_CPU_ISA":
                cpu_isa()
        except ValueError as e:
            shown += f"  INVALID: {e}"
        out.append((name, shown, meaning))
    return out
