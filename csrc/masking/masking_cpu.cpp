// CPU implementation of the masking ops: the shared per-token / per-row logic of masking_core.h,
// parallel over rows with OpenMP.
#include <vector>

#include "masking_launch.h"

namespace mlk {

template <typename id_t>
void mask_tokens_cpu(const MaskArgs<id_t>& a) {
#pragma omp parallel
  {
    std::vector<uint8_t> sel(a.mode == kBernoulli ? 0 : a.S);
    std::vector<int64_t> scratch(a.mode == kBernoulli ? 0 : a.S);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.B; ++b) {
      const Row<id_t> row(a, b);
      if (a.mode == kBernoulli) {
        for (int64_t s0 = 0; s0 < a.S; s0 += 4) bernoulli_quad(row, s0);
        continue;
      }
      if (a.mode == kExact)
        select_exact_row(row, sel.data(), scratch.data());
      else
        select_span_row(row, sel.data(), scratch.data());
      for (int64_t s = 0; s < a.S; ++s) row.emit(s, sel[s] != 0);
    }
  }
}

template <typename id_t>
void mass_mask_cpu(const MassArgs<id_t>& a) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < a.B; ++b) {
    mass_fragment_row(a, b);
    const RandKey key = mass_key(a, b);
    for (int64_t s = 0; s < a.S; ++s) mass_emit(a, key, b, s, a.spans[2 * b], a.spans[2 * b + 1]);
  }
}

template void mask_tokens_cpu<int64_t>(const MaskArgs<int64_t>&);
template void mask_tokens_cpu<int32_t>(const MaskArgs<int32_t>&);
template void mass_mask_cpu<int64_t>(const MassArgs<int64_t>&);
template void mass_mask_cpu<int32_t>(const MassArgs<int32_t>&);

}  // namespace mlk
