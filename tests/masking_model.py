"""An independent, deliberately naive model of ``docs/MASKING.md``: Philox4x32-10 and the masking
algorithms (``mask_tokens``, ``mass_mask``), used to judge every backend against the spec rather than
against each other.

Written from the spec alone (not from the package), naive on purpose: Python loops per row, plain
integers for the integer arithmetic, IEEE doubles only where the spec uses them. Nothing here imports
the package or triton.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

DOMAIN_SELECT, DOMAIN_ACTION, DOMAIN_KEY, DOMAIN_SPAN, DOMAIN_FRAGMENT = 0, 1, 2, 3, 4


def philox4x32_10(ctr, key) -> np.ndarray:
    """Philox4x32-10 (Salmon et al. 2011) on arrays: ``ctr`` 4 broadcastable uint32 arrays, ``key``
    two uint32 ints. Returns a (4, ...) uint32 array."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & np.uint64(_M32) for c in ctr)
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0, k1 = np.uint64(int(key[0]) & _M32), np.uint64(int(key[1]) & _M32)
    m0, m1, mask = np.uint64(_PHILOX_M0), np.uint64(_PHILOX_M1), np.uint64(_M32)
    sh = np.uint64(32)
    for rnd in range(10):
        if rnd:
            k0 = np.uint64((int(k0) + _PHILOX_W0) & _M32)
            k1 = np.uint64((int(k1) + _PHILOX_W1) & _M32)
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> sh) ^ c1 ^ k0, p1 & mask, (p0 >> sh) ^ c3 ^ k1, p0 & mask)
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def philox_draw(seed: int, step: int, sample_key: int, domain: int, index) -> np.ndarray:
    """The spec's draw: key ``(seed mod 2^32, seed >> 32 mod 2^32)``, counter
    ``(index | domain << 24, step mod 2^32, key mod 2^32, key >> 32 mod 2^32)``. Returns (4, ...) uint32."""
    seed, step, sample_key = int(seed), int(step), int(sample_key)
    index = np.asarray(index, dtype=np.uint64)
    ctr0 = index | np.uint64(domain << 24)
    return philox4x32_10((ctr0, step & _M32, sample_key & _M32, (sample_key >> 32) & _M32),
                         (seed & _M32, (seed >> 32) & _M32))


def _word(seed, step, key, domain, pos: int) -> int:
    """Word ``r[pos & 3]`` of the draw at index ``pos >> 2`` (SELECT / KEY domains)."""
    return int(philox_draw(seed, step, key, domain, pos >> 2)[pos & 3])


def fx(p: float) -> int:
    """``floor(clamp(p, 0, 1) * 2^24 + 0.5)``, ``p`` a float32 value (as a double)."""
    p = min(max(float(p), 0.0), 1.0)
    return int(math.floor(p * 16777216.0 + 0.5))


def budget(fx_sum: int) -> int:
    k = (fx_sum + (1 << 23)) >> 24
    if fx_sum > 0:
        k = max(k, 1)
    return k


def replacement_thresholds(mask_prob: float, random_prob: float) -> tuple[int, int]:
    t_mask = math.floor(float(mask_prob) * 4294967296.0)
    t_rand = math.floor((float(mask_prob) + float(random_prob)) * 4294967296.0)
    return t_mask, t_rand


def neglog(u: int) -> float:
    """``-log((u + 0.5) / 2^32)`` via frexp and the 9-term atanh series, Horner order."""
    x = (u + 0.5) / 4294967296.0
    m, e = math.frexp(x)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    acc = 1.0 / 17.0
    for i in range(7, -1, -1):
        acc = acc * z + 1.0 / (2 * i + 1)
    log_m = 2.0 * s * acc
    return -(log_m + e * 0.6931471805599453)


def span_pmf_model(p: float, max_len: int) -> list[float]:
    """Geometric(p) on {1, 2, ...} truncated to [1, max_len] and renormalised."""
    q = 1.0 - p
    w = [p * q ** (i - 1) for i in range(1, max_len + 1)]
    tot = sum(w)
    return [x / tot for x in w]


def span_cdf_thresholds(pmf: list[float]) -> list[int]:
    """``cdf_i = floor(P(L <= i) * 2^32)`` for i = 1 .. n - 1 (i = n is 2^32: never <= r)."""
    out, acc = [], 0.0
    for i in range(len(pmf) - 1):
        acc += pmf[i]
        out.append(min(int(math.floor(acc * 4294967296.0)), 1 << 32))
    return out


