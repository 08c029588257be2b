"""The masking specification in plain NumPy (docs/MASKING.md), and the test oracle.

Written from the spec, not from the C++: the `cpu` and `cuda` backends must match it bit for bit.
It works on the *normalised* arguments that `api.py` builds (the op schema), row by row. Slow by
design (clarity first); use it on small batches.
"""
from __future__ import annotations

import math

import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
POS_BITS = 24
SELECT, ACTION, KEY, SPAN, FRAGMENT, T5_NOISE, T5_NONNOISE = range(7)
BART_LENGTH, BART_START, BART_ROTATE, BART_TOKEN, BART_SLOT, BART_INSERT = range(7, 13)
MODE_BERNOULLI, MODE_EXACT, MODE_SPAN = range(3)
FX_BITS = 24


def philox4x32_10(counter, key):
    """Philox4x32-10. `counter`: 4 arrays (or ints) of uint32 values, `key`: 2 ints. Returns 4 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & MASK32 for c in counter)
    k0, k1 = (np.uint64(int(k) & 0xFFFFFFFF) for k in key)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + _W0) & MASK32
        k1 = (k1 + _W1) & MASK32
    return c0, c1, c2, c3


class RowRandom:
    """The random words of one row: Philox keyed on (seed, step, sample key)."""

    def __init__(self, seed: int, step: int, sample: int):
        seed, step, sample = seed % 2**64, step % 2**64, sample % 2**64
        self.key = (seed & 0xFFFFFFFF, seed >> 32)
        self.rest = (step & 0xFFFFFFFF, sample & 0xFFFFFFFF, sample >> 32)

    def draw(self, domain: int, index) -> tuple:
        index = np.asarray(index, dtype=np.uint64)
        c0 = index | np.uint64(domain << POS_BITS)
        return philox4x32_10((c0, *(np.full_like(c0, v) for v in self.rest)), self.key)

    def word(self, domain: int, positions: np.ndarray) -> np.ndarray:
        """Word `s & 3` of the draw at index `s >> 2` (domains SELECT and KEY)."""
        positions = np.asarray(positions, dtype=np.int64)
        r = np.stack(self.draw(domain, positions >> 2))
        return r[positions & 3, np.arange(positions.size)] if positions.size else np.zeros(0, np.uint64)


def rate_fx(rate) -> np.ndarray:
    r = np.asarray(rate, dtype=np.float64)
    r = np.where(r > 1.0, 1.0, np.where(r > 0.0, r, 0.0))
    return np.floor(r * 16777216.0 + 0.5).astype(np.int64)


def budget_from_fx(sum_fx: int) -> int:
    k = (int(sum_fx) + (1 << (FX_BITS - 1))) >> FX_BITS
    return 1 if k == 0 and sum_fx > 0 else k


def neglog_unit(u: np.ndarray) -> np.ndarray:
    """-log((u + 0.5) / 2^32) by frexp and the atanh series, as docs/MASKING.md (no libm log)."""
    x = (np.asarray(u, dtype=np.float64) + 0.5) * (1.0 / 4294967296.0)
    m, e = np.frexp(x)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    poly = np.full_like(s, 1.0 / 17.0)
    for d in (15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0):
        poly = poly * s2 + 1.0 / d
    poly = poly * s2 + 1.0
    return -(e.astype(np.float64) * 0.6931471805599453 + 2.0 * s * poly)


def span_length_pmf(p: float, max_len: int) -> list[float]:
    """SpanBERT's span-length law: geometric(p) on 1.. truncated to [1, max_len] and renormalised."""
    w = [p * (1.0 - p) ** (i - 1) for i in range(1, max_len + 1)]
    total = sum(w)
    return [x / total for x in w]


def span_cdf_thresholds(p: float, max_len: int) -> list[int]:
    """Integer thresholds cdf_i = floor(P(L <= i) * 2^32), i = 1 .. max_len - 1 (inverse-CDF sampling)."""
    return span_cdf_from_pmf(span_length_pmf(p, max_len))


def span_cdf_from_pmf(pmf) -> list[int]:
    """The thresholds of any length law P(L = i), i = 1 .. n (summing to 1): floor(P(L <= i) * 2^32) for
    i < n, the partial sums accumulated left to right in double."""
    acc, out = 0.0, []
    for q in pmf[:-1]:
        acc += q
        out.append(min(int(acc * 2**32), 2**32))
    return out


