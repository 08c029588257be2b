// Per-token and per-row masking logic shared by the CUDA kernels (masking_kernels.cu) and the C++ CPU
// implementation (masking_cpu.cpp). The algorithm is specified in docs/MASKING.md; the NumPy
// reference (masklm_kernels/masking/reference.py) implements the same steps, and the three must
// agree bit for bit, so everything here is integer arithmetic or exactly rounded IEEE double
// operations (FMA contraction is disabled at compile time, see setup.py).
#pragma once
#include "../common/hd.h"
#include "philox.h"

namespace mlk {

enum Domain : uint32_t { kSelect = 0, kAction = 1, kKey = 2, kSpan = 3, kFragment = 4 };
enum Mode : int { kBernoulli = 0, kExact = 1, kSpanMode = 2 };
constexpr int kPosBits = 24;             // positions < 2^24; the domain lives in the top byte
constexpr int kMaxSpanLen = 64;          // capacity of the span-length CDF table
constexpr int kFxBits = 24;              // rates quantised to 2^-24 for budgets (docs/MASKING.md)

struct RandKey {
  uint32_t k0, k1, step, s_lo, s_hi;
};

MLK_HD RandKey make_key(uint64_t seed, uint64_t step, uint64_t sample) {
  RandKey k;
  k.k0 = static_cast<uint32_t>(seed);
  k.k1 = static_cast<uint32_t>(seed >> 32);
  k.step = static_cast<uint32_t>(step);
  k.s_lo = static_cast<uint32_t>(sample);
  k.s_hi = static_cast<uint32_t>(sample >> 32);
  return k;
}

// Row b's key from an op's seed and step (device scalars when the pointers are set, else host values)
// and its sample ids (default: the row index).
MLK_HD RandKey row_key(const int64_t* seed_ptr, uint64_t seed_val, const int64_t* step_ptr, uint64_t step_val,
                       const int64_t* sample_ids, int64_t b) {
  const uint64_t seed = seed_ptr ? static_cast<uint64_t>(*seed_ptr) : seed_val;
  const uint64_t step = step_ptr ? static_cast<uint64_t>(*step_ptr) : step_val;
  return make_key(seed, step, sample_ids ? static_cast<uint64_t>(sample_ids[b]) : static_cast<uint64_t>(b));
}

// Row b's valid length: lengths[b] clamped to [0, S] (unchecked device values cannot index past the row);
// S without lengths.
MLK_HD int64_t row_length(const int64_t* lengths, int64_t b, int64_t S) {
  const int64_t n = lengths ? lengths[b] : S;
  return n < 0 ? 0 : (n > S ? S : n);
}

MLK_HD U32x4 draw(const RandKey& k, uint32_t domain, uint32_t index) {
  return philox4x32_10(index | (domain << kPosBits), k.step, k.s_lo, k.s_hi, k.k0, k.k1);
}

// Selection word of token s: one Philox call serves four consecutive tokens (4x fewer calls on the
// hot path; measured ~2.5x faster CPU token mode than one call per token).
MLK_HD uint32_t select_word(const RandKey& k, int64_t s) {
  return word_of(draw(k, kSelect, static_cast<uint32_t>(s >> 2)), s & 3);
}

MLK_HD uint32_t key_word(const RandKey& k, int64_t s) {
  return word_of(draw(k, kKey, static_cast<uint32_t>(s >> 2)), s & 3);
}

// Bernoulli(rate) from a 32-bit word: exact in double (u * 2^-32 and rate * 2^32 are exact scalings).
MLK_HD bool bernoulli(uint32_t u, float rate) {
  return static_cast<double>(u) < static_cast<double>(rate) * 4294967296.0;
}

MLK_HD int64_t rate_fx(float rate) {
  double r = static_cast<double>(rate);
  r = r > 1.0 ? 1.0 : (r > 0.0 ? r : 0.0);  // also maps NaN to 0
  return static_cast<int64_t>(r * 16777216.0 + 0.5);
}

MLK_HD int64_t budget_from_fx(int64_t sum_fx) {
  int64_t k = (sum_fx + (int64_t(1) << (kFxBits - 1))) >> kFxBits;
  return (k == 0 && sum_fx > 0) ? 1 : k;
}

// -log((u + 0.5) / 2^32) with basic IEEE operations only (no libm), so that CPU, GPU and NumPy agree.
MLK_HD double neglog_unit(uint32_t u) {
  double x = (static_cast<double>(u) + 0.5) * (1.0 / 4294967296.0);
  // frexp by hand: x in (0, 1) -> m in [0.5, 1), x = m * 2^e. Exact (power-of-two scalings).
  int e = 0;
  while (x < 0.5) { x *= 2.0; --e; }
  const double s = (x - 1.0) / (x + 1.0);
  const double s2 = s * s;
  double poly = 1.0 / 17.0;
  poly = poly * s2 + 1.0 / 15.0;
  poly = poly * s2 + 1.0 / 13.0;
  poly = poly * s2 + 1.0 / 11.0;
  poly = poly * s2 + 1.0 / 9.0;
  poly = poly * s2 + 1.0 / 7.0;
  poly = poly * s2 + 1.0 / 5.0;
  poly = poly * s2 + 1.0 / 3.0;
  poly = poly * s2 + 1.0;
  const double log_m = 2.0 * s * poly;
  return -(static_cast<double>(e) * 0.6931471805599453 + log_m);
}

MLK_HD uint32_t float_bits(float f) {
  union { float f; uint32_t u; } c;
  c.f = f;
  return c.u;
}

// 80/10/10 decision for a selected token (docs/MASKING.md, "Replacement").
struct Replace {
  uint64_t t_mask, t_rand;  // thresholds in [0, 2^32]
  int64_t mask_token_id, rand_lo, rand_range;
};

// From the first two words of the token's ACTION draw: r0 picks the action, r1 the random id.
MLK_HD int64_t replace_from_words(const Replace& rp, uint32_t r0, uint32_t r1, int64_t original) {
  const uint64_t a = r0;
  if (a < rp.t_mask) return rp.mask_token_id;
  if (a < rp.t_rand) return rp.rand_lo + static_cast<int64_t>((static_cast<uint64_t>(r1) * static_cast<uint64_t>(rp.rand_range)) >> 32);
  return original;
}

MLK_HD int64_t replace_token(const Replace& rp, const RandKey& k, int64_t s, int64_t original) {
  const U32x4 r = draw(k, kAction, static_cast<uint32_t>(s));
  return replace_from_words(rp, r.v[0], r.v[1], original);
}

// The special-id list with a range prefilter: special ids are a handful of small ids (BERT: 0 and
// 100-103), so one unsigned range test rejects almost every token before the list is scanned.
struct SpecialIds {
  const int64_t* ids;
  int64_t n;
  uint64_t lo, span;  // every listed id is in [lo, lo + span]

