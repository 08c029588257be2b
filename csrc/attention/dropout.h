// Attention-probability dropout: which (batch row, head, query, key) pairs are kept. A pure function of
// (seed, offset, sample key, head, query, key), integer arithmetic only, so the Triton kernels
// (masklm_kernels/attention/triton_common.py), the C++ CPU backend and the NumPy specification
// (masklm_kernels/attention/reference.py) keep the same pairs bit for bit. Two Philox4x32-10 levels:
//   key(b, h)  = words 0, 1 of Philox(counter (h | kDropoutDomain << 24, offset, sample lo, sample hi),
//                                     key (seed lo, seed hi))
//   keep(i, j) = word j mod 4 of Philox(counter (j div 4, i, 0, 0), key(b, h)) >= threshold
//                (threshold = floor(p 2^32))
// The first level is the masking ops' counter layout under a domain of its own (their streams never meet);
// the second gives every pair of a 2^32 x 2^32 plane its own random word, four neighbouring keys sharing
// one draw (as FlashAttention's dropout uses all four words of a Philox call).
#pragma once
#include "../common/hd.h"
#include "../masking/philox.h"

namespace mlk {

constexpr uint32_t kDropoutDomain = 16;  // masklm_kernels.attention.inputs.DROPOUT_DOMAIN

struct DropoutKey {
  uint32_t k0, k1;
};

MLK_HD DropoutKey dropout_key(uint64_t seed, uint64_t offset, uint64_t sample, uint32_t head) {
  const U32x4 r = philox4x32_10(head | (kDropoutDomain << 24), static_cast<uint32_t>(offset),
                                static_cast<uint32_t>(sample), static_cast<uint32_t>(sample >> 32),
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return DropoutKey{r.v[0], r.v[1]};
}

MLK_HD bool dropout_keep(const DropoutKey& key, uint32_t i, uint32_t j, uint32_t threshold) {
  return word_of(philox4x32_10(j >> 2, i, 0u, 0u, key.k0, key.k1), j & 3) >= threshold;
}

}  // namespace mlk