def span_length(cdf: list[int], u) -> np.ndarray:
    u = np.asarray(u, dtype=np.uint64)
    if not cdf:
        return np.ones_like(u, np.int64)
    return 1 + sum((np.uint64(min(c, 2**32 - 1)) <= u).astype(np.int64) for c in cdf)


def draw_span_lengths(n: int, p: float, max_len: int, seed: int = 0) -> np.ndarray:
    """n span lengths from the kernels' sampler (iterations 0..n-1 of the SPAN domain of row 0)."""
    r0 = RowRandom(seed, 0, 0).draw(SPAN, np.arange(n, dtype=np.uint64))[0]
    return np.asarray(span_length(span_cdf_thresholds(p, max_len), r0), dtype=np.int64)


def replace_tokens(rnd: RowRandom, positions: np.ndarray, original: np.ndarray, t_mask, t_rand, mask_id, lo, hi):
    """80/10/10: mask / random id in [lo, hi) / keep, per token (ACTION domain)."""
    a, r, _, _ = rnd.draw(ACTION, positions.astype(np.uint64))
    rand_ids = lo + ((r * np.uint64(hi - lo)) >> np.uint64(32)).astype(np.int64)
    return np.where(a < np.uint64(t_mask), mask_id, np.where(a < np.uint64(t_rand), rand_ids, original))


def _row_units(elig: np.ndarray, words) -> tuple[np.ndarray, np.ndarray]:
    """(first position, end) of every unit: an eligible token, or a run of eligible tokens of one word."""
    pos = np.flatnonzero(elig)
    if words is None or pos.size == 0:
        return pos, pos + 1
    starts = [p for p in pos if not (p > 0 and elig[p - 1] and words[p - 1] == words[p])]
    ends = []
    for f in starts:
        e = f + 1
        while e < elig.size and elig[e] and words[e] == words[f]:
            e += 1
        ends.append(e)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


def _eligible(ids, b, S, lengths, attn, special_mask, special_ids, word_ids) -> np.ndarray:
    n = S if lengths is None else min(max(int(lengths[b]), 0), S)
    elig = np.arange(S) < n
    if attn is not None:
        elig &= attn[b] != 0
    if special_mask is not None:
        elig &= special_mask[b] == 0
    if word_ids is not None:
        elig &= word_ids[b] >= 0
    if special_ids.size:
        elig &= ~np.isin(ids[b].astype(np.int64), special_ids)
    return elig


def _select_row(mode, rnd, elig, rate, weighted, words, span_cdf):
    S = elig.size
    starts, ends = _row_units(elig, words)
    sel = np.zeros(S, dtype=bool)
    if mode == MODE_BERNOULLI:
        if starts.size:
            take = rnd.word(SELECT, starts).astype(np.float64) < rate[starts].astype(np.float64) * 4294967296.0
            for f, e in zip(starts[take], ends[take]):
                sel[f:e] = True
        return sel
    remaining = budget_from_fx(int(rate_fx(rate[elig]).sum()))
    if mode == MODE_EXACT:
        k32 = rnd.word(KEY, starts).astype(np.uint64)
        keep = np.ones(starts.size, bool)
        if weighted:
            r = rate[starts]
            keep = r > 0
            with np.errstate(divide="ignore"):  # rate 0 -> key +inf; such units are dropped by `keep`
                key = (neglog_unit(k32) / np.minimum(r, np.float32(1)).astype(np.float64)).astype(np.float32)
            k32 = key.view(np.uint32).astype(np.uint64)
        key64 = (k32 << np.uint64(32)) | starts.astype(np.uint64)
        for j in np.argsort(np.where(keep, key64, np.uint64(2**64 - 1)), kind="stable"):
            if remaining <= 0 or not keep[j]:
                break
            if ends[j] - starts[j] > remaining:
                continue  # a word longer than the rest of the budget is passed over: never overshoot
            sel[starts[j]:ends[j]] = True
            remaining -= ends[j] - starts[j]
        return sel
    n = starts.size
    if n == 0:
        return sel
    t = 0
    while t < 4 * n + 64 and remaining > 0:
        r0, r1, _, _ = rnd.draw(SPAN, t)
        t += 1
        L = int(span_length(span_cdf, r0))
        anchor = (int(r1) * n) >> 32
        if sel[starts[anchor]]:
            continue
        for j in range(anchor, min(anchor + L, n)):
            if remaining <= 0:
                break
            if not sel[starts[j]]:
                sel[starts[j]:ends[j]] = True
                remaining -= ends[j] - starts[j]
    for j in range(n):
        if remaining <= 0:
            break
        if not sel[starts[j]]:
            sel[starts[j]:ends[j]] = True
            remaining -= ends[j] - starts[j]
    return sel


