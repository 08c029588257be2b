// CPU kernel and registration of masklm_kernels::attention_dropout_keep (schema defined in Python,
// masklm_kernels/attention/dropout.py): the keep mask of attention dropout (dropout.h) for some rows and
// columns of every head of some batch rows, 16 columns per Philox call (philox_lanes: AVX-512 / AVX2).
// The CPU attention backend draws each piece's mask with it, forward and backward.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../masking/philox_simd.h"
#include "dropout.h"

namespace mlk {
namespace {

// keep[s, h, r, c] for sample s, head h, row row_start + r, column cols[c]: a (S, heads, R, C) bool tensor.
at::Tensor attention_dropout_keep_cpu(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& samples,
                                      int64_t heads, int64_t row_start, int64_t row_end, const at::Tensor& cols,
                                      int64_t threshold) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "attention_dropout_keep: seed must be a 0-dim int64 CPU tensor");
  TORCH_CHECK(offset.dim() == 0 && offset.scalar_type() == at::kLong && offset.device().is_cpu(),
              "attention_dropout_keep: offset must be a 0-dim int64 CPU tensor");
  TORCH_CHECK(samples.dim() == 1 && samples.scalar_type() == at::kLong && samples.device().is_cpu(),
              "attention_dropout_keep: sample_ids must be a 1-D int64 CPU tensor");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong && cols.device().is_cpu(),
              "attention_dropout_keep: cols must be a 1-D int64 CPU tensor");
  TORCH_CHECK(heads >= 0 && heads < (int64_t(1) << 24), "attention_dropout_keep: heads must be in [0, 2^24)");
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= (int64_t(1) << 32),
              "attention_dropout_keep: need 0 <= row_start <= row_end <= 2^32");
  TORCH_CHECK(0 <= threshold && threshold < (int64_t(1) << 32), "attention_dropout_keep: threshold must be in [0, 2^32)");
  const auto samp = samples.contiguous();
  const auto cc = cols.contiguous();
  const int64_t S = samp.size(0), R = row_end - row_start, C = cc.size(0);
  auto keep = at::empty({S, heads, R, C}, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  const uint64_t sd = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t off = static_cast<uint64_t>(offset.item<int64_t>());
  const int64_t* sp = samp.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  bool* out = keep.data_ptr<bool>();
  const uint32_t thr = static_cast<uint32_t>(threshold);
  // one task per (sample, head, row); rows of a few hundred columns: grain of 16 rows per thread chunk
  at::parallel_for(0, S * heads * R, 16, [&](int64_t t0, int64_t t1) {
    uint32_t c[4][kPhiloxLanes];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % R, sh = t / R, h = sh % heads, s = sh / heads;
      const DropoutKey key = dropout_key(sd, off, static_cast<uint64_t>(sp[s]), static_cast<uint32_t>(h));
      const uint32_t i = static_cast<uint32_t>(row_start + r);
      bool* row = out + t * C;
      for (int64_t c0 = 0; c0 < C; c0 += kPhiloxLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kPhiloxLanes, C - c0));
        for (int l = 0; l < kPhiloxLanes; ++l) {
          c[0][l] = l < n ? static_cast<uint32_t>(cp[c0 + l]) : 0u;
          c[1][l] = i;
          c[2][l] = 0u;
          c[3][l] = 0u;
        }
        philox_lanes(c, key.k0, key.k1);
        for (int l = 0; l < n; ++l) row[c0 + l] = c[0][l] >= thr;
      }
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(masklm_kernels, CPU, m) { m.impl("attention_dropout_keep", &attention_dropout_keep_cpu); }

}  // namespace mlk
