"""``mask_tokens`` semantics (docs/MASKING.md): structural invariants on
every backend, rows of length 0 and 1, determinism and sample keys, exact counts, whole words and span
budgets. The statistical tests (binomial / chi-square bounds) are in test_masking_statistics.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import (
    SPECIAL_IDS,
    assert_equal,
    backends_to_test,
    fast_backend,
    left_pad,
    make_batch,
    random_ids,
    require_backend,
    rng_for,
    run_backend,
)
from masking_checks import (
    COMMON,
    check_invariants,
    eligible_of,
    expected_budget,
    permute_row_kwargs,
    units_of,
)
from masking_model import as_np, budget, fx

masklm = pytest.importorskip("masklm_kernels")
mask_tokens = masklm.mask_tokens


# ----------------------------------------------------------------------------------------------
# Invariants on every backend
# ----------------------------------------------------------------------------------------------

INVARIANT_MODES = {
    "token": dict(mlm_probability=0.3),
    "token_rates": "token_rates",
    "exact": dict(mlm_probability=0.3, exact=True),
    "words": dict(mlm_probability=0.3, word_ids="words"),
    "words_exact": dict(mlm_probability=0.3, word_ids="words", exact=True),
    "span": dict(mlm_probability=0.3, span_lengths=True),
    "span_words": dict(mlm_probability=0.3, span_lengths=True, word_ids="words"),
    "range_ignore": dict(mlm_probability=0.5, random_token_range=(17, 23), ignore_index=-1,
                         mask_replace_prob=0.2, random_replace_prob=0.7),
}


def _mode_kwargs(mode, bt, rng):
    spec = INVARIANT_MODES[mode]
    if spec == "token_rates":
        r = rng.uniform(0, 1, size=bt.shape).astype(np.float32)
        r[rng.uniform(size=bt.shape) < 0.3] = 0
        spec = dict(mlm_probability=torch.from_numpy(r))
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), seed=11, step=2)
    for k, v in spec.items():
        kw[k] = bt.word_ids if v == "words" else v
    return kw


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", list(INVARIANT_MODES))
def test_invariants(mode, backend):
    require_backend(backend)
    rng = rng_for("invariants", mode)
    B, S = (8, 128) if backend == "reference" else (32, 300)
    bt = make_batch(rng, B, S, one_row=True)
    kw = _mode_kwargs(mode, bt, rng)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    assert sel.any(), "nothing selected at all"


@pytest.mark.parametrize("backend", backends_to_test())
def test_inputs_not_modified(backend):
    require_backend(backend)
    bt = make_batch(rng_for("inputs not modified"), 4, 64)
    dev = "cuda" if backend == "cuda" else "cpu"
    ids, lengths = bt.input_ids.to(dev), bt.lengths.to(dev)
    for extra in (dict(), dict(word_ids=bt.word_ids.to(dev), exact=True), dict(span_lengths=True)):
        mask_tokens(ids, lengths=lengths, mlm_probability=0.9, backend=backend, **COMMON, **extra)
        assert_equal(ids.cpu(), bt.input_ids, msg=f"input_ids modified in place ({sorted(extra)})")


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", ["bernoulli", "exact", "span", "words", "words_exact", "span_words"])
def test_rows_of_length_zero_and_one(mode, backend):
    """A zero-length row is untouched; a length-1 row at rate 1 (Bernoulli) or any positive rate
    (exact / span: k = max(round(p n), 1) = 1) has its single token selected."""
    require_backend(backend)
    B, S = 4, 5
    ids = random_ids(rng_for("len01", mode), B, S)
    lengths = torch.tensor([0, 1, 0, 1])
    word_ids = torch.tensor([[0, 1, 2, 3, 4]] * B)
    kw = dict(COMMON, lengths=lengths, seed=3)
    if mode == "bernoulli":
        kw.update(mlm_probability=1.0)
    elif mode == "exact":
        kw.update(mlm_probability=0.15, exact=True)
    elif mode == "span":
        kw.update(mlm_probability=0.15, span_lengths=True)
    elif mode == "words":
        kw.update(mlm_probability=1.0, word_ids=word_ids)
    elif mode == "words_exact":
        kw.update(mlm_probability=0.15, exact=True, word_ids=word_ids)
    elif mode == "span_words":
        kw.update(mlm_probability=0.15, span_lengths=True, word_ids=word_ids)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    check_invariants(ids, kw, out, labels)
    expected_sel = torch.zeros(B, S, dtype=torch.bool)
    expected_sel[1, 0] = expected_sel[3, 0] = True
    assert_equal(labels != -100, expected_sel, msg=f"{mode}: selection with rows of length 0 and 1")
    # S = 1 batch as well
    kw1 = {k: (v[:, :1] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in kw.items()}
    out1, labels1 = run_backend(mask_tokens, backend, ids[:, :1], **kw1)
    assert_equal(labels1 != -100, expected_sel[:, :1], msg=f"{mode}: selection with S = 1")


@pytest.mark.parametrize("backend", backends_to_test())
def test_rate_zero_and_one(backend):
    require_backend(backend)
    bt = make_batch(rng_for("rate01"), 6, 40)
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS))
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, mlm_probability=0.0, **kw)
    assert_equal(out, bt.input_ids, msg="rate 0 changed ids")
    assert bool((labels == -100).all()), "rate 0 selected tokens"
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, mlm_probability=1.0, **kw)
    elig = eligible_of(bt.input_ids, kw)
    assert_equal(torch.from_numpy(as_np(labels) != -100), torch.from_numpy(elig),
                 msg="rate 1 must select every eligible token")
    # exact at rate 0: nothing; exact at rate 1: everything
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, mlm_probability=0.0, exact=True, **kw)
    assert bool((labels == -100).all()), "exact, rate 0 selected tokens"
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, mlm_probability=1.0, exact=True, **kw)
    assert_equal(torch.from_numpy(as_np(labels) != -100), torch.from_numpy(elig), msg="exact, rate 1")


# ----------------------------------------------------------------------------------------------
# Determinism and sample keys
# ----------------------------------------------------------------------------------------------

DET_MODES = {
    "token": dict(mlm_probability=0.3),
    "row_rates": "row_rates",
    "token_rates": "token_rates",
    "exact": dict(mlm_probability=0.3, exact=True),
    "exact_token_rates": "exact_token_rates",
    "words": dict(mlm_probability=0.3, word_ids="words"),
    "words_exact": dict(mlm_probability=0.3, word_ids="words", exact=True),
    "span_words": dict(mlm_probability=0.3, span_lengths=True, word_ids="words"),
}


def _det_batch(mode, B=8, S=96, tag=""):
    rng = rng_for("det", mode, tag)
    bt = make_batch(rng, B, S)
    spec = DET_MODES[mode]
    kw = dict(COMMON, lengths=bt.lengths, special_tokens_mask=bt.special_tokens_mask, seed=2024, step=3)
    if spec == "row_rates":
        kw["mlm_probability"] = torch.from_numpy(rng.uniform(0.1, 0.9, size=B).astype(np.float32))
    elif spec in ("token_rates", "exact_token_rates"):
        kw["mlm_probability"] = torch.from_numpy(rng.uniform(0.0, 0.8, size=(B, S)).astype(np.float32))
        kw["exact"] = spec == "exact_token_rates"
    else:
        for k, v in spec.items():
            kw[k] = bt.word_ids if v == "words" else v
    return bt, kw


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", list(DET_MODES))
def test_same_call_twice_identical(mode, backend):
    require_backend(backend)
    bt, kw = _det_batch(mode)
    a = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    b = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    assert_equal(a[0], b[0], msg=f"{mode}: masked ids differ between two identical calls")
    assert_equal(a[1], b[1], msg=f"{mode}: labels differ between two identical calls")


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", list(DET_MODES))
def test_step_and_seed_change_result(mode, backend):
    require_backend(backend)
    bt, kw = _det_batch(mode)
    base = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    for change in (dict(step=kw["step"] + 1), dict(seed=kw["seed"] + 1), dict(seed=kw["seed"] + 2**32),
                   dict(step=kw["step"] + 2**32 - 1)):
        other = run_backend(mask_tokens, backend, bt.input_ids, **{**kw, **change})
        assert not torch.equal(base[1], other[1]), f"{mode}: selection unchanged by {change}"


@pytest.mark.parametrize("backend", backends_to_test())
def test_step_mod_2_32(backend):
    """The counter uses ``step mod 2^32``: step and step + 2^32 give the same masks."""
    require_backend(backend)
    bt, kw = _det_batch("token")
    a = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    b = run_backend(mask_tokens, backend, bt.input_ids, **{**kw, "step": kw["step"] + 2**32})
    assert_equal(a[1], b[1], msg="step and step + 2^32 differ")


@pytest.mark.parametrize("backend", backends_to_test())
def test_tensor_seed_step_equal_int(backend):
    require_backend(backend)
    bt, kw = _det_batch("exact_token_rates")
    a = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    for dt in (torch.int64, torch.int32):
        kwt = {**kw, "seed": torch.tensor(kw["seed"], dtype=dt), "step": torch.tensor(kw["step"], dtype=dt)}
        b = run_backend(mask_tokens, backend, bt.input_ids, **kwt)
        assert_equal(a[0], b[0], msg=f"tensor ({dt}) seed/step vs int: masked ids")
        assert_equal(a[1], b[1], msg=f"tensor ({dt}) seed/step vs int: labels")


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", list(DET_MODES))
def test_permuting_rows_with_sample_ids(mode, backend):
    """Rows permuted together with their sample ids give permuted outputs."""
    require_backend(backend)
    bt, kw = _det_batch(mode)
    B = bt.shape[0]
    sid = torch.tensor([1000 + 7 * b for b in range(B)], dtype=torch.int64)
    kw = dict(kw, sample_ids=sid)
    base = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    perm = torch.from_numpy(rng_for("perm", mode).permutation(B))
    kwp = permute_row_kwargs(kw, perm, B)
    got = run_backend(mask_tokens, backend, bt.input_ids[perm], **kwp)
    assert_equal(got[0], base[0][perm], msg=f"{mode}: permuted masked ids")
    assert_equal(got[1], base[1][perm], msg=f"{mode}: permuted labels")


@pytest.mark.parametrize("backend", backends_to_test())
def test_default_sample_key_is_row_index(backend):
    require_backend(backend)
    bt, kw = _det_batch("exact")
    B = bt.shape[0]
    a = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    b = run_backend(mask_tokens, backend, bt.input_ids, sample_ids=torch.arange(B), **kw)
    assert_equal(a[1], b[1], msg="sample_ids=arange(B) differs from the default")


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", list(DET_MODES))
def test_row_independent_of_batch_slot_and_neighbours(mode, backend):
    """A row's result depends only on its own inputs and sample key: the same row (sample id 424242)
    processed in a different batch, at a different slot, next to different rows, is bit-identical."""
    require_backend(backend)
    bt1, kw1 = _det_batch(mode, B=8, tag="one")
    bt2, kw2 = _det_batch(mode, B=5, tag="two")
    src, dst = 2, 4
    sid1 = torch.arange(8) + 10
    sid2 = torch.arange(5) + 50
    sid1[src] = sid2[dst] = 424242
    ids2 = bt2.input_ids.clone()
    ids2[dst] = bt1.input_ids[src]
    kw2 = dict(kw2)
    for k, v in kw1.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 8:
            t = kw2[k].clone()
            t[dst] = v[src]
            kw2[k] = t
    a = run_backend(mask_tokens, backend, bt1.input_ids, **dict(kw1, sample_ids=sid1))
    b = run_backend(mask_tokens, backend, ids2, **dict(kw2, sample_ids=sid2))
    assert_equal(b[0][dst], a[0][src], msg=f"{mode}: row moved to another batch/slot: masked ids")
    assert_equal(b[1][dst], a[1][src], msg=f"{mode}: row moved to another batch/slot: labels")


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("mode", ["token", "exact", "words_exact", "span_words", "exact_token_rates"])
def test_row_independent_of_padding_width(mode, backend):
    """Nothing in the algorithm depends on S: the same rows padded to a wider batch give the same
    outputs on the common positions and leave the extra padding untouched."""
    require_backend(backend)
    bt, kw = _det_batch(mode, B=6, S=64)
    extra = 37
    wide = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            fill = {"special_tokens_mask": 1, "word_ids": -1}.get(k, 0)
            wide[k] = torch.cat([v, torch.full((v.shape[0], extra), fill, dtype=v.dtype)], dim=1)
        else:
            wide[k] = v
    ids_wide = torch.cat([bt.input_ids, torch.zeros(6, extra, dtype=bt.input_ids.dtype)], dim=1)
    a = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    b = run_backend(mask_tokens, backend, ids_wide, **wide)
    assert_equal(b[0][:, :64], a[0], msg=f"{mode}: wider padding changed masked ids")
    assert_equal(b[1][:, :64], a[1], msg=f"{mode}: wider padding changed labels")
    assert bool((b[1][:, 64:] == -100).all()) and torch.equal(b[0][:, 64:], ids_wide[:, 64:])


@pytest.mark.parametrize("backend", backends_to_test())
def test_attention_mask_equals_lengths(backend):
    """attention_mask (right padding) and lengths define the same rows; left padding shifts positions,
    so it is checked for the invariants and for the selected count in exact mode."""
    require_backend(backend)
    bt = make_batch(rng_for("attn vs lengths"), 8, 70)
    kw = dict(COMMON, special_token_ids=list(SPECIAL_IDS), mlm_probability=0.3, seed=4)
    a = run_backend(mask_tokens, backend, bt.input_ids, lengths=bt.lengths, **kw)
    b = run_backend(mask_tokens, backend, bt.input_ids, attention_mask=bt.attention_mask, **kw)
    c = run_backend(mask_tokens, backend, bt.input_ids, attention_mask=bt.attention_mask.bool(), **kw)
    assert_equal(b[1], a[1], msg="attention_mask vs lengths")
    assert_equal(c[1], a[1], msg="bool attention_mask vs lengths")
    lp = left_pad(bt)
    kwl = dict(kw, attention_mask=lp.attention_mask, exact=True)
    out, labels = run_backend(mask_tokens, backend, lp.input_ids, **kwl)
    sel = check_invariants(lp.input_ids, kwl, out, labels)
    elig = eligible_of(lp.input_ids, kwl)
    for r in range(8):
        n = int(elig[r].sum())
        assert sel[r].sum() == budget(n * fx(np.float32(0.3))), f"left padding, row {r}"


@pytest.mark.parametrize("backend", [b for b in backends_to_test() if b != "cuda"])
def test_no_global_rng_state_used(backend):
    """Randomness comes only from (seed, step, sample key, position): the global RNGs are neither
    read nor advanced."""
    require_backend(backend)
    bt, kw = _det_batch("span_words")
    torch.manual_seed(1)
    np.random.seed(1)
    a = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    state_t, state_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    b = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    assert torch.equal(torch.get_rng_state(), state_t), "torch's global RNG advanced"
    assert np.array_equal(np.random.get_state()[1], state_np), "numpy's global RNG advanced"
    torch.manual_seed(12345)
    np.random.seed(12345)
    c = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    assert_equal(a[1], b[1], msg="two calls")
    assert_equal(a[1], c[1], msg="result depends on the global seed")


# ----------------------------------------------------------------------------------------------
# exact=True
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("rate_kind", ["float", "row", "token"])
def test_exact_count(rate_kind, backend):
    """Token units: exactly k = round(mean rate x n_eligible) per row (the spec's integer formula), at
    least 1 when the rate is positive and the row has an eligible token."""
    require_backend(backend)
    B, S = (12, 100) if backend == "reference" else (48, 333)
    rng = rng_for("exact count", rate_kind)
    bt = make_batch(rng, B, S, one_row=True)
    if rate_kind == "float":
        p = 0.15
        rates = np.full((B, S), np.float32(p))
    elif rate_kind == "row":
        r = rng.uniform(0, 1, size=B).astype(np.float32)
        r[2] = 0.0
        r[3] = 1e-4  # k = max(round(tiny), 1) = 1
        p = torch.from_numpy(r)
        rates = np.repeat(r[:, None], S, axis=1)
    else:
        rates = rng.uniform(0, 1, size=(B, S)).astype(np.float32)
        rates[rng.uniform(size=(B, S)) < 0.3] = 0.0
        rates[2] = 0.0
        rates[3] = 0.0
        rates[3, :3] = 1e-4
        p = torch.from_numpy(rates)
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), mlm_probability=p, exact=True, seed=6)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    for b in range(B):
        n = int(elig[b].sum())
        k = expected_budget(rates[b], elig[b])
        mean = float(rates[b][elig[b]].astype(np.float64).mean()) if n else 0.0
        # the spec's integer formula is round(mean * n) (up to the 2^-24 quantisation)
        assert abs(k - max(round(mean * n), 1 if mean * n > 0 else 0)) <= 1
        if n and mean > 0:
            assert k >= 1
        assert int(sel[b].sum()) == k, f"row {b}: {int(sel[b].sum())} selected, expected k = {k} (n = {n})"
        if rate_kind == "token":
            assert not (sel[b] & (rates[b] == 0)).any(), f"row {b}: a token of rate 0 was selected"


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("rate_kind", ["float", "row"])
def test_exact_words_count(rate_kind, backend):
    """Word units follow the budget rule of Hugging Face's whole-word collator (v4
    `DataCollatorForWholeWordMask`: words in random order, one that would exceed the budget skipped):
    never more than k tokens, and no unselected word would still fit (each is longer than what is left
    of the budget) -- the sets that rule can return, whatever its order. On average the rows get close
    to the rate from below."""
    require_backend(backend)
    B, S = (10, 100) if backend == "reference" else (48, 300)
    rng = rng_for("exact words", rate_kind)
    bt = make_batch(rng, B, S, one_row=True)
    if rate_kind == "float":
        p = 0.2
        rates = np.full((B, S), np.float32(p))
    else:
        r = rng.uniform(0, 1, size=B).astype(np.float32)
        p = torch.from_numpy(r)
        rates = np.repeat(r[:, None], S, axis=1)
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), word_ids=bt.word_ids,
              mlm_probability=p, exact=True, seed=6)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    units = units_of(bt.input_ids, kw)
    total_k = total_count = 0
    for b in range(B):
        k = expected_budget(rates[b], elig[b])
        count = int(sel[b].sum())
        assert count <= k, f"row {b}: {count} tokens selected, over the budget k = {k}"
        left_out = [ln for f, ln in units[b] if not sel[b, f]]
        assert all(ln > k - count for ln in left_out), \
            f"row {b}: {count} of k = {k} selected, yet an unselected word of length {min(left_out)} fits"
        total_k, total_count = total_k + k, total_count + count
    assert total_count >= 0.9 * total_k, f"{total_count} tokens selected for a budget of {total_k}"


# ----------------------------------------------------------------------------------------------
# Whole words
# ----------------------------------------------------------------------------------------------

def test_word_rate_is_rate_of_first_token():
    """A unit's rate is rate(f) of its first position: words whose first token has rate 1 are always
    selected (entirely), words whose first token has rate 0 never, whatever the other tokens' rates."""
    backend = fast_backend()
    B, S = 16, 128
    bt = make_batch(rng_for("word first rate"), B, S)
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), word_ids=bt.word_ids)
    units = units_of(bt.input_ids, kw)
    rates = np.zeros((B, S), dtype=np.float32)
    want = np.zeros((B, S), dtype=bool)
    for b, us in enumerate(units):
        for i, (f, ln) in enumerate(us):
            if i % 2 == 0:
                rates[b, f] = 1.0       # first token rate 1, the rest 0
                want[b, f:f + ln] = True
            else:
                rates[b, f + 1:f + ln] = 1.0  # first token 0, the rest 1
    kw["mlm_probability"] = torch.from_numpy(rates)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    assert_equal(torch.from_numpy(sel), torch.from_numpy(want), msg="word selection follows rate(first token)")


