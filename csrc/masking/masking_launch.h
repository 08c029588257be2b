// Entry points of the masking backends, free of torch types so that the CUDA kernels compile with a
// bare nvcc (the static compile check in benchmarks/compile_report.py builds them standalone).
#pragma once
#include "masking_core.h"
#include "mass_core.h"
#include "t5_core.h"
#include "bart_core.h"

namespace mlk {

template <typename id_t> void mask_tokens_cpu(const MaskArgs<id_t>& a);
template <typename id_t> void mass_mask_cpu(const MassArgs<id_t>& a);
template <typename id_t> void t5_span_corruption_cpu(const T5Args<id_t>& a);
template <typename id_t> void bart_infill_cpu(const BartArgs<id_t>& a);

#if defined(MLK_WITH_CUDA)
// `stream` is a cudaStream_t; kept opaque here so that this header needs no CUDA include.
template <typename id_t> void mask_tokens_cuda(const MaskArgs<id_t>& a, void* stream);
template <typename id_t> void mass_mask_cuda(const MassArgs<id_t>& a, void* stream);
template <typename id_t> void t5_span_corruption_cuda(const T5Args<id_t>& a, void* stream);
// len_ws: (B, S) int32 workspace (each row's span lengths)
template <typename id_t> void bart_infill_cuda(const BartArgs<id_t>& a, int32_t* len_ws, void* stream);
#endif

}  // namespace mlk
