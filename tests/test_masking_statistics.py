"""``mask_tokens`` statistics (docs/TESTING.md): selection rates, replacement
shares, uniformity of random ids and positions, weighted exact draws, whole-word rates and span lengths.

Statistical tests use the fastest available backend on large inputs; every assertion states its
false-failure probability (helpers.FALSE_FAILURE_PROB) and the bounds come from the binomial law.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import (
    FALSE_FAILURE_PROB,
    MASK_ID,
    SPECIAL_IDS,
    VOCAB_SIZE,
    assert_binomial,
    assert_chisquare,
    assert_proportions_ordered,
    fast_backend,
    make_batch,
    random_ids,
    rng_for,
    run_backend,
)
from masking_checks import COMMON, check_invariants, eligible_of, replacement_shares, units_of
from masking_model import as_np, budget, fx, span_pmf_model

masklm = pytest.importorskip("masklm_kernels")
mask_tokens = masklm.mask_tokens


# ----------------------------------------------------------------------------------------------
# Selection rates, replacement shares, random ids
# ----------------------------------------------------------------------------------------------

def _float32(p):
    return float(np.float32(p))


@pytest.mark.parametrize("p", [0.02, 0.15, 0.5])
def test_stat_token_selection_rate(p):
    backend = fast_backend()
    bt = make_batch(rng_for("stat rate", p), 64, 512)
    kw = dict(COMMON, lengths=bt.lengths, special_tokens_mask=bt.special_tokens_mask, mlm_probability=p, seed=42)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    assert_binomial(sel.sum(), elig.sum(), _float32(p), what=f"selection rate at p={p}")


def test_stat_row_rates():
    """(B,) rates: each row group is masked at its own rate; rate 0 never, rate 1 always."""
    backend = fast_backend()
    rates = [0.0, 0.05, 0.3, 0.9, 1.0]
    B, S = 80, 512
    bt = make_batch(rng_for("stat row rates"), B, S)
    row_rate = torch.tensor([rates[b % len(rates)] for b in range(B)], dtype=torch.float32)
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), mlm_probability=row_rate, seed=9)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    for i, r in enumerate(rates):
        rows = np.arange(B) % len(rates) == i
        k, n = int(sel[rows].sum()), int(elig[rows].sum())
        if r == 0.0:
            assert k == 0, f"rows with rate 0 got {k} selections"
        elif r == 1.0:
            assert k == n, f"rows with rate 1: {k} of {n} eligible selected"
        else:
            assert_binomial(k, n, _float32(r), what=f"rows with rate {r}")


def test_stat_token_rates():
    """(B, S) rates: each token is selected at its own rate; rate-0 tokens never."""
    backend = fast_backend()
    levels = np.array([0.0, 0.1, 0.6, 0.35], dtype=np.float32)
    B, S = 64, 512
    rng = rng_for("stat token rates")
    bt = make_batch(rng, B, S)
    group = rng.integers(0, len(levels), size=(B, S))
    rates = torch.from_numpy(levels[group])
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), mlm_probability=rates, seed=10)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    for g, r in enumerate(levels):
        m = elig & (group == g)
        k, n = int(sel[m].sum()), int(m.sum())
        if r == 0:
            assert k == 0, f"{k} tokens of rate 0 selected"
        else:
            assert_binomial(k, n, float(r), what=f"tokens of rate {r}")


@pytest.mark.parametrize("split", [(0.8, 0.1), (0.5, 0.3), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.6, 0.4)])
def test_stat_replacement_shares(split):
    """Of the selected tokens: mask / random / keep at the requested absolute fractions.

    Inputs are drawn from [5, 1000) and the random range is [1000, 2000) so the three outcomes can be
    told apart exactly (a random id never equals the original or the mask id)."""
    backend = fast_backend()
    mprob, rprob = split
    B, S = 64, 512
    rng = rng_for("stat shares", split)
    ids = random_ids(rng, B, S, vocab_size=1000)
    kw = dict(mask_token_id=MASK_ID, vocab_size=2000, random_token_range=(1000, 2000), mlm_probability=1.0,
              mask_replace_prob=mprob, random_replace_prob=rprob, seed=77)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = check_invariants(ids, kw, out, labels)
    o, i = as_np(out)[sel], as_np(ids)[sel]
    n = int(sel.sum())
    n_mask = int((o == MASK_ID).sum())
    n_rand = int(((o >= 1000) & (o < 2000)).sum())
    n_keep = int((o == i).sum())
    assert n_mask + n_rand + n_keep == n
    p_mask, p_rand, p_keep = replacement_shares(mprob, rprob)
    for k, p, what in ((n_mask, p_mask, "mask"), (n_rand, p_rand, "random"), (n_keep, p_keep, "keep")):
        assert_binomial(k, n, p, what=f"{what} share at split {split}")


def test_stat_shares_inside_words_and_spans():
    """Actions are per token, also inside words and spans: the 80/10/10 split holds there too."""
    backend = fast_backend()
    B, S = 64, 512
    rng = rng_for("stat shares words")
    bt = make_batch(rng, B, S, vocab_size=1000)
    for extra in (dict(word_ids=bt.word_ids), dict(word_ids=bt.word_ids, span_lengths=True, exact=False)):
        kw = dict(mask_token_id=MASK_ID, vocab_size=2000, random_token_range=(1000, 2000), mlm_probability=0.5,
                  lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), seed=5, **extra)
        out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
        sel = check_invariants(bt.input_ids, kw, out, labels)
        o = as_np(out)[sel]
        n = int(sel.sum())
        p_mask, p_rand, _ = replacement_shares(0.8, 0.1)
        assert_binomial(int((o == MASK_ID).sum()), n, p_mask, what=f"mask share ({sorted(extra)})")
        assert_binomial(int((o >= 1000).sum()), n, p_rand, what=f"random share ({sorted(extra)})")


@pytest.mark.parametrize("rng_range", [None, (10, 50), (999, 1000)])
def test_stat_random_ids_uniform_in_range(rng_range):
    """Random replacements are ids from random_token_range (default [0, vocab_size)), uniform
    (chi-square; the multiply-shift map's bias is below (hi - lo) / 2^32, negligible here)."""
    backend = fast_backend()
    B, S = 64, 512
    ids = random_ids(rng_for("stat uniform", rng_range), B, S)
    kw = dict(COMMON, mlm_probability=1.0, mask_replace_prob=0.0, random_replace_prob=1.0, seed=8)
    if rng_range is not None:
        kw["random_token_range"] = rng_range
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = check_invariants(ids, kw, out, labels)
    assert sel.all()
    lo, hi = rng_range or (0, VOCAB_SIZE)
    o = as_np(out).reshape(-1)
    assert o.min() >= lo and o.max() < hi, f"random ids outside [{lo}, {hi}): min {o.min()}, max {o.max()}"
    width = hi - lo
    n_bins = min(width, 50)
    # bins of (almost) equal numbers of ids: bin of id v is ((v - lo) * n_bins) // width
    counts = np.bincount(((o - lo) * n_bins) // width, minlength=n_bins)
    sizes = np.bincount((np.arange(width) * n_bins) // width, minlength=n_bins)
    assert_chisquare(counts, sizes / width, what=f"uniformity of random ids over [{lo}, {hi})")


# ----------------------------------------------------------------------------------------------
# exact=True
# ----------------------------------------------------------------------------------------------

def test_stat_exact_weighted_k1_proportional():
    """(B, S) rates with exact=True and a budget of 1: Efraimidis-Spirakis draws the single token with
    probability proportional to its rate."""
    backend = fast_backend()
    B = 4096 if backend != "reference" else 1024
    w = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.0], dtype=np.float32)
    S = len(w)
    ids = random_ids(rng_for("es k1"), B, S)
    rates = torch.from_numpy(np.tile(w, (B, 1)))
    kw = dict(COMMON, mlm_probability=rates, exact=True, seed=31)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = check_invariants(ids, kw, out, labels)
    assert (sel.sum(axis=1) == 1).all(), "budget is max(round(0.36), 1) = 1 per row"
    counts = sel.sum(axis=0)
    assert counts[-1] == 0, "rate-0 token chosen"
    probs = w[:-1].astype(np.float64) / w[:-1].astype(np.float64).sum()
    assert_chisquare(counts[:-1], probs, what="weighted exact draw, k = 1")
    for i, pi in enumerate(probs):
        assert_binomial(counts[i], B, pi, what=f"weighted exact draw, token {i} (rate {w[i]})")


def test_stat_exact_weighted_higher_rate_more_often():
    backend = fast_backend()
    B, S = (1024, 64) if backend != "reference" else (256, 64)
    rng = rng_for("es order")
    ids = random_ids(rng, B, S)
    group = rng.integers(0, 3, size=(B, S))
    levels = np.array([0.0, 0.1, 0.5], dtype=np.float32)
    rates = levels[group]
    kw = dict(COMMON, mlm_probability=torch.from_numpy(rates), exact=True, seed=32)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = check_invariants(ids, kw, out, labels)
    assert not sel[group == 0].any(), "rate-0 tokens chosen"
    assert_proportions_ordered(int(sel[group == 1].sum()), int((group == 1).sum()),
                               int(sel[group == 2].sum()), int((group == 2).sum()),
                               what="exact weighted: rate 0.1 vs rate 0.5 tokens")


def test_stat_exact_uniform_positions():
    """exact=True with a float rate: every eligible position equally likely (no positional bias)."""
    backend = fast_backend()
    B, S = (2048, 32) if backend != "reference" else (512, 32)
    ids = random_ids(rng_for("exact uniform"), B, S)
    kw = dict(COMMON, mlm_probability=0.25, exact=True, seed=33)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = check_invariants(ids, kw, out, labels)
    assert (sel.sum(axis=1) == 8).all()
    assert_chisquare(sel.sum(axis=0), np.full(S, 1.0 / S), what="exact: selected positions")


# ----------------------------------------------------------------------------------------------
# Whole words
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.15, 0.4])
def test_stat_word_rate_bernoulli(p):
    """Whole-word masking in Bernoulli mode: each word (unit) selected with probability p."""
    backend = fast_backend()
    B, S = 64, 512
    bt = make_batch(rng_for("word rate", p), B, S)
    kw = dict(COMMON, lengths=bt.lengths, special_tokens_mask=bt.special_tokens_mask, word_ids=bt.word_ids,
              mlm_probability=p, seed=21)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    units = units_of(bt.input_ids, kw)
    n_words = sum(len(u) for u in units)
    k_words = sum(int(sel[b, f]) for b, u in enumerate(units) for f, _ in u)
    assert_binomial(k_words, n_words, _float32(p), what=f"word selection rate at p={p}")


