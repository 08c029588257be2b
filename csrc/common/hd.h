// Shared by the CUDA kernels and the C++ CPU implementation: code marked MLK_HD is compiled for both,
// so the CPU tests exercise the exact logic the GPU runs (see docs/ARCHITECTURE.md).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define MLK_HD __host__ __device__ __forceinline__
#else
#define MLK_HD inline
#endif

// Full unrolling of short fixed-count loops on the GPU: an array indexed by a loop counter that is
// not unrolled lives in local memory (the ptxas "stack frame" of tests/test_static_compile.py).
#if defined(__CUDACC__)
#define MLK_UNROLL _Pragma("unroll")
#else
#define MLK_UNROLL
#endif
