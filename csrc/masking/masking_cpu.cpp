// CPU implementation of the masking ops: the shared per-token / per-row logic of masking_core.h,
// parallel over rows with at::parallel_for (torch's OpenMP pool: it honours torch.set_num_threads and
// does not start a second OpenMP runtime beside torch's bundled one).
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "masking_launch.h"
#include "philox_simd.h"

namespace mlk {
namespace {

constexpr int kLanes = kPhiloxLanes;  // 16 selection draws = 64 tokens per batch

// Fills c[0..3][i] = Philox(counter (index[i] | domain << 24, step, sample)) for i < n (n <= kLanes).
inline void draw_lanes(const RandKey& key, uint32_t domain, const uint32_t* index, int n, uint32_t (&c)[4][kLanes]) {
  for (int i = 0; i < kLanes; ++i) {
    c[0][i] = (i < n ? index[i] : 0u) | (domain << kPosBits);
    c[1][i] = key.step; c[2][i] = key.s_lo; c[3][i] = key.s_hi;
  }
  philox_lanes(c, key.k0, key.k1);
}

// Writes the selected tokens of a row (out = replacement, label = original), given their positions:
// the ACTION draws of kLanes tokens come from one vectorised Philox batch. Same decisions as emit().
template <typename id_t>
void emit_selected(const Row<id_t>& row, const uint32_t* pos, int64_t n) {
  uint32_t c[4][kLanes];
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int m = static_cast<int>(n - i0 < kLanes ? n - i0 : kLanes);
    draw_lanes(row.key, kAction, pos + i0, m, c);
    for (int i = 0; i < m; ++i) {
      const int64_t s = pos[i0 + i];
      const id_t orig = row.ids[s];
      row.out[s] = static_cast<id_t>(replace_from_words(row.rp, c[0][i], c[1][i], static_cast<int64_t>(orig)));
      row.lab[s] = orig;
    }
  }
}

// Copy-through of a row: out = ids, labels = ignore_index (a vectorisable loop); selected tokens are
// then overwritten by emit_selected.
template <typename id_t>
void emit_unselected_row(const Row<id_t>& row) {
  const id_t* __restrict ids = row.ids;
  id_t* __restrict out = row.out;
  id_t* __restrict lab = row.lab;
  const id_t ignore = row.ignore;
  for (int64_t s = 0; s < row.S; ++s) { out[s] = ids[s]; lab[s] = ignore; }
}

// Token-unit Bernoulli for one row: the same decisions as bernoulli_quad (masking_core.h),
// restructured for the CPU: the selection draws of 64 tokens come from one vectorised Philox batch,
// the hits are collected as positions, and the ACTION draws of the selected tokens (~15%) are again
// computed 16 at a time (emit_selected). Measured on a 2-core x86 CPU (B=32, S=512, 1 thread):
// 157 us with per-token scalar Philox -> ~25 us.
template <typename id_t>
void bernoulli_tokens_row(const Row<id_t>& row, uint32_t* pos) {
  const bool plain = !row.attn && !row.smask;
  // u < rate * 2^32 (exact in double, see bernoulli()) is u < ceil(rate * 2^32) for integer u; NaN -> 0.
  const double t = static_cast<double>(row.rate_scalar) * 4294967296.0;
  const uint64_t thr = t > 0.0 ? static_cast<uint64_t>(t > 8589934592.0 ? 8589934592.0 : std::ceil(t)) : 0;
  emit_unselected_row(row);
  int64_t n = 0;
  uint32_t idx[kLanes], c[4][kLanes];
  for (int64_t s0 = 0; s0 < row.len; s0 += 4 * kLanes) {
    for (int i = 0; i < kLanes; ++i) idx[i] = static_cast<uint32_t>((s0 >> 2) + i);
    draw_lanes(row.key, kSelect, idx, kLanes, c);
    const int m = static_cast<int>(row.len - s0 < 4 * kLanes ? row.len - s0 : 4 * kLanes);
    // Token s0 + 4i + j draws word j of lane i. Decisions go to a bit mask without branches (a 15%
    // selection rate makes a per-token branch mispredict often), then only the hits are visited.
    uint64_t hits = 0;
    if (row.rates) {
      for (int i = 0; i < kLanes; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t s = s0 + 4 * i + j < row.len ? s0 + 4 * i + j : row.len - 1;
          hits |= static_cast<uint64_t>(bernoulli(c[j][i], row.rate(s))) << (4 * i + j);
        }
    } else {
      for (int i = 0; i < kLanes; ++i)
        for (int j = 0; j < 4; ++j) hits |= static_cast<uint64_t>(c[j][i] < thr) << (4 * i + j);
    }
    if (m < 4 * kLanes) hits &= (uint64_t(1) << m) - 1;
    for (; hits; hits &= hits - 1) {
      const int64_t s = s0 + __builtin_ctzll(hits);
      if (plain ? row.special.contains(static_cast<int64_t>(row.ids[s])) : !row.eligible(s)) continue;
      pos[n++] = static_cast<uint32_t>(s);
    }
  }
  emit_selected(row, pos, n);
}

// Calls fn(f, u) for the unit starts f in order, u being word f & 3 of the unit's draw (domain, f >> 2):
// the per-unit SELECT (whole words) and KEY (exact) words of masking_core.h, kLanes units per batch.
template <typename Fn>
void for_each_unit_word(const RandKey& key, uint32_t domain, const int64_t* starts, int64_t n, Fn&& fn) {
  uint32_t idx[kLanes], c[4][kLanes];
  for (int64_t u0 = 0; u0 < n; u0 += kLanes) {
    const int m = static_cast<int>(n - u0 < kLanes ? n - u0 : kLanes);
    for (int i = 0; i < m; ++i) idx[i] = static_cast<uint32_t>(starts[u0 + i] >> 2);
    draw_lanes(key, domain, idx, m, c);
    for (int i = 0; i < m; ++i) {
      const int64_t f = starts[u0 + i];
      fn(f, c[f & 3][i]);
    }
  }
}

// Whole-word Bernoulli for one row: one draw per unit, at its first token (as bernoulli_selected).
template <typename id_t>
void bernoulli_words_row(const Row<id_t>& row, int64_t* starts, uint32_t* pos) {
  const UnitScan sc = scan_units(row, starts);
  emit_unselected_row(row);
  int64_t n = 0;
  for_each_unit_word(row.key, kSelect, starts, sc.n, [&](int64_t f, uint32_t u) {
    if (!bernoulli(u, row.rate(f))) return;
    const int64_t e = row.unit_end(f);
    for (int64_t s = f; s < e; ++s) pos[n++] = static_cast<uint32_t>(s);
  });
  emit_selected(row, pos, n);
}

// exact=True for one row: select_exact_row (masking_core.h) with the units' KEY draws batched.
template <typename id_t>
void select_exact_row_cpu(const Row<id_t>& row, uint8_t* sel, int64_t* scratch) {
  const UnitScan sc = scan_units(row, scratch);
  int64_t m = 0;  // heap entries overwrite the unit starts in place: entry m is written after start m was read
  for_each_unit_word(row.key, kKey, scratch, sc.n, [&](int64_t f, uint32_t u) {
    m += exact_entry(row, f, u, &scratch[m]) ? 1 : 0;
  });
  clear_row(sel, row.S);
  exact_take(row, sel, scratch, m, sc.budget);
}

// SpanDraws computed kLanes iterations at a time.
struct BatchedSpanDraws {
  RandKey key;
  int64_t base = -1;
  uint32_t c[4][kLanes];
  U32x4 operator()(int64_t t) {
    if (base < 0 || t < base || t >= base + kLanes) {
      base = t - t % kLanes;
      uint32_t idx[kLanes];
      for (int i = 0; i < kLanes; ++i) idx[i] = static_cast<uint32_t>(base + i);
      draw_lanes(key, kSpan, idx, kLanes, c);
    }
    const int64_t i = t - base;
    return U32x4{{c[0][i], c[1][i], c[2][i], c[3][i]}};
  }
};

}  // namespace

