// BART text infilling (Lewis et al., 2020; fairseq's DenoisingDataset with mask_length="span-poisson"),
// one row at a time, shared by the CPU loop (masking_cpu.cpp) and the CUDA kernel (masking_kernels.cu,
// one thread per row). Specified in docs/MASKING.md ("BART text infilling"); the NumPy reference
// (masklm_kernels/masking/reference.py) implements the same steps. Integer arithmetic only, plus the
// exactly rounded product m * mask_ratio (then its ceiling).
#pragma once
#include "masking_core.h"

namespace mlk {

constexpr uint32_t kBartLength = 7;   // r[0] of draw t: the t-th span length (Poisson by inverse CDF)
constexpr uint32_t kBartStart = 8;    // word g & 3 of draw g >> 2: selection of span starts (interior g)
constexpr uint32_t kBartRotate = 9;   // r[0] of draw 0: which start takes the first length
constexpr uint32_t kBartToken = 10;   // r[0], r[1] of draw s: mask / random id of replaced source token s
constexpr uint32_t kBartSlot = 11;    // word g & 3 of draw g >> 2: selection of insertion slots
constexpr uint32_t kBartInsert = 12;  // r[0], r[1] of draw i: mask / random id of inserted token i
constexpr int kMaxPoisson = 64;       // capacity of the Poisson CDF table

template <typename id_t>
struct BartArgs {
  const id_t* ids;
  id_t* out;                    // (B, width): the corrupted row, then pad
  int64_t* out_len;             // (B,)
  id_t* dec;                    // (B, S): decoder_start then the row shifted right, then pad
  id_t* labels;                 // (B, S): the row, then ignore_index
  int64_t* label_len;           // (B,)
  int64_t B, S, width;
  const int64_t* lengths;       // (B,) or null
  const int64_t* sample_ids;
  const int64_t* seed_ptr;
  const int64_t* step_ptr;
  uint64_t seed_val, step_val;
  double mask_ratio;
  int n_cdf;
  uint32_t cdf[kMaxPoisson];    // Poisson thresholds floor(P(L <= k) * 2^32), k = 0 .. n_cdf - 1
  int replace_length;           // -1: every masked token replaced; 0: all deleted; 1: one per span
  Replace rp;                   // t_mask = 2^32 - random threshold: mask_token_id or a random id
  int64_t pad, decoder_start, ignore_index;
};

// ceil(m * ratio) for m >= 0: the correctly rounded double product, then its ceiling.
MLK_HD int64_t bart_budget(int64_t m, double ratio) {
  const double x = static_cast<double>(m) * ratio;
  int64_t k = static_cast<int64_t>(x);
  return static_cast<double>(k) < x ? k + 1 : k;
}

// Selection sampling (Knuth's Algorithm S): `needed` of `items` candidates, in order; the g-th is taken
// iff (u_g * remaining) >> 32 < needed, u_g the word g & 3 of draw g >> 2 of `domain`.
struct Chooser {
  RandKey key;
  uint32_t domain;
  int64_t items, needed, g;
  U32x4 r;

  MLK_HD Chooser(const RandKey& k, uint32_t d, int64_t n_items, int64_t n_needed)
      : key(k), domain(d), items(n_items), needed(n_needed), g(0), r() {}

