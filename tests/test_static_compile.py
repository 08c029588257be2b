"""Verification without a GPU (docs/TESTING.md): the CUDA sources compile with nvcc for sm_80 and sm_90 with
the real build's flags, and every Triton kernel configuration the library launches compiles ahead of time
for both; no kernel spills registers or exceeds the shared-memory limit; the torch glue compiles with its
CUDA branch enabled. Skipped, with the reason, where nvcc or triton is absent."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from benchmarks import compile_report, ptxas

NVCC = compile_report.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin): CUDA sources not compiled")


def test_there_are_cuda_sources():
    assert compile_report.cuda_sources(), "no csrc/**/*.cu found"


@pytest.mark.gpu_build
@needs_nvcc
@pytest.mark.parametrize("arch", compile_report.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", compile_report.cuda_sources(), ids=os.path.basename)
def test_cuda_kernels_compile_without_spills(source, arch):
    usages = compile_report.compile_source(NVCC, source, arch)
    assert usages, f"no kernel entries parsed from ptxas output of {source} sm_{arch}"
    print("\n" + compile_report.format_table(usages))
    problems = [f"{u.kernel}: {p}" for u in usages for p in u.problems]
    assert not problems, f"sm_{arch}: " + "; ".join(problems)


def test_ptxas_parser_flags_spills():
    """The check above can fail: a spilling kernel in ptxas output is reported as a problem."""
    text = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z3fooPf\n"
            "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 0 barriers, 1024 bytes smem\n")
    (u,) = ptxas.parse_ptxas(text, "x.cu")
    assert (u.arch, u.registers, u.stack_bytes, u.shared_bytes) == (90, 255, 8, 1024)
    assert u.problems and "spills" in u.problems[0]


@pytest.mark.gpu_build
@needs_nvcc
def test_torch_glue_compiles_with_cuda_enabled(tmp_path):
    """csrc/**/*_ops.cpp with MLK_WITH_CUDA (the CUDA build's branch), syntax-checked against the
    installed torch's headers and the toolkit's; a CPU-only torch ships the ATen/c10 CUDA headers."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    cuda_include = compile_report.find_cuda_include()
    if cuda_include is None:
        pytest.skip("no CUDA toolkit include directory with cuda_runtime_api.h")
    torch_includes = include_paths()
    if not os.path.isfile(os.path.join(torch_includes[0], "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch ships no c10/cuda headers")
    root = compile_report.ROOT
    sources = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "csrc")) for f in fs
                     if f.endswith("_ops.cpp"))
    assert sources
    # A CPU-only torch lacks the one header its CMake generates for c10_cuda; its content is this line.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    for src in sources:
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DMLK_WITH_CUDA", f"-I{cuda_include}",
               *(f"-I{p}" for p in torch_includes), f"-I{tmp_path}", src]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{src} with MLK_WITH_CUDA:\n{r.stderr[-4000:]}"


@pytest.mark.gpu_build
def test_triton_kernels_compile_without_spills():
    pytest.importorskip("triton", reason="triton is not installed")
    from benchmarks import compile_triton

    usages = compile_triton.compile_all(compile_report.ARCHS)
    print("\n" + compile_triton.format_table(usages))
    kernels = {u.kernel for u in usages}
    assert kernels == {"_attn_fwd", "_bwd_preprocess", "_bwd_dkdv", "_bwd_dq", "_ce_rows"}, kernels
    problems = [f"sm_{u.arch} {u.kernel} [{u.config}]: {p}" for u in usages for p in compile_triton.problems(u)]
    assert not problems, "; ".join(problems)


@pytest.mark.gpu_build
def test_triton_compile_report_covers_every_launchable_configuration():
    """Every tile configuration `block_config` can return on a GPU (any head dim the triton backend accepts,
    16-bit or fp32, with or without a dense mask) is among those the report compiles."""
    pytest.importorskip("triton", reason="triton is not installed")
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    import torch

    from benchmarks import compile_triton
    from masklm_kernels.attention import triton_host
    from masklm_kernels.attention.api import HEAD_DIMS

    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=compile_triton._compiler_process) as p:
        todo = p.submit(compile_triton.tasks, [90]).result()  # what compile_all compiles (real JIT functions)
    launch_names = ("_attn_fwd", "_bwd_preprocess", "_bwd_dkdv", "_bwd_dq")  # build_launches' order
    compiled = {(launch_names[i], launch.cfg, launch.bound()["F"].BD.value) for d, h, v, i, _ in todo
                for launch in compile_triton.build_launches(d, h, v)[i:i + 1]
                if launch.cfg is not None and v not in compile_triton.LOSS_VARIANTS}
    names = {"fwd": "_attn_fwd", "dkdv": "_bwd_dkdv", "dq": "_bwd_dq"}
    for kernel, name in names.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for D in HEAD_DIMS:
                if triton_host.unsupported(dtype, D):
                    continue  # refused on CUDA tensors (api.py), never launched there
                for dense, dropout in ((False, False), (True, False), (False, True), (True, True)):
                    cfg = triton_host.block_config(kernel, D, dtype, dense, dropout)
                    key = (name, cfg, triton_host.head_block(D))
                    assert key in compiled, \
                        f"{kernel} D={D} {dtype} dense={dense} dropout={dropout}: {cfg} is never compiled"