  MLK_HD SpecialIds(const int64_t* list, int64_t count) : ids(list), n(count) {
    int64_t l = n ? ids[0] : 0, h = l;
    for (int64_t j = 1; j < n; ++j) {
      l = ids[j] < l ? ids[j] : l;
      h = ids[j] > h ? ids[j] : h;
    }
    lo = static_cast<uint64_t>(l);
    span = static_cast<uint64_t>(h) - static_cast<uint64_t>(l);
  }

  MLK_HD bool contains(int64_t id) const {
    if (n == 0 || static_cast<uint64_t>(id) - lo > span) return false;
    for (int64_t j = 0; j < n; ++j)
      if (ids[j] == id) return true;
    return false;
  }
};

// Everything a row needs to decide eligibility and rates. Pointers are row-independent bases.
template <typename id_t>
struct MaskArgs {
  const id_t* ids;              // (B, S)
  id_t* out_ids;                // (B, S)
  id_t* labels;                 // (B, S)
  int64_t B, S;
  const int64_t* lengths;       // (B,) or null
  const uint8_t* attn;          // (B, S) or null
  const uint8_t* special_mask;  // (B, S) or null
  const int64_t* special_ids;   // (n_special,)
  int64_t n_special;
  const int64_t* word_ids;      // (B, S) or null
  const float* rates;           // null: rate_scalar for every token
  float rate_scalar;
  int64_t rate_sb, rate_ss;     // strides of rates in (b, s)
  const int64_t* sample_ids;    // (B,) or null (sample key = row index)
  const int64_t* seed_ptr;      // device/host scalar, or null: seed_val
  const int64_t* step_ptr;
  uint64_t seed_val, step_val;
  Replace rp;
  int64_t ignore_index;
  int mode;
  int span_ncdf;                // number of CDF thresholds (max span length - 1)
  uint32_t span_cdf[kMaxSpanLen];
  uint8_t* sel_ws;              // (B, S) selection flags for exact/span modes
  int64_t* key_ws;              // (B, S) heap / unit list scratch for exact/span modes
};

// One row's view of MaskArgs. Fields are copied (pointers pre-offset to the row) rather than read
// through a reference: stores to the int64 outputs could otherwise alias the int64 fields of MaskArgs,
// forcing a reload of every field per token (measured 2x slower CPU token mode).
template <typename id_t>
struct Row {
  const id_t* ids;
  id_t* out;
  id_t* lab;
  int64_t S, len;  // len: effective length bound (S when attention_mask is used)
  const uint8_t* attn;
  const uint8_t* smask;
  const int64_t* words;
  SpecialIds special;
  const float* rates;  // row-offset, or null: rate_scalar
  float rate_scalar;
  int64_t rate_ss;
  bool weighted;       // per-token rates: exact mode samples proportionally to them
  Replace rp;
  id_t ignore;
  const uint32_t* span_cdf;
  int span_ncdf;
  RandKey key;

