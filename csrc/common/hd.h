// Shared by the CUDA kernels and the C++ CPU implementation: code marked MLK_HD is compiled for both,
// so the CPU tests exercise the exact logic the GPU runs (see docs/ARCHITECTURE.md).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define MLK_HD __host__ __device__ __forceinline__
#else
#define MLK_HD inline
#endif
