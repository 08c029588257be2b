// MASS fragment masking (Song et al., 2019), shared by the CPU loop (masking_cpu.cpp) and the CUDA
// kernels (masking_kernels.cu); specified in docs/MASKING.md ("MASS").
#pragma once
#include "masking_core.h"

namespace mlk {

template <typename id_t>
struct MassArgs {
  const id_t* ids;
  id_t* enc;
  id_t* dec;
  id_t* labels;
  int64_t* spans;               // (B, 2)
  int64_t B, S;
  const int64_t* lengths;       // (B,)
  const int64_t* special_ids;
  int64_t n_special;
  const int64_t* sample_ids;
  const int64_t* seed_ptr;
  const int64_t* step_ptr;
  uint64_t seed_val, step_val;
  int64_t ratio_fx;             // fragment_ratio quantised to 2^-24
  Replace rp;
  int64_t pad_token_id, ignore_index;
};

template <typename id_t>
MLK_HD RandKey mass_key(const MassArgs<id_t>& a, int64_t b) {
  return row_key(a.seed_ptr, a.seed_val, a.step_ptr, a.step_val, a.sample_ids, b);
}

template <typename id_t>
MLK_HD bool mass_eligible(const MassArgs<id_t>& a, const SpecialIds& special, int64_t b, int64_t len, int64_t s) {
  return s < len && !special.contains(static_cast<int64_t>(a.ids[b * a.S + s]));
}

// Chooses the fragment [start, end) of row b; writes spans[b]. Sequential O(S).
template <typename id_t>
MLK_HD void mass_fragment_row(const MassArgs<id_t>& a, int64_t b) {
  const SpecialIds special(a.special_ids, a.n_special);
  const int64_t len = row_length(a.lengths, b, a.S);
  int64_t n = 0, longest = 0, run = 0;
  for (int64_t s = 0; s < len; ++s) {
    if (mass_eligible(a, special, b, len, s)) { ++n; ++run; longest = run > longest ? run : longest; }
    else run = 0;
  }
  int64_t start = 0, m = 0;
  if (n > 0) {
    m = (a.ratio_fx * n + (int64_t(1) << (kFxBits - 1))) >> kFxBits;
    m = m < 1 ? 1 : m;
    m = m > longest ? longest : m;
    // Valid starts: s with s .. s+m-1 all eligible; runs of length r contribute r - m + 1 of them.
    int64_t V = 0;
    run = 0;
    for (int64_t s = 0; s <= len; ++s) {
      if (s < len && mass_eligible(a, special, b, len, s)) { ++run; continue; }
      if (run >= m) V += run - m + 1;
      run = 0;
    }
    const U32x4 r = draw(mass_key(a, b), kFragment, 0);
    int64_t idx = static_cast<int64_t>((static_cast<uint64_t>(r.v[0]) * static_cast<uint64_t>(V)) >> 32);
    run = 0;
    for (int64_t s = 0; s <= len; ++s) {
      if (s < len && mass_eligible(a, special, b, len, s)) { ++run; continue; }
      if (run >= m) {
        const int64_t cnt = run - m + 1;
        if (idx < cnt) { start = s - run + idx; break; }
        idx -= cnt;
      }
      run = 0;
    }
  }
  a.spans[2 * b] = start;
  a.spans[2 * b + 1] = start + m;
}

// Outputs of position s inside the fragment, from the first two words of its ACTION draw.
template <typename id_t>
MLK_HD void mass_emit_inside(const MassArgs<id_t>& a, int64_t b, int64_t s, uint32_t r0, uint32_t r1) {
  const int64_t i = b * a.S + s;
  const id_t orig = a.ids[i];
  a.enc[i] = static_cast<id_t>(replace_from_words(a.rp, r0, r1, static_cast<int64_t>(orig)));
  a.dec[i] = s > 0 ? a.ids[i - 1] : static_cast<id_t>(a.rp.mask_token_id);
  a.labels[i] = orig;
}

template <typename id_t>
MLK_HD void mass_emit(const MassArgs<id_t>& a, const RandKey& key, int64_t b, int64_t s, int64_t start, int64_t end) {
  if (s >= start && s < end) {
    const U32x4 r = draw(key, kAction, static_cast<uint32_t>(s));
    mass_emit_inside(a, b, s, r.v[0], r.v[1]);
    return;
  }
  const int64_t i = b * a.S + s;
  a.enc[i] = a.ids[i];
  a.dec[i] = static_cast<id_t>(a.pad_token_id);
  a.labels[i] = static_cast<id_t>(a.ignore_index);
}

}  // namespace mlk