# ----------------------------------------------------------------------------------------------
# Span masking
# ----------------------------------------------------------------------------------------------

def _reference_module():
    return pytest.importorskip("masklm_kernels.masking.reference")


@pytest.mark.parametrize("p,max_len", [(0.2, 10), (0.5, 3), (0.1, 20), (0.3, 1)])
def test_span_length_pmf_is_truncated_geometric(p, max_len):
    ref = _reference_module()
    pmf = np.asarray(ref.span_length_pmf(p, max_len), dtype=np.float64)
    assert pmf.shape == (max_len,)
    np.testing.assert_allclose(pmf, span_pmf_model(p, max_len), rtol=1e-12, atol=0)
    if (p, max_len) == (0.2, 10):
        mean = float((np.arange(1, 11) * pmf).sum())
        assert abs(mean - 3.797) < 1e-3, "SpanBERT's mean span length is 3.8"


@pytest.mark.parametrize("p,max_len", [(0.2, 10), (0.5, 3), (0.1, 20), (0.3, 1)])
def test_stat_span_length_sampler_goodness_of_fit(p, max_len):
    """The integer inverse-CDF sampler the kernels use draws the truncated geometric law (chi-square)."""
    ref = _reference_module()
    n = 200_000
    draws = np.asarray(ref.draw_span_lengths(n, p, max_len, seed=17))
    assert draws.shape == (n,)
    assert draws.min() >= 1 and draws.max() <= max_len
    counts = np.bincount(draws, minlength=max_len + 1)[1:]
    assert_chisquare(counts, span_pmf_model(p, max_len), what=f"span lengths p={p} max_len={max_len}")
    # and deterministic in its seed
    again = np.asarray(ref.draw_span_lengths(1000, p, max_len, seed=17))
    assert np.array_equal(again, draws[:1000])


