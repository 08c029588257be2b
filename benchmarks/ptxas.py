"""ptxas resource reports (`nvcc -Xptxas -v`, or Triton's compile log): parsing, the limits a kernel must
meet (no register spill, shared memory within the architecture's per-block limit) and table formatting,
shared by compile_report.py (CUDA C++) and compile_triton.py (Triton).
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

# Opt-in shared memory per block (CUDA programming guide, "Compute capabilities"): A100 / H100.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclasses.dataclass
class KernelUsage:
    source: str
    arch: int
    kernel: str
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0

    @property
    def problems(self) -> list[str]:
        return usage_problems(self)


def usage_problems(u) -> list[str]:
    """Spills, or shared memory over the arch's limit, of a kernel report (CUDA C++ or Triton)."""
    out = []
    if u.spill_store_bytes or u.spill_load_bytes:
        out.append(f"spills {u.spill_store_bytes} B stored / {u.spill_load_bytes} B loaded")
    if u.shared_bytes > MAX_SHARED_BYTES[u.arch]:
        out.append(f"shared memory {u.shared_bytes} B > {MAX_SHARED_BYTES[u.arch]} B")
    return out


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str, source: str) -> list[KernelUsage]:
    """Kernel entries of `nvcc -Xptxas -v` output (device functions without an entry are skipped)."""
    kernels: list[KernelUsage] = []
    current: KernelUsage | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = KernelUsage(source, int(m.group(2)), m.group(1))
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            current.shared_bytes = int(m.group(2) or 0)
    names = _demangle([k.kernel for k in kernels])
    for k in kernels:
        k.kernel = names[k.kernel]
    return kernels


def format_rows(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart (shared by the CUDA and Triton tables)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
