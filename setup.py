"""Build of masklm_kernels and its extension `masklm_kernels._C`.

The C++ CPU sources are always built (OpenMP where the compiler has it); the CUDA sources are added
when a CUDA toolkit and a CUDA-enabled torch are present, or when MASKLM_FORCE_CUDA=1.
TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0"). MASKLM_NO_EXTENSION=1 skips the extension:
the package then runs on its pure-Python backends and `python -m masklm_kernels.info` says why.

Build against the installed torch (never an isolated build, which would fetch a CUDA torch):
    pip install --no-build-isolation -e .
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    """The package's switch syntax (masklm_kernels/_env.py, not importable before the build)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise SystemExit(f"environment variable {name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")


def _openmp_flags():
    """-fopenmp when the C++ compiler accepts it (gcc does; Apple clang does not)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([cxx, "-fopenmp", "-x", "c++", "-E", "-"], input=b"", capture_output=True, timeout=60)
        return ["-fopenmp"] if r.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def _extensions():
    if _flag("MASKLM_NO_EXTENSION"):
        print("masklm_kernels: MASKLM_NO_EXTENSION=1, not building masklm_kernels._C", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = _flag("MASKLM_FORCE_CUDA") or (CUDA_HOME is not None and torch.version.cuda is not None)
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # Threads come from at::parallel_for, i.e. torch's own OpenMP pool (honours torch.set_num_threads).
    # -fopenmp is needed because at::parallel_for's body is an inline `#pragma omp parallel`; the
    # libgomp.so.1 it links resolves to the copy torch already loaded (same soname), so one runtime.
    omp = _openmp_flags()
    # -ffp-contract=off / --fmad=false: no fused multiply-add, so the double arithmetic of the shared
    # masking logic rounds identically on the CPU, on the GPU and in NumPy (bit-identical outputs).
    # The C++ standard is left to BuildExtension, which picks the one the installed torch needs.
    cxx_flags = ["-O3", "-ffp-contract=off"] + omp
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "--fmad=false", "-DMLK_WITH_CUDA", "-lineinfo"]
        ext = CUDAExtension(
            "masklm_kernels._C",
            sources=cpp + cu,
            extra_compile_args={"cxx": cxx_flags + ["-DMLK_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=omp,
        )
    else:
        ext = CppExtension(
            "masklm_kernels._C", sources=cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=omp
        )
    print(f"masklm_kernels: building _C with CUDA={with_cuda}, OpenMP={bool(omp)}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["masklm_kernels", "masklm_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