// Rows per parallel task: a row of a few hundred tokens costs ~1-5 us, so batches of rows amortise the
// task overhead while B >= 32 still splits over the threads.
constexpr int64_t kRowGrain = 4;

template <typename id_t>
void mask_tokens_cpu(const MaskArgs<id_t>& a) {
  at::parallel_for(0, a.B, kRowGrain, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> sel(a.mode == kBernoulli ? 0 : a.S);
    std::vector<int64_t> scratch(a.S);
    std::vector<uint32_t> pos(a.S);
    for (int64_t b = b0; b < b1; ++b) {
      const Row<id_t> row(a, b);
      if (a.mode == kBernoulli) {
        if (a.word_ids)
          bernoulli_words_row(row, scratch.data(), pos.data());
        else
          bernoulli_tokens_row(row, pos.data());
        continue;
      }
      if (a.mode == kExact)
        select_exact_row_cpu(row, sel.data(), scratch.data());
      else {
        BatchedSpanDraws draws{row.key};
        select_span_row(row, sel.data(), scratch.data(), draws);
      }
      emit_unselected_row(row);
      int64_t n = 0;
      for (int64_t s = 0; s < a.S; ++s) {  // branch-free compaction of the selected positions
        pos[n] = static_cast<uint32_t>(s);
        n += sel[s];
      }
      emit_selected(row, pos.data(), n);
    }
  });
}

