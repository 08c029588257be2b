// T5 span corruption (Raffel et al., 2020; T5's `random_spans_noise_mask`), one row at a time, shared by
// the CPU loop (masking_cpu.cpp) and the CUDA kernel (masking_kernels.cu, one thread per row). The
// algorithm is specified in docs/MASKING.md ("T5 span corruption"); the NumPy reference
// (masklm_kernels/masking/reference.py) implements the same steps. Integer arithmetic, plus two exactly
// rounded double operations (n * density, min / mean) rounded half to even as NumPy's np.round.
#pragma once
#include "masking_core.h"

namespace mlk {

constexpr uint32_t kT5Noise = 5;     // Philox domain of the noise tokens' segmentation
constexpr uint32_t kT5Nonnoise = 6;  // ... and of the non-noise tokens'

template <typename id_t>
struct T5Args {
  const id_t* ids;
  id_t* enc;                    // (B, enc_width): kept tokens and sentinels, then EOS, then pad
  int64_t* enc_len;             // (B,)
  id_t* dec;                    // (B, dec_width): decoder inputs (labels shifted right)
  id_t* labels;                 // (B, dec_width): sentinels and noise spans, then EOS, then ignore_index
  int64_t* dec_len;             // (B,)
  int64_t B, S, enc_width, dec_width;
  const int64_t* lengths;       // (B,) or null (every row full)
  const int64_t* sample_ids;
  const int64_t* seed_ptr;
  const int64_t* step_ptr;
  uint64_t seed_val, step_val;
  double density, mean_span;
  int64_t sentinel_start, eos, pad, decoder_start, ignore_index;
};

// x >= 0 rounded half to even (NumPy's np.round): floor by truncation, ties to the even neighbour.
MLK_HD int64_t round_half_even(double x) {
  const int64_t f = static_cast<int64_t>(x);
  const double d = x - static_cast<double>(f);  // exact for x < 2^52
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return (f & 1) ? f + 1 : f;
}

// T5's counts for a row of n tokens: noise tokens and noise spans (0, 0 for n < 2: nothing to corrupt).
MLK_HD void t5_counts(int64_t n, double density, double mean_span, int64_t* noise, int64_t* spans) {
  if (n < 2) { *noise = 0; *spans = 0; return; }
  int64_t k = round_half_even(static_cast<double>(n) * density);
  k = k < 1 ? 1 : (k > n - 1 ? n - 1 : k);
  const int64_t other = n - k;
  int64_t m = round_half_even(static_cast<double>(k < other ? k : other) / mean_span);
  *noise = k;
  *spans = m < 1 ? 1 : m;
}

// T5's `_random_segmentation(items, segments)`: segments - 1 of the items - 1 gaps between consecutive
// items, a uniformly random subset, start new segments. Drawn by selection sampling (Knuth, TAOCP 3.4.2,
// Algorithm S): gap g is taken iff (u_g * remaining) >> 32 < needed, u_g the word g & 3 of the draw at
// index g >> 2 of `domain`, which takes exactly `needed` gaps. `next()` returns the next segment's length.
struct Segmenter {
  RandKey key;
  uint32_t domain;
  int64_t items, needed, gap;  // gap: the next gap to decide (between items gap and gap + 1)
  U32x4 r;

  MLK_HD Segmenter(const RandKey& k, uint32_t d, int64_t n_items, int64_t segments)
      : key(k), domain(d), items(n_items), needed(segments - 1), gap(0), r() {}

  MLK_HD int64_t next() {
    int64_t len = 1;
    while (gap < items - 1) {
      if ((gap & 3) == 0) r = draw(key, domain, static_cast<uint32_t>(gap >> 2));
      const uint64_t remaining = static_cast<uint64_t>(items - 1 - gap);
      const bool take = needed > 0 &&
          static_cast<int64_t>((static_cast<uint64_t>(word_of(r, gap & 3)) * remaining) >> 32) < needed;
      ++gap;
      if (take) { --needed; return len; }
      ++len;
    }
    return len;
  }
};

template <typename id_t>
MLK_HD void t5_row(const T5Args<id_t>& a, int64_t b) {
  const RandKey key = row_key(a.seed_ptr, a.seed_val, a.step_ptr, a.step_val, a.sample_ids, b);
  const int64_t n = row_length(a.lengths, b, a.S);
  int64_t noise = 0, spans = 0;
  t5_counts(n, a.density, a.mean_span, &noise, &spans);
  const id_t* ids = a.ids + b * a.S;
  id_t* enc = a.enc + b * a.enc_width;
  id_t* lab = a.labels + b * a.dec_width;
  id_t* dec = a.dec + b * a.dec_width;
  int64_t e = 0, l = 0, s = 0;
  if (spans == 0) {
    for (; s < n; ++s) enc[e++] = ids[s];
  } else {
    // T5 interleaves non-noise and noise segments, non-noise first: the row never starts with noise
    Segmenter keep(key, kT5Nonnoise, n - noise, spans), drop(key, kT5Noise, noise, spans);
    for (int64_t k = 0; k < spans; ++k) {
      for (int64_t i = keep.next(); i > 0; --i) enc[e++] = ids[s++];
      const id_t sentinel = static_cast<id_t>(a.sentinel_start - k);  // <extra_id_k>: decreasing ids
      enc[e++] = sentinel;
      lab[l++] = sentinel;
      for (int64_t i = drop.next(); i > 0; --i) lab[l++] = ids[s++];
    }
  }
  enc[e++] = static_cast<id_t>(a.eos);
  lab[l++] = static_cast<id_t>(a.eos);
  a.enc_len[b] = e;
  a.dec_len[b] = l;
  for (int64_t i = e; i < a.enc_width; ++i) enc[i] = static_cast<id_t>(a.pad);
  dec[0] = static_cast<id_t>(a.decoder_start);
  for (int64_t i = 1; i < l; ++i) dec[i] = lab[i - 1];
  for (int64_t i = l; i < a.dec_width; ++i) {
    dec[i] = static_cast<id_t>(a.pad);
    lab[i] = static_cast<id_t>(a.ignore_index);
  }
}

}  // namespace mlk