def _np(t):
    return None if t is None else t.detach().cpu().numpy()


def mask_tokens(input_ids, lengths, attention_mask, special_tokens_mask, special_token_ids, word_ids, rates,
                sample_ids, seed, step, mode, span_cdf, mask_token_id, t_mask, t_rand, rand_lo, rand_hi,
                ignore_index):
    """Reference of `torch.ops.masklm_kernels.mask_tokens` (same normalised arguments). Returns NumPy arrays."""
    ids = _np(input_ids)
    B, S = ids.shape
    lengths, attn, smask, words_all = _np(lengths), _np(attention_mask), _np(special_tokens_mask), _np(word_ids)
    sids, samples = _np(special_token_ids).astype(np.int64), _np(sample_ids)
    r = _np(rates).astype(np.float32)
    weighted = r.ndim == 2
    rates_bs = np.broadcast_to(r[:, None] if r.ndim == 1 else r, (B, S))
    out, labels = ids.copy(), np.full_like(ids, ignore_index)
    seed, step = int(seed), int(step)
    for b in range(B):
        rnd = RowRandom(seed, step, int(samples[b]) if samples is not None else b)
        elig = _eligible(ids, b, S, lengths, attn, smask, sids, words_all)
        words = None if words_all is None else words_all[b]
        sel = _select_row(mode, rnd, elig, np.asarray(rates_bs[b]), weighted, words, span_cdf)
        pos = np.flatnonzero(sel)
        orig = ids[b, pos].astype(np.int64)
        out[b, pos] = replace_tokens(rnd, pos, orig, t_mask, t_rand, mask_token_id, rand_lo, rand_hi)
        labels[b, pos] = orig
    return out, labels


def mass_mask(input_ids, lengths, special_token_ids, sample_ids, seed, step, ratio_fx, mask_token_id, t_mask,
              t_rand, rand_lo, rand_hi, pad_token_id, ignore_index):
    """Reference of `torch.ops.masklm_kernels.mass_mask`. Returns (enc, dec, labels, spans) NumPy arrays."""
    ids = _np(input_ids)
    B, S = ids.shape
    lengths, sids, samples = _np(lengths), _np(special_token_ids).astype(np.int64), _np(sample_ids)
    enc, dec = ids.copy(), np.full_like(ids, pad_token_id)
    labels, spans = np.full_like(ids, ignore_index), np.zeros((B, 2), np.int64)
    seed, step = int(seed), int(step)
    for b in range(B):
        rnd = RowRandom(seed, step, int(samples[b]) if samples is not None else b)
        elig = _eligible(ids, b, S, lengths, None, None, sids, None)
        n = int(elig.sum())
        if n == 0:
            continue
        runs, run_start = [], None  # (start, length) of each run of consecutive eligible tokens
        for s in range(S + 1):
            if s < S and elig[s]:
                run_start = s if run_start is None else run_start
            elif run_start is not None:
                runs.append((run_start, s - run_start))
                run_start = None
        m = max(1, (ratio_fx * n + (1 << (FX_BITS - 1))) >> FX_BITS)
        m = min(m, max(length for _, length in runs))
        valid = [st + i for st, length in runs for i in range(length - m + 1)]
        start = valid[(int(rnd.draw(FRAGMENT, 0)[0]) * len(valid)) >> 32]
        pos = np.arange(start, start + m)
        orig = ids[b, pos].astype(np.int64)
        enc[b, pos] = replace_tokens(rnd, pos, orig, t_mask, t_rand, mask_token_id, rand_lo, rand_hi)
        dec[b, pos] = [ids[b, t - 1] if t > 0 else mask_token_id for t in pos]
        labels[b, pos] = orig
        spans[b] = (start, start + m)
    return enc, dec, labels, spans


