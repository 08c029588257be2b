// CUDA kernels of the masking ops. Per-token work is one thread per four tokens (one Philox call
// serves four selection words); the row-sequential modes (exact, span, MASS fragment choice) run one
// thread per row over the shared row algorithms, then an elementwise pass writes the outputs.
// Compiled with --fmad=false so that the double arithmetic matches the CPU bit for bit.
#include <cuda_runtime.h>

#include "masking_launch.h"

namespace mlk {
namespace {

constexpr int kThreads = 256;  // elementwise kernels are memory bound; 256 keeps occupancy full on sm_80/90

inline unsigned grid_for(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return static_cast<unsigned>(g < 1 ? 1 : (g > 2147483647 ? 2147483647 : g));
}

template <typename id_t>
__global__ void bernoulli_kernel(const MaskArgs<id_t> a) {
  const int64_t quads = (a.S + 3) / 4;
  const int64_t total = a.B * quads;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = q / quads;
    const Row<id_t> row(a, b);
    bernoulli_quad(row, (q - b * quads) * 4);
  }
}

template <typename id_t>
__global__ void select_rows_kernel(const MaskArgs<id_t> a) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= a.B) return;
  const Row<id_t> row(a, b);
  if (a.mode == kExact)
    select_exact_row(row, a.sel_ws + b * a.S, a.key_ws + b * a.S);
  else {
    SpanDraws draws{row.key};
    select_span_row(row, a.sel_ws + b * a.S, a.key_ws + b * a.S, draws);
  }
}

template <typename id_t>
__global__ void emit_selected_kernel(const MaskArgs<id_t> a) {
  const int64_t total = a.B * a.S;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / a.S;
    const Row<id_t> row(a, b);
    row.emit(i - b * a.S, a.sel_ws[i] != 0);
  }
}

template <typename id_t>
__global__ void mass_fragment_kernel(const MassArgs<id_t> a) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < a.B) mass_fragment_row(a, b);
}

template <typename id_t>
__global__ void mass_emit_kernel(const MassArgs<id_t> a) {
  const int64_t total = a.B * a.S;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / a.S;
    mass_emit(a, mass_key(a, b), b, i - b * a.S, a.spans[2 * b], a.spans[2 * b + 1]);
  }
}

}  // namespace

template <typename id_t>
void mask_tokens_cuda(const MaskArgs<id_t>& a, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.B == 0 || a.S == 0) return;
  if (a.mode == kBernoulli) {
    bernoulli_kernel<id_t><<<grid_for(a.B * ((a.S + 3) / 4), kThreads), kThreads, 0, stream>>>(a);
  } else {
    // One thread per row: 64 threads per block spreads a typical 32-256 row batch over several SMs.
    select_rows_kernel<id_t><<<grid_for(a.B, 64), 64, 0, stream>>>(a);
    emit_selected_kernel<id_t><<<grid_for(a.B * a.S, kThreads), kThreads, 0, stream>>>(a);
  }
}

template <typename id_t>
void mass_mask_cuda(const MassArgs<id_t>& a, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.B == 0) return;
  mass_fragment_kernel<id_t><<<grid_for(a.B, 64), 64, 0, stream>>>(a);
  if (a.S == 0) return;
  mass_emit_kernel<id_t><<<grid_for(a.B * a.S, kThreads), kThreads, 0, stream>>>(a);
}

template void mask_tokens_cuda<int64_t>(const MaskArgs<int64_t>&, void*);
template void mask_tokens_cuda<int32_t>(const MaskArgs<int32_t>&, void*);
template void mass_mask_cuda<int64_t>(const MassArgs<int64_t>&, void*);
template void mass_mask_cuda<int32_t>(const MassArgs<int32_t>&, void*);

template <typename id_t>
__global__ void t5_rows_kernel(const T5Args<id_t> a) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < a.B) t5_row(a, b);
}

// One thread per row: the segmentation is a sequential scan of the row (as the span mode's selection);
// its writes are the row's own outputs.
template <typename id_t>
void t5_span_corruption_cuda(const T5Args<id_t>& a, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.B == 0) return;
  t5_rows_kernel<id_t><<<grid_for(a.B, 64), 64, 0, stream>>>(a);
}

template void t5_span_corruption_cuda<int64_t>(const T5Args<int64_t>&, void*);
template void t5_span_corruption_cuda<int32_t>(const T5Args<int32_t>&, void*);

template <typename id_t>
__global__ void bart_rows_kernel(const BartArgs<id_t> a, int32_t* len_ws) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < a.B) bart_row(a, b, len_ws + b * a.S);
}

// One thread per row, as T5's: the row is two sequential sweeps.
template <typename id_t>
void bart_infill_cuda(const BartArgs<id_t>& a, int32_t* len_ws, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.B == 0) return;
  bart_rows_kernel<id_t><<<grid_for(a.B, 64), 64, 0, stream>>>(a, len_ws);
}

template void bart_infill_cuda<int64_t>(const BartArgs<int64_t>&, int32_t*, void*);
template void bart_infill_cuda<int32_t>(const BartArgs<int32_t>&, int32_t*, void*);

}  // namespace mlk
