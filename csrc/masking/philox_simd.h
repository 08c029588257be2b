// Philox4x32-10 over kPhiloxLanes counters at once, for the CPU backend. Same arithmetic as
// philox4x32_10 in philox.h (the reference-equality tests prove they agree); one version per x86 ISA
// (AVX-512, AVX2, portable scalar), chosen once at first use.
#pragma once
#include <cstdint>

namespace mlk {

constexpr int kPhiloxLanes = 16;

// c[w][i]: word w of lane i, counter in, random words out.
void philox_lanes(uint32_t (&c)[4][kPhiloxLanes], uint32_t k0, uint32_t k1);

// The version in use: "avx512", "avx2" or "scalar" (MASKLM_CPU_ISA forces a lower one).
const char* philox_lanes_isa();

}  // namespace mlk