  MLK_HD Row(const MaskArgs<id_t>& a, int64_t b) : special(a.special_ids, a.n_special) {
    const int64_t o = b * a.S;
    ids = a.ids + o; out = a.out_ids + o; lab = a.labels + o;
    S = a.S;
    len = row_length(a.lengths, b, a.S);
    attn = a.attn ? a.attn + o : nullptr;
    smask = a.special_mask ? a.special_mask + o : nullptr;
    words = a.word_ids ? a.word_ids + o : nullptr;
    rates = a.rates ? a.rates + b * a.rate_sb : nullptr;
    rate_scalar = a.rate_scalar; rate_ss = a.rate_ss;
    weighted = a.rates != nullptr && a.rate_ss != 0;
    rp = a.rp;
    ignore = static_cast<id_t>(a.ignore_index);
    span_cdf = a.span_cdf; span_ncdf = a.span_ncdf;
    key = row_key(a.seed_ptr, a.seed_val, a.step_ptr, a.step_val, a.sample_ids, b);
  }

  MLK_HD bool eligible(int64_t s) const {
    if (s >= len) return false;
    if (attn && attn[s] == 0) return false;
    if (smask && smask[s] != 0) return false;
    if (words && words[s] < 0) return false;
    return !special.contains(static_cast<int64_t>(ids[s]));
  }

  MLK_HD float rate(int64_t s) const { return rates ? rates[s * rate_ss] : rate_scalar; }

  MLK_HD bool same_word(int64_t s0, int64_t s1) const { return words[s0] == words[s1]; }

  MLK_HD int64_t unit_start(int64_t s) const {
    if (words)
      while (s > 0 && eligible(s - 1) && same_word(s - 1, s)) --s;
    return s;
  }

  MLK_HD int64_t unit_end(int64_t f) const {
    int64_t e = f + 1;
    if (words)
      while (e < S && eligible(e) && same_word(f, e)) ++e;
    return e;
  }

  // Write one token's outputs given whether it is selected.
  MLK_HD void emit(int64_t s, bool selected) const {
    const id_t orig = ids[s];
    out[s] = selected ? static_cast<id_t>(replace_token(rp, key, s, static_cast<int64_t>(orig))) : orig;
    lab[s] = selected ? orig : ignore;
  }

