// SIMD Philox4x32-10 (see philox_simd.h). The version is chosen once, from the CPU's features, or
// forced with MASKLM_CPU_ISA=avx512|avx2|scalar (the tests run every version that way). Each 32-bit lane lives in a 64-bit vector lane so that one
// pmuludq gives the full 32x32->64 product. Upper halves are never cleared: pmuludq reads only the low
// 32 bits of its inputs and the final store truncates, so the garbage above never reaches a result.
// Per round and 8 lanes: 2 multiplies, 2 shifts, 2 three-way XORs. The compiler's auto-vectorisation
// of the scalar loop emulates a 64x64 multiply instead (3x the instructions; measured ~3x slower).
#include "philox_simd.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MLK_X86_SIMD 1
#endif

namespace mlk {
namespace {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
}

void philox_lanes_scalar(uint32_t (&c)[4][kPhiloxLanes], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kPhiloxLanes; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0][i];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2][i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1][i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3][i] ^ k1;
      c[0][i] = n0; c[1][i] = static_cast<uint32_t>(p1); c[2][i] = n2; c[3][i] = static_cast<uint32_t>(p0);
    }
    k0 += kW0;
    k1 += kW1;
  }
}

#if defined(MLK_X86_SIMD)
__attribute__((target("avx2")))
void philox_lanes_avx2(uint32_t (&c)[4][kPhiloxLanes], uint32_t k0, uint32_t k1) {
  constexpr int G = kPhiloxLanes / 4;  // groups of 4 lanes (one ymm of 64-bit lanes)
  __m256i x[4][G];
  for (int w = 0; w < 4; ++w)
    for (int g = 0; g < G; ++g)
      x[w][g] = _mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&c[w][4 * g])));
  const __m256i m0 = _mm256_set1_epi64x(kM0), m1 = _mm256_set1_epi64x(kM1);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
    for (int g = 0; g < G; ++g) {
      const __m256i p0 = _mm256_mul_epu32(x[0][g], m0), p1 = _mm256_mul_epu32(x[2][g], m1);
      x[0][g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x[1][g]), key0);
      x[2][g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x[3][g]), key1);
      x[1][g] = p1;
      x[3][g] = p0;
    }
    k0 += kW0;
    k1 += kW1;
  }
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int w = 0; w < 4; ++w)
    for (int g = 0; g < G; ++g)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&c[w][4 * g]),
                       _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x[w][g], low_halves)));
}

__attribute__((target("avx512f")))
void philox_lanes_avx512(uint32_t (&c)[4][kPhiloxLanes], uint32_t k0, uint32_t k1) {
  constexpr int G = kPhiloxLanes / 8;  // groups of 8 lanes (one zmm of 64-bit lanes)
  __m512i x[4][G];
  for (int w = 0; w < 4; ++w)
    for (int g = 0; g < G; ++g)
      x[w][g] = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(&c[w][8 * g])));
  const __m512i m0 = _mm512_set1_epi64(kM0), m1 = _mm512_set1_epi64(kM1);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
    for (int g = 0; g < G; ++g) {
      const __m512i p0 = _mm512_mul_epu32(x[0][g], m0), p1 = _mm512_mul_epu32(x[2][g], m1);
      x[0][g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x[1][g], key0, 0x96);  // a ^ b ^ c
      x[2][g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x[3][g], key1, 0x96);
      x[1][g] = p1;
      x[3][g] = p0;
    }
    k0 += kW0;
    k1 += kW1;
  }
  for (int w = 0; w < 4; ++w)
    for (int g = 0; g < G; ++g)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&c[w][8 * g]), _mm512_cvtepi64_epi32(x[w][g]));
}
#endif

namespace {
using LanesFn = void (*)(uint32_t (&)[4][kPhiloxLanes], uint32_t, uint32_t);

struct Isa {
  const char* name;
  LanesFn fn;
};

Isa pick_isa() {
  const char* forced = std::getenv("MASKLM_CPU_ISA");
  const auto wants = [&](const char* n) { return forced == nullptr || std::strcmp(forced, n) == 0; };
#if defined(MLK_X86_SIMD)
  __builtin_cpu_init();
  if (wants("avx512") && __builtin_cpu_supports("avx512f")) return {"avx512", philox_lanes_avx512};
  if (wants("avx2") && __builtin_cpu_supports("avx2")) return {"avx2", philox_lanes_avx2};
#endif
  return {"scalar", philox_lanes_scalar};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();  // thread-safe one-time initialisation
  return chosen;
}
}  // namespace

void philox_lanes(uint32_t (&c)[4][kPhiloxLanes], uint32_t k0, uint32_t k1) { isa().fn(c, k0, k1); }

const char* philox_lanes_isa() { return isa().name; }

}  // namespace mlk