@pytest.mark.parametrize("backend", backends_to_test())
def test_word_units_are_maximal_runs(backend):
    """A word id repeated after a special token or a -1 gap forms separate units; consecutive tokens
    with equal id form one unit. Checked at rate 1 (every unit) with exact=True and k small."""
    require_backend(backend)
    ids = random_ids(rng_for("maximal runs"), 1, 12)
    ids[0, 4] = SEP_ID = 2
    word_ids = torch.tensor([[0, 0, 5, 5, 5, 5, -1, 5, 7, 7, 7, 7]])
    kw = dict(COMMON, special_token_ids=[SEP_ID], word_ids=word_ids, mlm_probability=0.3, seed=1)
    units = units_of(ids, kw)[0]
    assert units == [(0, 2), (2, 2), (5, 1), (7, 1), (8, 4)]
    for seed in range(40):
        out, labels = run_backend(mask_tokens, backend, ids, **dict(kw, seed=seed))
        check_invariants(ids, kw, out, labels)  # all-or-none per unit, nothing at 4 or 6


# ----------------------------------------------------------------------------------------------
# Span masking
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("rate", [0.15, 0.5, "row"])
def test_span_budget_token_units(rate, backend):
    """Token units: span masking selects exactly k = round(p n) tokens per row."""
    require_backend(backend)
    B, S = (10, 100) if backend == "reference" else (48, 400)
    rng = rng_for("span budget", rate)
    bt = make_batch(rng, B, S, one_row=True)
    if rate == "row":
        r = rng.uniform(0, 1, size=B).astype(np.float32)
        p, rates = torch.from_numpy(r), np.repeat(r[:, None], S, axis=1)
    else:
        p, rates = rate, np.full((B, S), np.float32(rate))
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), span_lengths=True,
              mlm_probability=p, seed=12)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    for b in range(B):
        k = expected_budget(rates[b], elig[b])
        assert int(sel[b].sum()) == k, f"row {b}: {int(sel[b].sum())} selected, budget k = {k}"


@pytest.mark.parametrize("backend", backends_to_test())
def test_span_words_never_cut_a_word(backend):
    """Word units: all-or-none words, k <= count < k + (longest selected word)."""
    require_backend(backend)
    B, S = (10, 100) if backend == "reference" else (48, 400)
    bt = make_batch(rng_for("span words"), B, S, one_row=True)
    kw = dict(COMMON, lengths=bt.lengths, special_tokens_mask=bt.special_tokens_mask, word_ids=bt.word_ids,
              span_lengths=(0.2, 10), mlm_probability=0.3, seed=13)
    out, labels = run_backend(mask_tokens, backend, bt.input_ids, **kw)
    sel = check_invariants(bt.input_ids, kw, out, labels)
    elig = eligible_of(bt.input_ids, kw)
    units = units_of(bt.input_ids, kw)
    for b in range(B):
        k = budget(int(elig[b].sum()) * fx(np.float32(0.3)))
        count = int(sel[b].sum())
        chosen = [ln for f, ln in units[b] if sel[b, f]]
        assert count >= k
        if k:
            assert count - max(chosen) < k, f"row {b}: count {count}, k {k}, words {chosen}"