  MLK_HD void mark(uint8_t* sel, int64_t f, int64_t* remaining) const {
    const int64_t e = unit_end(f);
    for (int64_t s = f; s < e; ++s) sel[s] = 1;
    *remaining -= e - f;
  }
};

// One pass over a row (docs/MASKING.md, "Units" and "Budget"): writes the first token of every unit
// (a maximal run of consecutive eligible tokens sharing a word id; a single token without word_ids)
// to `starts`, and returns their number and the row's budget round(sum of eligible rates).
struct UnitScan {
  int64_t n, budget;
};

template <typename id_t>
MLK_HD UnitScan scan_units(const Row<id_t>& row_ref, int64_t* starts) {
  const Row<id_t> row = row_ref;  // a local copy: stores to `starts` cannot alias its int64 fields
  int64_t n = 0, n_eligible = 0, sum_fx = 0;
  if (!row.words && !row.rates && !row.attn && !row.smask) {
    // Common case (lengths + special ids, one rate): units are the eligible tokens, compacted without
    // branches. Measured on x86 (B=32, S=512): span mode 72 -> 55 us per batch on one thread.
    for (int64_t s = 0; s < row.len; ++s) {
      starts[n] = s;
      n += row.special.contains(static_cast<int64_t>(row.ids[s])) ? 0 : 1;
    }
    UnitScan r;
    r.n = n;
    r.budget = budget_from_fx(rate_fx(row.rate_scalar) * n);
    return r;
  }
  bool prev = false;
  for (int64_t s = 0; s < row.len; ++s) {
    const bool e = row.eligible(s);
    if (e) {
      if (!(prev && row.words && row.same_word(s - 1, s))) starts[n++] = s;
      if (row.rates) sum_fx += rate_fx(row.rate(s));
      else ++n_eligible;
    }
    prev = e;
  }
  if (!row.rates) sum_fx = rate_fx(row.rate_scalar) * n_eligible;
  UnitScan r;
  r.n = n;
  r.budget = budget_from_fx(sum_fx);
  return r;
}

// exact=True, heap entry of the unit starting at f from its KEY word u: (key << 32) | f, the key being
// u itself, or with per-token rates the float bits of -log(u') / rate (Efraimidis-Spirakis weighted
// sampling without replacement: the smallest keys win). False when the unit has rate 0.
template <typename id_t>
MLK_HD bool exact_entry(const Row<id_t>& row, int64_t f, uint32_t u, int64_t* entry) {
  uint32_t k32 = u;
  if (row.weighted) {
    const float r = row.rate(f);
    if (!(r > 0.0f)) return false;
    k32 = float_bits(static_cast<float>(neglog_unit(u) / static_cast<double>(r > 1.0f ? 1.0f : r)));
  }
  *entry = static_cast<int64_t>((static_cast<uint64_t>(k32) << 32) | static_cast<uint64_t>(f));
  return true;
}

// ---- min-heap of unique 64-bit keys (exact mode); no recursion, so it runs in a GPU thread too ----
MLK_HD void sift_down(int64_t* h, int64_t n, int64_t i) {
  for (;;) {
    int64_t l = 2 * i + 1, m = i;
    if (l < n && static_cast<uint64_t>(h[l]) < static_cast<uint64_t>(h[m])) m = l;
    if (l + 1 < n && static_cast<uint64_t>(h[l + 1]) < static_cast<uint64_t>(h[m])) m = l + 1;
    if (m == i) return;
    const int64_t t = h[i]; h[i] = h[m]; h[m] = t;
    i = m;
  }
}

// exact=True: takes units in increasing key order while the budget lasts; a word longer than what is
// left of the budget is passed over (the next ones may fit), so the selection never exceeds the budget
// (the rule of Hugging Face's whole-word collator). `sel` must be cleared.
template <typename id_t>
MLK_HD void exact_take(const Row<id_t>& row, uint8_t* sel, int64_t* heap, int64_t n, int64_t remaining) {
  for (int64_t i = n / 2 - 1; i >= 0; --i) sift_down(heap, n, i);
  while (remaining > 0 && n > 0) {
    const int64_t f = static_cast<int64_t>(static_cast<uint64_t>(heap[0]) & 0xFFFFFFFFull);
    heap[0] = heap[--n];
    sift_down(heap, n, 0);
    if (row.unit_end(f) - f <= remaining) row.mark(sel, f, &remaining);
  }
}

MLK_HD void clear_row(uint8_t* sel, int64_t S) {
  for (int64_t s = 0; s < S; ++s) sel[s] = 0;
}

// exact=True, whole row (one GPU thread): `scratch` holds the unit starts, then in place the heap.
template <typename id_t>
MLK_HD void select_exact_row(const Row<id_t>& row, uint8_t* sel, int64_t* scratch) {
  const UnitScan sc = scan_units(row, scratch);
  int64_t m = 0;
  for (int64_t i = 0; i < sc.n; ++i) {
    const int64_t f = scratch[i];
    m += exact_entry(row, f, key_word(row.key, f), &scratch[m]) ? 1 : 0;  // m <= i: in place is safe
  }
  clear_row(sel, row.S);
  exact_take(row, sel, scratch, m, sc.budget);
}

MLK_HD int span_length(const uint32_t* cdf, int ncdf, uint32_t u) {
  int L = 1;
  for (int i = 0; i < ncdf; ++i) L += (cdf[i] <= u) ? 1 : 0;
  return L;
}

// SpanBERT-style span masking (docs/MASKING.md, "Span").
// The random words of the span loop: iteration t reads SPAN draw t. Iterations do not depend on each
// other's draws, so the CPU substitutes a source that computes them in vectorised batches.
struct SpanDraws {
  RandKey key;
  MLK_HD U32x4 operator()(int64_t t) const { return draw(key, kSpan, static_cast<uint32_t>(t)); }
};

template <typename id_t, typename Draws>
MLK_HD void select_span_row(const Row<id_t>& row, uint8_t* sel, int64_t* units, Draws& draws) {
  const UnitScan sc = scan_units(row, units);
  const int64_t n = sc.n;
  int64_t remaining = sc.budget;
  clear_row(sel, row.S);
  if (n == 0) return;
  const int64_t max_iter = 4 * n + 64;
  for (int64_t t = 0; t < max_iter && remaining > 0; ++t) {
    const U32x4 r = draws(t);
    const int64_t L = span_length(row.span_cdf, row.span_ncdf, r.v[0]);
    const int64_t anchor = static_cast<int64_t>((static_cast<uint64_t>(r.v[1]) * static_cast<uint64_t>(n)) >> 32);
    if (sel[units[anchor]]) continue;
    const int64_t end = anchor + L < n ? anchor + L : n;
    for (int64_t j = anchor; j < end && remaining > 0; ++j)
      if (!sel[units[j]]) row.mark(sel, units[j], &remaining);
  }
  for (int64_t j = 0; j < n && remaining > 0; ++j)
    if (!sel[units[j]]) row.mark(sel, units[j], &remaining);
}

// Bernoulli mode, one token: its unit's first token decides for the whole unit.
template <typename id_t>
MLK_HD bool bernoulli_selected(const Row<id_t>& row, int64_t s) {
  if (!row.eligible(s)) return false;
  const int64_t f = row.unit_start(s);
  return bernoulli(select_word(row.key, f), row.rate(f));
}

// Bernoulli mode, four consecutive tokens s0..s0+3 (s0 % 4 == 0): the unit of work of the CPU loop and
// of one GPU thread. Token units share one Philox call; word units draw at their first token.
template <typename id_t>
MLK_HD void bernoulli_quad(const Row<id_t>& row, int64_t s0) {
  const int64_t S = row.S;
  if (row.words) {
    for (int64_t s = s0; s < s0 + 4 && s < S; ++s) row.emit(s, bernoulli_selected(row, s));
    return;
  }
  bool elig[4];
  bool any = false;
  MLK_UNROLL
  for (int j = 0; j < 4; ++j) {
    elig[j] = (s0 + j < S) && row.eligible(s0 + j);
    any = any || elig[j];
  }
  U32x4 r = {{0u, 0u, 0u, 0u}};
  if (any) r = draw(row.key, kSelect, static_cast<uint32_t>(s0 >> 2));  // padding costs no Philox call
  MLK_UNROLL
  for (int j = 0; j < 4; ++j)
    if (s0 + j < S) row.emit(s0 + j, elig[j] && bernoulli(r.v[j], row.rate(s0 + j)));
}

}  // namespace mlk