def t5_counts(n: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """T5's `random_spans_noise_mask` counts for a row of n tokens: (noise tokens, noise spans); (0, 0)
    when n < 2. np.round rounds half to even, as Python's round does."""
    if n < 2:
        return 0, 0
    noise = min(max(round(n * noise_density), 1), n - 1)
    return noise, max(round(min(noise, n - noise) / mean_noise_span_length), 1)


def t5_widths(S: int, noise_density: float, mean_noise_span_length: float, lengths_given: bool = True):
    """(encoder width, decoder width, most spans) over the row lengths a batch of width S can have (all of
    0..S when lengths are given, else S only)."""
    widths = []
    for n in (range(S + 1) if lengths_given else (S,)):
        noise, spans = t5_counts(n, noise_density, mean_noise_span_length)
        widths.append((n - noise + spans + 1, noise + spans + 1, spans))
    return tuple(max(w[i] for w in widths) for i in range(3))


def segmentation(rnd: RowRandom, domain: int, items: int, segments: int) -> list[int]:
    """T5's `_random_segmentation`: segment lengths of `items` items cut at segments - 1 of the items - 1
    gaps, chosen by selection sampling: gap g taken iff (u_g * remaining) >> 32 < needed."""
    u = rnd.word(domain, np.arange(max(items - 1, 0)))
    lengths, length, needed = [], 1, segments - 1
    for g in range(items - 1):
        if needed > 0 and (int(u[g]) * (items - 1 - g)) >> 32 < needed:
            lengths.append(length)
            length, needed = 1, needed - 1
        else:
            length += 1
    return lengths + [length]


def t5_span_corruption(input_ids, lengths, sample_ids, seed, step, noise_density, mean_noise_span_length,
                       sentinel_start_id, eos_token_id, pad_token_id, decoder_start_token_id, ignore_index, enc_width,
                       dec_width):
    """Reference of `torch.ops.masklm_kernels.t5_span_corruption`. Returns (encoder ids, encoder lengths,
    decoder input ids, labels, label lengths) NumPy arrays."""
    ids = _np(input_ids)
    B, S = ids.shape
    lengths, samples = _np(lengths), _np(sample_ids)
    enc = np.full((B, enc_width), pad_token_id, dtype=ids.dtype)
    dec = np.full((B, dec_width), pad_token_id, dtype=ids.dtype)
    labels = np.full((B, dec_width), ignore_index, dtype=ids.dtype)
    enc_len, dec_len = np.zeros(B, np.int64), np.zeros(B, np.int64)
    for b in range(B):
        rnd = RowRandom(int(seed), int(step), int(samples[b]) if samples is not None else b)
        n = S if lengths is None else min(max(int(lengths[b]), 0), S)
        row = [int(t) for t in ids[b, :n]]
        noise, spans = t5_counts(n, noise_density, mean_noise_span_length)
        out, tgt = [], []
        if spans == 0:
            out = row
        else:
            keep = segmentation(rnd, T5_NONNOISE, n - noise, spans)
            drop = segmentation(rnd, T5_NOISE, noise, spans)
            s = 0
            for k in range(spans):  # non-noise first, then noise: T5's interleaving
                out += row[s:s + keep[k]] + [sentinel_start_id - k]
                s += keep[k]
                tgt += [sentinel_start_id - k] + row[s:s + drop[k]]
                s += drop[k]
        out, tgt = out + [eos_token_id], tgt + [eos_token_id]
        enc[b, :len(out)], labels[b, :len(tgt)] = out, tgt
        dec[b, :len(tgt)] = [decoder_start_token_id] + tgt[:-1]
        enc_len[b], dec_len[b] = len(out), len(tgt)
    return enc, enc_len, dec, labels, dec_len


def poisson_cdf_thresholds(lam: float, n: int = 64) -> list[int]:
    """floor(P(L <= k) * 2^32) for k = 0 .. n - 2 of Poisson(lam) (L >= n - 1 folds into the last value);
    the pmf by the recurrence p_k = p_{k-1} lam / k from e^-lam, summed left to right in double."""
    p, acc, out = math.exp(-lam), 0.0, []
    for k in range(n - 1):
        acc += p
        out.append(min(int(acc * 2**32), 2**32))
        p = p * lam / (k + 1)
    return out


def choose(rnd: RowRandom, domain: int, items: int, needed: int) -> np.ndarray:
    """Selection sampling: the (sorted) indices of `needed` of `items` candidates; candidate g is taken iff
    (u_g * remaining) >> 32 < needed, u_g the word g & 3 of draw g >> 2."""
    u = rnd.word(domain, np.arange(max(items, 0)))
    taken = []
    for g in range(items):
        if needed > 0 and (int(u[g]) * (items - g)) >> 32 < needed:
            taken.append(g)
            needed -= 1
    return np.asarray(taken, dtype=np.int64)


def bart_infill(input_ids, lengths, sample_ids, seed, step, mask_ratio, poisson_cdf, replace_length, mask_token_id,
                t_mask, rand_lo, rand_hi, pad_token_id, decoder_start_token_id, ignore_index, width):
    """Reference of `torch.ops.masklm_kernels.bart_infill`. Returns (corrupted ids, their lengths, decoder
    input ids, labels, label lengths) NumPy arrays."""
    ids = _np(input_ids)
    B, S = ids.shape
    lengths, samples = _np(lengths), _np(sample_ids)
    out = np.full((B, width), pad_token_id, dtype=ids.dtype)
    out_len = np.zeros(B, np.int64)
    labels = np.full((B, S), ignore_index, dtype=ids.dtype)
    dec = np.full((B, S), pad_token_id, dtype=ids.dtype)
    cdf = [min(int(c), 2**32 - 1) for c in poisson_cdf]

    def replaced(r0, r1, original):  # mask_token_id below t_mask, else a random id
        return mask_token_id if int(r0) < t_mask else rand_lo + ((int(r1) * (rand_hi - rand_lo)) >> 32)

    for b in range(B):
        rnd = RowRandom(int(seed), int(step), int(samples[b]) if samples is not None else b)
        n = S if lengths is None else min(max(int(lengths[b]), 0), S)
        row = [int(t) for t in ids[b, :n]]
        labels[b, :n] = row
        if n:
            dec[b, :n] = [decoder_start_token_id] + row[:-1]
        k = math.ceil((n - 2) * mask_ratio) if n >= 3 else 0
        result = row
        if k > 0:
            spans, zeros, total, t = [], 0, 0, 0
            while total < k:  # Poisson lengths until the budget, the last one trimmed
                L = sum(1 for c in cdf if c <= int(rnd.draw(BART_LENGTH, t)[0]))
                if total + L > k or t == 4 * k + 63:
                    L = k - total
                total, t = total + L, t + 1
                if L > 0:
                    spans.append(L)
                else:
                    zeros += 1  # a zero-length span: an insertion
            zeros = min(zeros, k)  # insertions: at most the budget
            rot = (int(rnd.draw(BART_ROTATE, 0)[0]) * len(spans)) >> 32 if spans else 0
            starts = 1 + choose(rnd, BART_START, n - 2, len(spans))
            start_len = {int(s): spans[(j + rot) % len(spans)] for j, s in enumerate(starts)}
            kept, reach = [], 0
            for s in range(n):
                start, covered = s in start_len, reach > s
                if start:
                    reach = max(reach, min(s + start_len[s], n - 1))
                if not start and not covered:
                    kept.append(row[s])
                elif replace_length == -1 or (replace_length == 1 and start and not covered):
                    r0, r1, _, _ = rnd.draw(BART_TOKEN, s)
                    kept.append(replaced(r0, r1, row[s]))
            slots = set((1 + choose(rnd, BART_SLOT, len(kept) + zeros - 2, zeros)).tolist())
            result, it, i = [], iter(kept), 0
            for o in range(len(kept) + zeros):
                if o in slots:
                    r0, r1, _, _ = rnd.draw(BART_INSERT, i)
                    result.append(replaced(r0, r1, mask_token_id))
                    i += 1
                else:
                    result.append(next(it))
        out[b, :len(result)] = result
        out_len[b] = len(result)
    label_len = np.asarray([S if lengths is None else min(max(int(v), 0), S) for v in
                            (lengths if lengths is not None else [S] * B)], np.int64)
    return out, out_len, dec, labels, label_len