def test_stat_explicit_span_law_goodness_of_fit():
    """An explicit law (MacBERT's n-grams) through the kernels' integer inverse-CDF sampler (chi-square)."""
    ref = _reference_module()
    n = 200_000
    r0 = ref.RowRandom(23, 0, 0).draw(ref.SPAN, np.arange(n, dtype=np.uint64))[0]
    draws = np.asarray(ref.span_length(ref.span_cdf_from_pmf(list(MACBERT)), r0))
    assert draws.min() >= 1 and draws.max() <= 4
    assert_chisquare(np.bincount(draws, minlength=5)[1:], list(MACBERT), what="MacBERT n-gram lengths")


def _runs(sel_row):
    """Lengths of maximal runs of True."""
    out, run = [], 0
    for v in sel_row:
        if v:
            run += 1
        elif run:
            out.append(run)
            run = 0
    if run:
        out.append(run)
    return out


MACBERT = (0.4, 0.3, 0.2, 0.1)  # MacBERT's n-gram law (Cui et al., 2020): 1- to 4-grams


@pytest.mark.parametrize("law", [(0.2, 10), MACBERT], ids=["geometric", "macbert"])
def test_stat_span_mean_run_length(law):
    """Long rows at a low rate: runs of selected tokens are (nearly) single spans, so their mean length
    is the law's mean E[L] (3.80 for SpanBERT's geometric p = 0.2, max_len = 10; 2.0 for MacBERT's explicit
    n-gram law 0.4 / 0.3 / 0.2 / 0.1).

    Bound: with M spans, the mean of their lengths is within z sigma / sqrt(M) of E[L] (CLT, two-sided
    false-failure probability FALSE_FAILURE_PROB). Observed runs differ from spans only by
    (a) the last span of a row, cut by the budget (at most max_len - 1 tokens lost per row), and
    (b) spans touching an earlier run: a new span of length <= max_len touches one only if its anchor
    falls within max_len + run length of a run, a fraction tau <= rate (max_len + 2) of the positions;
    each such span removes at most 2 runs' worth of count (it creates none and may merge two).
    Hence  E[L] - zs - (max_len - 1) B / M  <=  mean run  <=  (E[L] + zs) / (1 - 2 tau).
    Catches: L off by one either way (mean 2.8 / 4.8), no truncation (5.0), constant lengths.
    """
    backend = fast_backend()
    if backend == "reference":
        pytest.skip("needs the C++ backend for 2M tokens (the reference backend is too slow)")
    rate = 0.005
    B, S = 32, 65536
    ids = random_ids(rng_for("span runs"), B, S)
    kw = dict(COMMON, mlm_probability=rate, span_lengths=law, seed=14)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = as_np(labels) != -100
    k = budget(S * fx(np.float32(rate)))
    assert (sel.sum(axis=1) == k).all()
    runs = [r for b in range(B) for r in _runs(sel[b])]
    pmf = np.asarray(span_pmf_model(*law) if isinstance(law[1], int) else law)
    max_len = pmf.size
    L = np.arange(1, max_len + 1)
    mean_L = float((L * pmf).sum())
    sigma = math.sqrt(float((L ** 2 * pmf).sum()) - mean_L ** 2)
    M = sel.sum() / mean_L  # number of spans (estimate)
    from scipy.stats import norm
    zs = float(norm.isf(FALSE_FAILURE_PROB / 2)) * sigma / math.sqrt(M)
    tau = rate * (max_len + 2)
    lo = mean_L - zs - (max_len - 1) * B / M
    hi = (mean_L + zs) / (1 - 2 * tau)
    mean_run = float(np.mean(runs))
    assert lo <= mean_run <= hi, f"mean run length {mean_run:.3f} outside [{lo:.3f}, {hi:.3f}] (E[L] = {mean_L:.3f})"


def test_stat_span_positions_uniform():
    """Spans start anywhere: at a moderate rate every position is selected about equally often
    (chi-square over 8 position bins; the row ends are excluded because spans are cut there)."""
    backend = fast_backend()
    B, S = (512, 256) if backend != "reference" else (64, 256)
    ids = random_ids(rng_for("span uniform"), B, S)
    kw = dict(COMMON, mlm_probability=0.1, span_lengths=True, seed=15)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    sel = as_np(labels) != -100
    inner = sel[:, 16:S - 16].sum(axis=0)
    bins = inner.reshape(8, -1).sum(axis=1)
    # selections are clustered (spans), so cell counts are over-dispersed relative to the multinomial
    # model; compare the count of span *starts* instead: a run start is where sel goes 0 -> 1.
    starts = sel[:, 1:] & ~sel[:, :-1]
    st = starts[:, 16:S - 16].sum(axis=0).reshape(8, -1).sum(axis=1)
    assert_chisquare(st, np.full(8, 1 / 8), what="span run starts over 8 position bins")
    assert bins.min() > 0
