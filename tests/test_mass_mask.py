"""``mass_mask`` (docs/MASKING.md, "MASS").

* every backend equals the independent spec model (masking_model.model_mass_mask) bit for bit, and the
  backends equal each other on a larger batch;
* the MASS invariants hold, judged from the outputs alone (not from the model);
* the (mask, random, keep) shares follow ``pred_probs`` and fragment starts are uniform over the valid
  starts (binomial / chi-square bounds at helpers.FALSE_FAILURE_PROB);
* determinism: a pure function of the inputs, seed, step and sample keys.

Shapes are small where the reference backend (NumPy) runs; statistics use the fastest backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import (
    CLS_ID,
    MASK_ID,
    SEP_ID,
    SPECIAL_IDS,
    assert_binomial,
    assert_chisquare,
    assert_equal,
    backends_to_test,
    fast_backend,
    make_batch,
    random_ids,
    require_backend,
    rng_for,
    run_backend,
)
from masking_checks import COMMON, permute_row_kwargs, replacement_shares
from masking_model import as_np, fx, model_mass_mask

masklm = pytest.importorskip("masklm_kernels")
mass_mask = masklm.mass_mask

#: An id no input factory produces (ordinary ids start at 5; 0..3 are PAD, CLS, SEP, MASK): a
#: non-default pad_token_id that cannot be confused with an input token.
UNUSED_ID = 4


def _split_by_special(rng, ids, lengths):
    """Rows whose eligible tokens are cut into short runs by CLS / SEP tokens: row 2 alternates special
    and ordinary tokens (every run has length 1), the other rows have a special token at each in-length
    position with probability 0.4."""
    ids = ids.clone()
    B, S = ids.shape
    for b in range(B):
        L = int(lengths[b])
        if b == 2:
            ids[b, 0:L:2] = SEP_ID
            continue
        special = rng.uniform(size=L) < 0.4
        choice = torch.from_numpy(rng.choice([CLS_ID, SEP_ID], size=L)[special]).to(ids.dtype)
        ids[b, :L][torch.from_numpy(special)] = choice
    return ids


CASES = ["default", "no_special", "split_by_special", "int32", "pred_probs_50_30_20", "ratio_one", "ratio_tiny",
         "options"]


def build_case(name: str, B: int, S: int):
    """``(input_ids, kwargs)`` for the named case: fresh random inputs, a zero-length row (row 0), a row of
    length 1 (row 1, a lone CLS unless specials are off) and a full row (the last)."""
    rng = rng_for("mass_mask case", name, B, S)
    bt = make_batch(rng, B, S, one_row=True, dtype=torch.int32 if name == "int32" else torch.int64)
    ids = bt.input_ids
    kw = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), seed=4321, step=6)
    if name == "no_special":
        del kw["special_token_ids"]
    elif name == "split_by_special":
        ids = _split_by_special(rng, ids, bt.lengths)
    elif name == "pred_probs_50_30_20":
        kw.update(pred_probs=(0.5, 0.3, 0.2), fragment_ratio=0.3)
    elif name == "ratio_one":
        kw.update(fragment_ratio=1.0)
    elif name == "ratio_tiny":
        kw.update(fragment_ratio=1e-6)
    elif name == "options":
        kw.update(pad_token_id=UNUSED_ID, ignore_index=-1, fragment_ratio=0.7,
                  sample_ids=torch.from_numpy(rng.integers(0, 2**62, size=B, dtype=np.int64)),
                  seed=torch.tensor(2**40 + 5), step=torch.tensor(2**32 + 3))
    elif name not in ("default", "int32"):
        raise KeyError(name)
    return ids, kw


# ----------------------------------------------------------------------------------------------
# MASS invariants judged from the outputs
# ----------------------------------------------------------------------------------------------

def _longest_run(row: np.ndarray) -> int:
    best = run = 0
    for v in row:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def _mass_eligible(ids, kw) -> np.ndarray:
    """In-length and not a special id (docs/MASKING.md, MASS)."""
    ids_np = as_np(ids).astype(np.int64)
    inside = np.arange(ids_np.shape[1])[None, :] < as_np(kw["lengths"]).astype(np.int64)[:, None]
    return inside & ~np.isin(ids_np, list(kw.get("special_token_ids") or []))


def expected_fragment_length(elig_row: np.ndarray, ratio: float) -> int:
    """``m = max(1, round(ratio * n))`` with the spec's rounding (ratio quantised to 2^-24, halves up),
    clipped to the longest run of eligible tokens; 0 when the row has no eligible token."""
    n = int(elig_row.sum())
    if n == 0:
        return 0
    return min(max(1, (fx(ratio) * n + (1 << 23)) >> 24), _longest_run(elig_row))


def valid_starts(elig_row: np.ndarray, m: int) -> list[int]:
    return [s for s in range(elig_row.shape[0] - m + 1) if m and elig_row[s:s + m].all()]


def check_mass_invariants(ids, kw, outs) -> np.ndarray:
    """Every guarantee of docs/MASKING.md "MASS" that holds for any random draw; returns the (B, S)
    fragment mask. Decoder inputs and labels are compared element by element with the values the spans
    imply, so an element the kernel left unwritten fails too."""
    enc, dec, labels, spans = outs
    B, S = ids.shape
    for name, t in (("encoder_input_ids", enc), ("decoder_input_ids", dec), ("labels", labels)):
        assert t.shape == ids.shape and t.dtype == ids.dtype, f"{name}: {t.dtype} {tuple(t.shape)}, input {ids.dtype}"
    assert spans.shape == (B, 2) and spans.dtype == torch.int64, f"spans: {spans.dtype} {tuple(spans.shape)}"
    ids_np, sp = as_np(ids).astype(np.int64), as_np(spans)
    lengths = as_np(kw["lengths"]).astype(np.int64)
    elig = _mass_eligible(ids, kw)
    frag = np.zeros((B, S), dtype=bool)
    for b in range(B):
        start, end = int(sp[b, 0]), int(sp[b, 1])
        m = expected_fragment_length(elig[b], kw.get("fragment_ratio", 0.5))
        assert 0 <= start <= end <= lengths[b], f"row {b}: span [{start}, {end}) outside [0, {lengths[b]}]"
        assert end - start == m, f"row {b}: fragment length {end - start}, expected {m} (n = {int(elig[b].sum())})"
        if m == 0:
            assert start == 0, f"row {b}: no eligible token but span [{start}, {end})"
        assert elig[b, start:end].all(), f"row {b}: fragment [{start}, {end}) holds an ineligible position"
        frag[b, start:end] = True
    shifted = np.concatenate([np.full((B, 1), kw["mask_token_id"]), ids_np[:, :-1]], axis=1)
    exp_dec = np.where(frag, shifted, kw.get("pad_token_id", 0))
    exp_labels = np.where(frag, ids_np, kw.get("ignore_index", -100))
    assert_equal(dec.to(torch.int64), torch.from_numpy(exp_dec), msg="decoder_input_ids vs the spans")
    assert_equal(labels.to(torch.int64), torch.from_numpy(exp_labels), msg="labels vs the spans")
    enc_np = as_np(enc).astype(np.int64)
    bad = np.argwhere(~frag & (enc_np != ids_np))
    assert bad.size == 0, f"encoder ids changed outside the fragment at {bad[:5].tolist()}"
    v = enc_np[frag]
    ok = (v == kw["mask_token_id"]) | ((v >= 0) & (v < kw["vocab_size"]))
    assert ok.all(), f"fragment encoder ids neither mask nor in [0, {kw['vocab_size']}): {v[~ok][:10]}"
    return frag


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("case", CASES)
def test_invariants(case, backend):
    require_backend(backend)
    ids, kw = build_case(case, 9, 96)
    frag = check_mass_invariants(ids, kw, run_backend(mass_mask, backend, ids, **kw))
    assert frag.any(), "no fragment at all"


@pytest.mark.parametrize("backend", backends_to_test())
def test_fragment_ratio_one_and_tiny(backend):
    """Ratio 1 without special tokens: the fragment is the whole row, so it starts at 0 and the decoder
    input there is the mask id. A tiny ratio: max(1, round(ratio n)) = 1 token per non-empty row."""
    require_backend(backend)
    B, S = 6, 33
    ids = random_ids(rng_for("ratio one"), B, S)
    lengths = torch.tensor([0, 1, 2, 17, 32, 33])
    kw = dict(COMMON, lengths=lengths, fragment_ratio=1.0)
    outs = run_backend(mass_mask, backend, ids, **kw)
    check_mass_invariants(ids, kw, outs)
    assert_equal(outs[3], torch.stack([torch.zeros(B, dtype=torch.int64), lengths], dim=1), msg="ratio 1: spans")
    assert (outs[1][1:, 0] == MASK_ID).all(), f"decoder input at t = 0: {outs[1][:, 0].tolist()}"
    for ratio in (1e-9, 0.01):
        kw = dict(COMMON, lengths=lengths, fragment_ratio=ratio)
        outs = run_backend(mass_mask, backend, ids, **kw)
        check_mass_invariants(ids, kw, outs)
        width = outs[3][:, 1] - outs[3][:, 0]
        assert_equal(width, (lengths > 0).to(torch.int64), msg=f"ratio {ratio}: fragment lengths")


@pytest.mark.parametrize("backend", backends_to_test())
def test_inputs_not_modified(backend):
    require_backend(backend)
    ids, kw = build_case("default", 4, 64)
    dev_ids = ids.to("cuda" if backend == "cuda" else "cpu")
    mass_mask(dev_ids, backend=backend, **{k: (v.to(dev_ids.device) if isinstance(v, torch.Tensor) else v)
                                           for k, v in kw.items()})
    assert_equal(dev_ids.cpu(), ids, msg="input_ids modified in place")


# ----------------------------------------------------------------------------------------------
# Spec model and cross-backend equality
# ----------------------------------------------------------------------------------------------

MODEL_SHAPES = [(5, 1), (5, 7), (5, 113)]


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES)
def test_matches_spec_model(case, shape, backend):
    require_backend(backend)
    ids, kw = build_case(case, *shape)
    outs = run_backend(mass_mask, backend, ids, **kw)
    expected = model_mass_mask(ids, **kw)
    for name, got, exp in zip(("encoder_input_ids", "decoder_input_ids", "labels", "spans"), outs, expected):
        assert_equal(got.to(torch.int64), torch.from_numpy(exp), msg=f"{case}/{backend}: {name} vs spec model")
    assert all(t.dtype == ids.dtype for t in outs[:3]) and outs[3].dtype == torch.int64


@pytest.mark.parametrize("case", ["default", "split_by_special", "pred_probs_50_30_20", "options"])
def test_backends_bit_identical(case):
    backends = backends_to_test()
    for b in backends:
        require_backend(b)
    ids, kw = build_case(case, 16, 512)
    ref = run_backend(mass_mask, "reference", ids, **kw)
    others = {b: run_backend(mass_mask, b, ids, **kw) for b in backends[1:]}
    others["auto"] = mass_mask(ids, **kw)
    for b, outs in others.items():
        for name, got, exp in zip(("encoder_input_ids", "decoder_input_ids", "labels", "spans"), outs, ref):
            assert_equal(got.cpu(), exp, msg=f"{case}: {name} {b} vs reference (16x512)")


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

#: A power of two: the multiply-shift map ``(r * V) >> 32`` then draws every id with probability exactly 1/V.
POW2_VOCAB = 1 << 16


@pytest.mark.parametrize("pred_probs", [(0.8, 0.1, 0.1), (0.5, 0.3, 0.2), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0),
                                        (0.0, 1.0, 0.0)])
def test_stat_pred_probs_shares(pred_probs):
    """Fragment tokens become mask / a random id / stay unchanged with the pred_probs shares. A random id
    equals the mask id or the original with probability 1/V each (originals are never the mask id), so
    the observed outcomes are mask: p_mask + p_rand / V, original: p_keep + p_rand / V, other: the rest."""
    backend = fast_backend()
    B, S = (256, 512) if backend != "reference" else (32, 256)
    bt = make_batch(rng_for("mass shares", pred_probs), B, S)
    kw = dict(mask_token_id=MASK_ID, vocab_size=POW2_VOCAB, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS),
              pred_probs=pred_probs, seed=91)
    outs = run_backend(mass_mask, backend, bt.input_ids, **kw)
    frag = check_mass_invariants(bt.input_ids, kw, outs)
    o, i = as_np(outs[0])[frag], as_np(bt.input_ids)[frag]
    n = int(frag.sum())
    p_mask, p_rand, p_keep = replacement_shares(pred_probs[0], pred_probs[1])
    V = POW2_VOCAB
    observed = {"mask": int((o == MASK_ID).sum()), "original": int((o == i).sum()),
                "other": int(((o != MASK_ID) & (o != i)).sum())}
    probs = {"mask": p_mask + p_rand / V, "original": p_keep + p_rand / V, "other": p_rand * (V - 2) / V}
    for what, k in observed.items():
        assert_binomial(k, n, probs[what], what=f"{what} share of fragment tokens at pred_probs {pred_probs}")


def test_stat_random_ids_uniform():
    """pred_probs (0, 1, 0): every fragment token is a random id, uniform over [0, V) (chi-square over 16
    bins of equal size; V a power of two, so the multiply-shift map is exactly uniform)."""
    backend = fast_backend()
    B, S = (256, 512) if backend != "reference" else (32, 256)
    bt = make_batch(rng_for("mass random ids"), B, S)
    kw = dict(mask_token_id=MASK_ID, vocab_size=POW2_VOCAB, lengths=bt.lengths, pred_probs=(0.0, 1.0, 0.0), seed=92)
    outs = run_backend(mass_mask, backend, bt.input_ids, **kw)
    frag = check_mass_invariants(bt.input_ids, kw, outs)
    n_bins = 16
    counts = np.bincount(as_np(outs[0])[frag] * n_bins // POW2_VOCAB, minlength=n_bins)
    assert_chisquare(counts, np.full(n_bins, 1.0 / n_bins), what="random ids over 16 bins of [0, V)")


#: Rows as (S, length, positions of special tokens, fragment_ratio); the valid starts follow from them.
START_LAYOUTS = {
    # runs 1..11, 13..19, 21..35: n = 33, m = round(0.15 * 33) = 5, 7 + 3 + 11 = 21 valid starts
    "three_runs": (40, 37, (0, 12, 20, 36), 0.15),
    # runs 1..5, 7..11, 13..15: n = 13, m = 13 clipped to the longest run 5: starts 1 and 7
    "clipped_to_longest": (20, 17, (0, 6, 12, 16), 1.0),
    # no special token: n = 29, m = round(14.5) = 15 (halves round up), starts 0..14
    "no_specials": (30, 29, (), 0.5),
}


@pytest.mark.parametrize("layout", list(START_LAYOUTS))
def test_stat_fragment_start_uniform(layout):
    """One row repeated with many sample ids: the start is uniform over the valid starts (the
    multiply-shift map's bias, below V / 2^32, is negligible)."""
    S, length, specials, ratio = START_LAYOUTS[layout]
    row = random_ids(rng_for("mass starts", layout), 1, S)
    row[0, list(specials)] = SEP_ID
    elig = np.arange(S) < length
    elig[list(specials)] = False
    starts = valid_starts(elig, expected_fragment_length(elig, ratio))
    B = 300 * len(starts)
    ids = row.repeat(B, 1)
    kw = dict(COMMON, lengths=torch.full((B,), length), special_token_ids=[SEP_ID], fragment_ratio=ratio,
              sample_ids=torch.arange(B) + 10**9, seed=93)
    outs = run_backend(mass_mask, fast_backend(), ids, **kw)
    check_mass_invariants(ids, kw, outs)
    got = as_np(outs[3])[:, 0]
    assert np.isin(got, starts).all(), f"starts {sorted(set(got) - set(starts))} are not valid starts {starts}"
    counts = np.array([(got == s).sum() for s in starts])
    assert_chisquare(counts, np.full(len(starts), 1.0 / len(starts)), what=f"{layout}: fragment starts")


# ----------------------------------------------------------------------------------------------
# Determinism and sample keys
# ----------------------------------------------------------------------------------------------

def _det_case():
    ids, kw = build_case("split_by_special", 8, 96)
    return ids, dict(kw, sample_ids=torch.arange(8) * 7 + 1000)


def _assert_outputs_equal(got, expected, what):
    for name, g, e in zip(("encoder_input_ids", "decoder_input_ids", "labels", "spans"), got, expected):
        assert_equal(g, e, msg=f"{what}: {name}")


@pytest.mark.parametrize("backend", backends_to_test())
def test_same_call_twice_identical(backend):
    require_backend(backend)
    ids, kw = _det_case()
    _assert_outputs_equal(run_backend(mass_mask, backend, ids, **kw), run_backend(mass_mask, backend, ids, **kw),
                          "two identical calls")


@pytest.mark.parametrize("backend", backends_to_test())
def test_seed_step_and_sample_key_change_result(backend):
    require_backend(backend)
    ids, kw = _det_case()
    base = run_backend(mass_mask, backend, ids, **kw)
    for change in (dict(step=kw["step"] + 1), dict(seed=kw["seed"] + 1), dict(seed=kw["seed"] + 2**32),
                   dict(sample_ids=kw["sample_ids"] + 2**32)):
        other = run_backend(mass_mask, backend, ids, **{**kw, **change})
        assert not (torch.equal(base[0], other[0]) and torch.equal(base[3], other[3])), f"unchanged by {change}"
    same = run_backend(mass_mask, backend, ids, **{**kw, "step": kw["step"] + 2**32})
    _assert_outputs_equal(same, base, "step and step + 2^32 (the counter uses step mod 2^32)")


@pytest.mark.parametrize("backend", backends_to_test())
def test_permuting_rows_with_sample_ids(backend):
    require_backend(backend)
    ids, kw = _det_case()
    B = ids.shape[0]
    base = run_backend(mass_mask, backend, ids, **kw)
    perm = torch.from_numpy(rng_for("mass perm").permutation(B))
    got = run_backend(mass_mask, backend, ids[perm], **permute_row_kwargs(kw, perm, B))
    _assert_outputs_equal(got, tuple(t[perm] for t in base), "rows permuted with their sample ids")


@pytest.mark.parametrize("backend", backends_to_test())
def test_default_sample_key_is_row_index(backend):
    require_backend(backend)
    ids, kw = _det_case()
    del kw["sample_ids"]
    _assert_outputs_equal(run_backend(mass_mask, backend, ids, **kw),
                          run_backend(mass_mask, backend, ids, sample_ids=torch.arange(ids.shape[0]), **kw),
                          "sample_ids=arange(B) vs the default")
