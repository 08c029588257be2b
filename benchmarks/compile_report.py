"""Static GPU build check, without a GPU: compile the CUDA sources (nvcc) and every Triton kernel
configuration the library launches (ahead of time, benchmarks/compile_triton.py) for sm_80 and sm_90, and
report each kernel's registers, stack, spills and shared memory.

    python -m benchmarks.compile_report            # csrc/**/*.cu and the Triton kernels, both archs
    python -m benchmarks.compile_report --arch 90 --skip triton

Exits non-zero on a compile error, a register spill or shared memory over the architecture's per-block
limit. The test suite (tests/test_static_compile.py) runs the same checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
# Flags of the real build (setup.py): no FMA contraction, so the GPU rounds as the CPU does.
NVCC_FLAGS = ("-std=c++17", "-O3", "--fmad=false", "-DMLK_WITH_CUDA", "-Xptxas", "-v")
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


def find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_cuda_include() -> str | None:
    """The toolkit's include directory (cuda_runtime_api.h), from $CUDA_HOME, torch's guess or nvcc."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, homes):
        inc = os.path.join(home, "include")
        if os.path.isfile(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    return None


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


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


def compile_source(nvcc: str, source: str, arch: int) -> list[KernelUsage]:
    """Compiles one .cu for one arch; raises RuntimeError with the compiler output on failure."""
    with tempfile.TemporaryDirectory(prefix="mlk_nvcc_") as tmp:
        cmd = [nvcc, "-c", source, "-o", os.path.join(tmp, "k.o"), *NVCC_FLAGS,
               "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for {os.path.relpath(source, ROOT)} sm_{arch}:\n{r.stdout}\n{r.stderr}")
    return parse_ptxas(r.stdout + r.stderr, os.path.relpath(source, ROOT))


def format_table(usages: list[KernelUsage]) -> str:
    rows = [("source", "arch", "regs", "stack B", "spill st/ld B", "smem B", "kernel")]
    for u in usages:
        short = re.sub(r"\(anonymous namespace\)::|mlk::", "", u.kernel)
        rows.append((u.source, f"sm_{u.arch}", str(u.registers), str(u.stack_bytes),
                     f"{u.spill_store_bytes}/{u.spill_load_bytes}", str(u.shared_bytes), short[:90]))
    return format_rows(rows)


def format_rows(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart (shared by the CUDA and Triton tables)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="default: all of 80, 90")
    p.add_argument("--skip", action="append", choices=("cuda", "triton"), default=[], help="leave a part out")
    args = p.parse_args(argv)
    archs = args.arch or list(ARCHS)
    bad: list[str] = []
    if "cuda" not in args.skip:
        nvcc = find_nvcc()
        if nvcc is None:
            print("nvcc not found (PATH, $CUDA_HOME/bin): CUDA sources not checked")
        else:
            usages = [u for src in cuda_sources() for arch in archs for u in compile_source(nvcc, src, arch)]
            print("CUDA C++ (nvcc -Xptxas -v)\n" + format_table(usages))
            bad += [f"sm_{u.arch} {u.kernel}: {p}" for u in usages for p in u.problems]
    if "triton" not in args.skip:
        try:
            import triton  # noqa: F401
        except ImportError:
            print("triton not installed: Triton kernels not checked")
        else:
            from . import compile_triton

            usages = compile_triton.compile_all(archs)
            print(f"\nTriton {triton.__version__} (ahead of time; ptxas report)")
            print(compile_triton.format_table(usages))
            bad += [f"sm_{u.arch} {u.kernel} [{u.config}]: {p}" for u in usages for p in compile_triton.problems(u)]
    for line in bad:
        print("FAIL " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
