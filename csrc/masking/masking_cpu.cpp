// CPU implementation of the masking ops: the shared per-token / per-row logic of masking_core.h,
// parallel over rows with at::parallel_for (torch's OpenMP pool: it honours torch.set_num_threads and
// does not start a second OpenMP runtime beside torch's bundled one).
#include <ATen/Parallel.h>

#include <vector>

#include "masking_launch.h"

namespace mlk {
namespace {

constexpr int kLanes = 16;  // Philox calls computed together: 16 selection draws = 64 tokens

// Philox4x32-10 over kLanes counters at once (structure of arrays), so that the compiler vectorises
// the 32x32->64 multiplies (pmuludq / vpmuludq). Same arithmetic as philox4x32_10 in philox.h; the
// reference-equality tests prove the two agree.
__attribute__((target_clones("avx2", "default")))
void philox_lanes(uint32_t* __restrict c0, uint32_t* __restrict c1, uint32_t* __restrict c2,
                  uint32_t* __restrict c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kLanes; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c0[i] = n0; c1[i] = static_cast<uint32_t>(p1); c2[i] = n2; c3[i] = static_cast<uint32_t>(p0);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Token-unit Bernoulli for one row, 64 tokens per block: the same decisions as bernoulli_quad
// (masking_core.h), with the selection draws of a block computed in one vectorised Philox batch.
// Measured on a 2-core x86 CPU (B=32, S=512): ~2x faster than the scalar loop.
template <typename id_t>
void bernoulli_tokens_row(const Row<id_t>& row) {
  const int64_t S = row.S;
  const uint32_t base = static_cast<uint32_t>(kSelect) << kPosBits;
  for (int64_t s0 = 0; s0 < S; s0 += 4 * kLanes) {
    const int64_t s1 = s0 + 4 * kLanes < S ? s0 + 4 * kLanes : S;
    if (s0 >= row.len) {  // padding: nothing selected, no Philox call
      for (int64_t s = s0; s < s1; ++s) row.emit(s, false);
      continue;
    }
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      c0[i] = base | static_cast<uint32_t>((s0 >> 2) + i);
      c1[i] = row.key.step; c2[i] = row.key.s_lo; c3[i] = row.key.s_hi;
    }
    philox_lanes(c0, c1, c2, c3, row.key.k0, row.key.k1);
    for (int64_t s = s0; s < s1; ++s) {
      const int i = static_cast<int>((s - s0) >> 2), j = static_cast<int>(s & 3);
      const uint32_t u = j == 0 ? c0[i] : (j == 1 ? c1[i] : (j == 2 ? c2[i] : c3[i]));
      row.emit(s, row.eligible(s) && bernoulli(u, row.rate(s)));
    }
  }
}

}  // namespace

// Rows per parallel task: a row of a few hundred tokens costs ~1-5 us, so batches of rows amortise the
// task overhead while B >= 32 still splits over the threads.
constexpr int64_t kRowGrain = 4;

template <typename id_t>
void mask_tokens_cpu(const MaskArgs<id_t>& a) {
  at::parallel_for(0, a.B, kRowGrain, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> sel(a.mode == kBernoulli ? 0 : a.S);
    std::vector<int64_t> scratch(a.mode == kBernoulli ? 0 : a.S);
    for (int64_t b = b0; b < b1; ++b) {
      const Row<id_t> row(a, b);
      if (a.mode == kBernoulli) {
        if (a.word_ids)
          for (int64_t s0 = 0; s0 < a.S; s0 += 4) bernoulli_quad(row, s0);
        else
          bernoulli_tokens_row(row);
        continue;
      }
      if (a.mode == kExact)
        select_exact_row(row, sel.data(), scratch.data());
      else
        select_span_row(row, sel.data(), scratch.data());
      for (int64_t s = 0; s < a.S; ++s) row.emit(s, sel[s] != 0);
    }
  });
}

template <typename id_t>
void mass_mask_cpu(const MassArgs<id_t>& a) {
  at::parallel_for(0, a.B, kRowGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      mass_fragment_row(a, b);
      const RandKey key = mass_key(a, b);
      for (int64_t s = 0; s < a.S; ++s) mass_emit(a, key, b, s, a.spans[2 * b], a.spans[2 * b + 1]);
    }
  });
}

template void mask_tokens_cpu<int64_t>(const MaskArgs<int64_t>&);
template void mask_tokens_cpu<int32_t>(const MaskArgs<int32_t>&);
template void mass_mask_cpu<int64_t>(const MassArgs<int64_t>&);
template void mass_mask_cpu<int32_t>(const MassArgs<int32_t>&);

}  // namespace mlk
