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
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from masklm_kernels._cli import description

from .ptxas import KernelUsage, format_rows, parse_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
# Flags of the real build (setup.py): no FMA contraction, so the GPU rounds as the CPU does.
NVCC_FLAGS = ("-std=c++17", "-O3", "--fmad=false", "-DMLK_WITH_CUDA", "-Xptxas", "-v")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=description(__doc__))
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