  MLK_HD bool next() {  // decides candidate g, then moves on
    if ((g & 3) == 0) r = draw(key, domain, static_cast<uint32_t>(g >> 2));
    const uint64_t remaining = static_cast<uint64_t>(items - g);
    const bool take = needed > 0 &&
        static_cast<int64_t>((static_cast<uint64_t>(word_of(r, g & 3)) * remaining) >> 32) < needed;
    ++g;
    needed -= take ? 1 : 0;
    return take;
  }
};

// The span lengths of a row: Poisson draws until their sum reaches the budget k, the last trimmed to it;
// zero lengths are insertions. Writes the positive lengths (in draw order) to `len` (capacity k) and
// returns their count; *inserts = the zero lengths, at most k (fairseq's count exceeds the budget only for
// small lambda, where zero lengths outnumber the others). A guard of 4k + 64 draws ends the loop (the last
// draw then takes the rest of the budget): reached only when P(L = 0) is near 1.
template <typename id_t>
MLK_HD int64_t bart_lengths(const BartArgs<id_t>& a, const RandKey& key, int64_t k, int32_t* len, int64_t* inserts) {
  int64_t sum = 0, count = 0, zeros = 0;
  const int64_t cap = 4 * k + 64;
  for (int64_t t = 0; sum < k; ++t) {
    const uint32_t u = draw(key, kBartLength, static_cast<uint32_t>(t)).v[0];
    int64_t L = 0;
    for (int i = 0; i < a.n_cdf; ++i) L += a.cdf[i] <= u ? 1 : 0;
    if (sum + L > k || t == cap - 1) L = k - sum;
    sum += L;
    if (L > 0) len[count++] = static_cast<int32_t>(L); else ++zeros;
  }
  *inserts = zeros < k ? zeros : k;  // at most the budget: bounds the output (S + k) whatever lambda
  return count;
}

// The row's source tokens after spans are applied, in order: calls emit(token) for every kept or
// replaced token. `spans` positive lengths `len`, rotated by `rot`, at the starts chosen among the
// interior positions 1 .. n - 2. A start inside an earlier span's extent is covered like any other
// token; extents stop before the last token.
template <typename F, typename T> MLK_HD void bart_emit(F& f, T t) { f(t); }
template <typename F, typename T> MLK_HD void bart_emit(F* f, T t) { (*f)(t); }

template <typename id_t, typename Emit>
MLK_HD void bart_sweep(const BartArgs<id_t>& a, const RandKey& key, const id_t* row, int64_t n, const int32_t* len,
                       int64_t spans, int64_t rot, Emit emit) {
  Chooser starts(key, kBartStart, n - 2, spans);
  int64_t reach = 0, j = 0;  // reach: the end of the furthest extent so far
  for (int64_t s = 0; s < n; ++s) {
    const bool start = s >= 1 && s <= n - 2 && starts.next();
    const bool covered = reach > s;  // inside an earlier span's extent
    if (start) {
      const int64_t end = s + len[(j + rot) % spans];
      reach = end > reach ? (end < n - 1 ? end : n - 1) : reach;
      ++j;
    }
    if (!start && !covered) { bart_emit(emit, row[s]); continue; }
    const bool head = start && !covered;
    if (a.replace_length == -1 || (a.replace_length == 1 && head)) {
      const U32x4 r = draw(key, kBartToken, static_cast<uint32_t>(s));
      bart_emit(emit, static_cast<id_t>(replace_from_words(a.rp, r.v[0], r.v[1], static_cast<int64_t>(row[s]))));
    }
  }
}

template <typename id_t>
struct BartCount {  // pass 1: counts the tokens the sweep emits
  int64_t* r;
  MLK_HD void operator()(id_t) const { ++*r; }
};

template <typename id_t>
struct BartWrite {  // pass 2: writes them, with the insertions at their slots
  id_t* out;
  int64_t o, i, r, inserts;
  Chooser slots;
  RandKey key;
  const Replace* rp;
  MLK_HD void operator()(id_t t) {
    while (o >= 1 && i < inserts && o <= r + inserts - 2 && slots.next()) {
      const U32x4 d = draw(key, kBartInsert, static_cast<uint32_t>(i++));
      out[o++] = static_cast<id_t>(replace_from_words(*rp, d.v[0], d.v[1], rp->mask_token_id));
    }
    out[o++] = t;
  }
};

template <typename id_t>
MLK_HD void bart_row(const BartArgs<id_t>& a, int64_t b, int32_t* len_ws) {
  const RandKey key = row_key(a.seed_ptr, a.seed_val, a.step_ptr, a.step_val, a.sample_ids, b);
  const int64_t n = row_length(a.lengths, b, a.S);
  const id_t* row = a.ids + b * a.S;
  id_t* out = a.out + b * a.width;
  const int64_t k = n >= 3 ? bart_budget(n - 2, a.mask_ratio) : 0;
  int64_t spans = 0, inserts = 0, rot = 0;
  if (k > 0) {
    spans = bart_lengths(a, key, k, len_ws, &inserts);
    rot = spans > 0 ? static_cast<int64_t>((static_cast<uint64_t>(draw(key, kBartRotate, 0).v[0]) *
                                            static_cast<uint64_t>(spans)) >> 32) : 0;
  }
  // pass 1: the length r after deletions; pass 2: write, inserting `inserts` tokens at slots chosen
  // among the final positions 1 .. r + inserts - 2 (never first nor last)
  int64_t r = 0;
  bart_sweep(a, key, row, n, len_ws, spans, rot, BartCount<id_t>{&r});
  BartWrite<id_t> put{out, 0, 0, r, inserts, Chooser(key, kBartSlot, r + inserts - 2, inserts), key, &a.rp};
  bart_sweep(a, key, row, n, len_ws, spans, rot, &put);
  const int64_t o = put.o;
  a.out_len[b] = o;
  for (int64_t x = o; x < a.width; ++x) out[x] = static_cast<id_t>(a.pad);
  id_t* lab = a.labels + b * a.S;
  id_t* dec = a.dec + b * a.S;
  for (int64_t s = 0; s < a.S; ++s) {
    lab[s] = s < n ? row[s] : static_cast<id_t>(a.ignore_index);
    dec[s] = s == 0 ? (n > 0 ? static_cast<id_t>(a.decoder_start) : static_cast<id_t>(a.pad))
                    : (s < n ? row[s - 1] : static_cast<id_t>(a.pad));
  }
  a.label_len[b] = n;
}

}  // namespace mlk
