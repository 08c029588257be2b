// CPU kernel and registration of masklm_kernels::attention_dropout_keep (schema defined in Python,
// masklm_kernels/attention/dropout.py): the keep mask of attention dropout (dropout.h) for some rows and
// columns of every head of some batch rows, 16 draws (64 neighbouring columns) per vectorised Philox call
// (philox_lanes: AVX-512 / AVX2).
// The CPU attention backend draws each piece's mask with it, forward and backward.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../masking/philox_simd.h"
#include "dropout.h"

namespace mlk {
namespace {

// Writes keep[s, h, r, c] (sample s, head h, row row_start + r, column cols[c]) as `kept` / 0 of type T.
template <typename T>
void fill_keep(T* out, T kept, uint64_t sd, uint64_t off, const int64_t* sp, const int64_t* cp, int64_t S,
               int64_t heads, int64_t row_start, int64_t R, int64_t C, uint32_t thr) {
  // One task per (sample, head, row). A draw covers four neighbouring keys (dropout.h): the row's columns
  // are walked in order, their distinct counters j / 4 gathered 16 at a time into the SIMD lanes.
  at::parallel_for(0, S * heads * R, 16, [&](int64_t t0, int64_t t1) {
    uint32_t c[4][kPhiloxLanes];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % R, sh = t / R, h = sh % heads, s = sh / heads;
      const DropoutKey key = dropout_key(sd, off, static_cast<uint64_t>(sp[s]), static_cast<uint32_t>(h));
      const uint32_t i = static_cast<uint32_t>(row_start + r);
      T* row = out + t * C;
      for (int64_t first = 0; first < C;) {
        int n = 0;  // lanes filled
        int64_t last = first;  // columns [first, last) are served by this draw
        for (; last < C; ++last) {
          const uint32_t ctr = static_cast<uint32_t>(static_cast<uint64_t>(cp[last]) >> 2);
          if (n == 0 || ctr != c[0][n - 1]) {
            if (n == kPhiloxLanes) break;
            c[0][n++] = ctr;
          }
        }
        uint32_t ctrs[kPhiloxLanes];
        for (int l = 0; l < kPhiloxLanes; ++l) {
          if (l >= n) c[0][l] = 0u;
          ctrs[l] = c[0][l];
          c[1][l] = i;
          c[2][l] = 0u;
          c[3][l] = 0u;
        }
        philox_lanes(c, key.k0, key.k1);
        int lane = 0;
        for (int64_t col = first; col < last; ++col) {
          const uint64_t j = static_cast<uint64_t>(cp[col]);
          if (static_cast<uint32_t>(j >> 2) != ctrs[lane]) ++lane;
          row[col] = c[j & 3][lane] >= thr ? kept : T(0);
        }
        first = last;
      }
    }
  });
}

// keep[s, h, r, c] for sample s, head h, row row_start + r, column cols[c]: a (S, heads, R, C) tensor of
// `dtype`, bool (True: kept) or floating (`value` where kept, 0 elsewhere: the multiplier of a probability).
at::Tensor attention_dropout_keep_cpu(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& samples,
                                      int64_t heads, int64_t row_start, int64_t row_end, const at::Tensor& cols,
                                      int64_t threshold, at::ScalarType dtype, double value) {
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
  TORCH_CHECK(dtype == at::kBool || dtype == at::kFloat || dtype == at::kDouble,
              "attention_dropout_keep: dtype must be bool, float32 or float64, got ", dtype);
  const auto samp = samples.contiguous();
  const auto cc = cols.contiguous();
  const int64_t S = samp.size(0), R = row_end - row_start, C = cc.size(0);
  auto keep = at::empty({S, heads, R, C}, at::TensorOptions().dtype(dtype));
  if (keep.numel() == 0) return keep;
  const uint64_t sd = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t off = static_cast<uint64_t>(offset.item<int64_t>());
  const int64_t* sp = samp.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const uint32_t thr = static_cast<uint32_t>(threshold);
  if (dtype == at::kBool) {
    fill_keep<bool>(keep.data_ptr<bool>(), true, sd, off, sp, cp, S, heads, row_start, R, C, thr);
  } else if (dtype == at::kFloat) {
    fill_keep<float>(keep.data_ptr<float>(), static_cast<float>(value), sd, off, sp, cp, S, heads, row_start, R, C,
                     thr);
  } else {
    fill_keep<double>(keep.data_ptr<double>(), value, sd, off, sp, cp, S, heads, row_start, R, C, thr);
  }
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(masklm_kernels, CPU, m) { m.impl("attention_dropout_keep", &attention_dropout_keep_cpu); }

}  // namespace mlk