def as_np(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


def model_eligible(input_ids, *, lengths=None, attention_mask=None, special_token_ids=None,
                   special_tokens_mask=None, word_ids=None) -> np.ndarray:
    """(B, S) bool eligibility per the spec."""
    ids = as_np(input_ids).astype(np.int64)
    B, S = ids.shape
    elig = np.ones((B, S), dtype=bool)
    if lengths is not None:
        elig &= np.arange(S)[None, :] < as_np(lengths).astype(np.int64)[:, None]
    if attention_mask is not None:
        elig &= as_np(attention_mask) != 0
    if special_tokens_mask is not None:
        elig &= as_np(special_tokens_mask) == 0
    if special_token_ids is not None:
        for t in list(as_np(special_token_ids).reshape(-1)):
            elig &= ids != int(t)
    if word_ids is not None:
        elig &= as_np(word_ids) >= 0
    return elig


def model_units(elig_row: np.ndarray, wid_row: np.ndarray | None) -> list[tuple[int, int]]:
    """Units of a row as (first position, length): eligible tokens, or maximal runs of consecutive
    eligible tokens with equal word id."""
    S = elig_row.shape[0]
    units = []
    s = 0
    while s < S:
        if not elig_row[s]:
            s += 1
            continue
        f = s
        s += 1
        if wid_row is not None:
            while s < S and elig_row[s] and wid_row[s] == wid_row[f]:
                s += 1
        units.append((f, s - f))
    return units


def _rates(mlm_probability, B: int, S: int) -> tuple[np.ndarray, str]:
    """float32 rates broadcast to (B, S), and the kind: 'scalar', 'row' or 'token'."""
    if isinstance(mlm_probability, torch.Tensor):
        r = mlm_probability.detach().cpu().to(torch.float32).numpy()
        if r.ndim == 0:
            return np.full((B, S), r, dtype=np.float32), "scalar"
        if r.ndim == 1:
            return np.repeat(r[:, None], S, axis=1).astype(np.float32), "row"
        return r.astype(np.float32).reshape(B, S), "token"
    return np.full((B, S), np.float32(mlm_probability), dtype=np.float32), "scalar"


def _span_params(span_lengths):
    """The span-length law P(L = 1..n) as a list (None: no span masking)."""
    if span_lengths is None or span_lengths is False:
        return None
    if span_lengths is True:
        return span_pmf_model(0.2, 10)
    if len(span_lengths) == 2 and isinstance(span_lengths[1], int):
        return span_pmf_model(float(span_lengths[0]), span_lengths[1])
    total = math.fsum(span_lengths)
    return [q / total for q in span_lengths]


def model_mask_tokens(input_ids, *, mask_token_id, vocab_size, mlm_probability=0.15,
                      mask_replace_prob=0.8, random_replace_prob=0.1, lengths=None,
                      attention_mask=None, special_token_ids=None, special_tokens_mask=None,
                      word_ids=None, span_lengths=None, exact=False, random_token_range=None,
                      sample_ids=None, seed=0, step=0, ignore_index=-100, backend=None):
    """The spec's ``mask_tokens`` (docs/MASKING.md), returning ``(masked_input_ids, labels)`` as
    int64 numpy arrays. Also returns nothing else: selection is ``labels != ignore_index``."""
    ids = as_np(input_ids).astype(np.int64)
    B, S = ids.shape
    seed, step = _int(seed), _int(step)
    keys = list(range(B)) if sample_ids is None else [int(v) for v in as_np(sample_ids).reshape(-1)]
    elig = model_eligible(ids, lengths=lengths, attention_mask=attention_mask,
                          special_token_ids=special_token_ids, special_tokens_mask=special_tokens_mask,
                          word_ids=word_ids)
    wid = as_np(word_ids)
    rates, kind = _rates(mlm_probability, B, S)
    span = _span_params(span_lengths)
    t_mask, t_rand = replacement_thresholds(mask_replace_prob, random_replace_prob)
    lo, hi = (0, int(vocab_size)) if random_token_range is None else (int(random_token_range[0]),
                                                                        int(random_token_range[1]))
    out = ids.copy()
    labels = np.full((B, S), int(ignore_index), dtype=np.int64)
    for b in range(B):
        key = keys[b]
        units = model_units(elig[b], None if wid is None else wid[b])
        chosen: list[tuple[int, int]] = []
        if span is None and not exact:
            for f, ln in units:
                u = _word(seed, step, key, DOMAIN_SELECT, f)
                if float(u) < float(rates[b, f]) * 4294967296.0:
                    chosen.append((f, ln))
        else:
            k = budget(sum(fx(rates[b, s]) for s in range(S) if elig[b, s]))
            if span is None:  # exact
                order = []
                for f, ln in units:
                    u = _word(seed, step, key, DOMAIN_KEY, f)
                    if kind == "token":
                        r = float(rates[b, f])
                        if r <= 0.0:
                            continue
                        k32 = int(np.float32(neglog(u) / r).view(np.uint32))
                    else:
                        k32 = u
                    order.append(((k32 << 32) | f, f, ln))
                order.sort()
                count = 0
                for _, f, ln in order:
                    if count + ln > k:
                        continue  # HF's whole-word rule: skip what does not fit, try the next
                    chosen.append((f, ln))
                    count += ln
            else:
                cdf = span_cdf_thresholds(span)
                n = len(units)
                sel = [False] * n
                count = 0
                t = 0
                while count < k and t < 4 * n + 64:
                    r = philox_draw(seed, step, key, DOMAIN_SPAN, t)
                    t += 1
                    L = 1 + sum(1 for c in cdf if c <= int(r[0]))
                    a = (int(r[1]) * n) >> 32
                    if sel[a]:
                        continue
                    for j in range(a, min(a + L, n)):
                        if count >= k:
                            break
                        if not sel[j]:
                            sel[j] = True
                            count += units[j][1]
                for j in range(n):
                    if count >= k:
                        break
                    if not sel[j]:
                        sel[j] = True
                        count += units[j][1]
                chosen = [units[j] for j in range(n) if sel[j]]
        for f, ln in chosen:
            for s in range(f, f + ln):
                labels[b, s] = ids[b, s]
                r = philox_draw(seed, step, key, DOMAIN_ACTION, s)
                a = int(r[0])
                if a < t_mask:
                    out[b, s] = int(mask_token_id)
                elif a < t_rand:
                    out[b, s] = lo + ((int(r[1]) * (hi - lo)) >> 32)
    return out, labels


def model_mass_mask(input_ids, *, lengths, mask_token_id, vocab_size, fragment_ratio=0.5,
                    pred_probs=(0.8, 0.1, 0.1), pad_token_id=0, special_token_ids=None,
                    sample_ids=None, seed=0, step=0, ignore_index=-100, backend=None):
    """The spec's ``mass_mask``: ``(encoder_input_ids, decoder_input_ids, labels, spans)`` as int64 numpy."""
    ids = as_np(input_ids).astype(np.int64)
    B, S = ids.shape
    seed, step = _int(seed), _int(step)
    keys = list(range(B)) if sample_ids is None else [int(v) for v in as_np(sample_ids).reshape(-1)]
    elig = model_eligible(ids, lengths=lengths, special_token_ids=special_token_ids)
    t_mask, t_rand = replacement_thresholds(pred_probs[0], pred_probs[1])
    enc = ids.copy()
    dec = np.full((B, S), int(pad_token_id), dtype=np.int64)
    labels = np.full((B, S), int(ignore_index), dtype=np.int64)
    spans = np.zeros((B, 2), dtype=np.int64)
    for b in range(B):
        key = keys[b]
        n = int(elig[b].sum())
        if n == 0:
            continue
        m = max(1, (fx(float(fragment_ratio)) * n + (1 << 23)) >> 24)
        longest, run = 0, 0
        for s in range(S):
            run = run + 1 if elig[b, s] else 0
            longest = max(longest, run)
        m = min(m, longest)
        starts = [s for s in range(S - m + 1) if elig[b, s:s + m].all()]
        r0 = int(philox_draw(seed, step, key, DOMAIN_FRAGMENT, 0)[0])
        start = starts[(r0 * len(starts)) >> 32]
        spans[b] = (start, start + m)
        for t in range(start, start + m):
            labels[b, t] = ids[b, t]
            dec[b, t] = ids[b, t - 1] if t > 0 else int(mask_token_id)
            r = philox_draw(seed, step, key, DOMAIN_ACTION, t)
            a = int(r[0])
            if a < t_mask:
                enc[b, t] = int(mask_token_id)
            elif a < t_rand:
                enc[b, t] = (int(r[1]) * int(vocab_size)) >> 32
    return enc, dec, labels, spans