template <typename id_t>
void mass_mask_cpu(const MassArgs<id_t>& a) {
  at::parallel_for(0, a.B, kRowGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      mass_fragment_row(a, b);
      const RandKey key = mass_key(a, b);
      const int64_t start = a.spans[2 * b], end = a.spans[2 * b + 1];
      {  // outside the fragment: copy-through, vectorisable (no aliasing through `a`)
        const id_t* __restrict ids = a.ids + b * a.S;
        id_t* __restrict enc = a.enc + b * a.S;
        id_t* __restrict dec = a.dec + b * a.S;
        id_t* __restrict lab = a.labels + b * a.S;
        const id_t pad = static_cast<id_t>(a.pad_token_id), ignore = static_cast<id_t>(a.ignore_index);
        for (int64_t s = 0; s < a.S; ++s) { enc[s] = ids[s]; dec[s] = pad; lab[s] = ignore; }
      }
      uint32_t idx[kLanes], c[4][kLanes];  // inside: ACTION draws kLanes positions at a time
      for (int64_t s0 = start; s0 < end; s0 += kLanes) {
        const int m = static_cast<int>(end - s0 < kLanes ? end - s0 : kLanes);
        for (int i = 0; i < m; ++i) idx[i] = static_cast<uint32_t>(s0 + i);
        draw_lanes(key, kAction, idx, m, c);
        for (int i = 0; i < m; ++i) mass_emit_inside(a, b, s0 + i, c[0][i], c[1][i]);
      }
    }
  });
}

template void mask_tokens_cpu<int64_t>(const MaskArgs<int64_t>&);
template void mask_tokens_cpu<int32_t>(const MaskArgs<int32_t>&);
template void mass_mask_cpu<int64_t>(const MassArgs<int64_t>&);
template void mass_mask_cpu<int32_t>(const MassArgs<int32_t>&);

// T5 span corruption: rows in parallel, each the shared sequential row algorithm (t5_core.h).
template <typename id_t>
void t5_span_corruption_cpu(const T5Args<id_t>& a) {
  at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) t5_row(a, b);
  });
}

template void t5_span_corruption_cpu<int64_t>(const T5Args<int64_t>&);
template void t5_span_corruption_cpu<int32_t>(const T5Args<int32_t>&);

// BART infilling: rows in parallel, each the shared row algorithm (bart_core.h), a span-length buffer
// per chunk of rows.
template <typename id_t>
void bart_infill_cpu(const BartArgs<id_t>& a) {
  at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> len(static_cast<size_t>(a.S > 0 ? a.S : 1));
    for (int64_t b = b0; b < b1; ++b) bart_row(a, b, len.data());
  });
}

template void bart_infill_cpu<int64_t>(const BartArgs<int64_t>&);
template void bart_infill_cpu<int32_t>(const BartArgs<int32_t>&);

}  // namespace mlk
