"""`bart_infill`: every backend gives the same bits; each row is BART's text infilling (first and last
tokens kept, the row's non-masked tokens in order, lengths as replace_length says, the budget of
ceil((n - 2) x mask_ratio) tokens met on long rows); the span lengths follow Poisson(lambda)
(chi-square through the sampler every backend runs); decoder inputs and labels; bad arguments are
refused naming them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from masklm_kernels import bart_infill
from masklm_kernels.masking import reference

from helpers import assert_backends_identical, assert_chisquare, named_case, require_backend, rng_for

V, MASK, BOS, EOS, PAD, START = 300, 4, 1, 2, 0, 2
COMMON = dict(vocab_size=V, mask_token_id=MASK, decoder_start_token_id=START, pad_token_id=PAD)


def _case(rng, B=9, S=40, dtype=torch.int64, **kw):
    ids = torch.from_numpy(rng.integers(10, V, size=(B, S))).to(dtype)
    lengths = torch.from_numpy(rng.integers(0, S + 1, size=B))
    lengths[:5] = torch.tensor([0, 1, 2, 3, S])
    ids[:, 0] = BOS
    return ids, dict(COMMON, lengths=lengths, seed=int(rng.integers(2**40)), step=int(rng.integers(1000)), **kw)


CASES = {
    "bart": {},
    "delete": dict(replace_length=0),
    "mask_each": dict(replace_length=-1),
    "random": dict(random_ratio=0.4, random_token_range=(10, V)),
    "int32": dict(dtype=torch.int32),
    "long_spans": dict(poisson_lambda=9.5, mask_ratio=0.6),
    "short_spans": dict(poisson_lambda=0.3, mask_ratio=1.0),  # mostly zero lengths: insertions
    "sample_ids": dict(sample_ids=torch.tensor([9, 2**40, 7, 3, 1, 0, 12, 5, 6])),
    "no_lengths": dict(lengths=None),
}


def _make(name):
    return named_case(_case, CASES[name], rng_for("bart", name))


@pytest.mark.parametrize("case", list(CASES))
def test_backends_are_bit_identical(case):
    ids, kw = _make(case)
    assert_backends_identical(bart_infill, ids, kw, case)


@pytest.mark.parametrize("case", list(CASES))
def test_each_row_is_text_infilling(case):
    ids, kw = _make(case)
    out = bart_infill(ids, **kw, backend="cpu" if case != "int32" else "reference")
    B, S = ids.shape
    lengths = kw.get("lengths", torch.full((B,), S))
    rl, ratio = kw.get("replace_length", 1), kw.get("mask_ratio", 0.3)
    random = kw.get("random_ratio", 0.0) > 0
    assert out.input_ids.shape[1] == S + math.ceil((S - 2) * ratio)
    for b in range(B):
        n = int(lengths[b])
        row = ids[b, :n].tolist()
        m = int(out.input_lengths[b])
        got = out.input_ids[b, :m].tolist()
        assert (out.input_ids[b, m:] == PAD).all()
        assert out.labels[b, :n].tolist() == row and (out.labels[b, n:] == -100).all()
        assert out.decoder_input_ids[b, :n].tolist() == ([START] + row[:-1])[:n]
        assert int(out.label_lengths[b]) == n
        if n < 3:
            assert got == row
            continue
        assert got[0] == row[0] and got[-1] == row[-1], "BOS and EOS are never masked"
        if random:
            continue
        kept = [t for t in got if t != MASK]
        it = iter(row)
        assert all(t in it for t in kept), "the unmasked tokens are the row's, in order"
        k = math.ceil((n - 2) * ratio)
        masks = m - len(kept)
        deleted = n - len(kept)
        if rl == 0:
            assert masks <= k and deleted <= k  # only insertions are masks
        if rl == -1:
            assert m >= n and masks - (m - n) == deleted, "every covered token became a mask"


def test_long_rows_meet_the_budget():
    """With replace_length -1 every covered token is a mask and every insertion adds one: on long rows the
    masks are the budget k = ceil((n - 2) x 0.3) minus what overlapping or clipped spans lose (about 10%:
    a span starting inside another, as in fairseq)."""
    rng = rng_for("bart budget")
    ids = torch.from_numpy(rng.integers(10, V, size=(16, 2048)))
    out = bart_infill(ids, **COMMON, replace_length=-1, seed=5)
    masks = (out.input_ids == MASK).sum(1).double()
    k = math.ceil(2046 * 0.3)
    assert (masks <= k).all() and (masks >= 0.8 * k).all(), masks.tolist()


def test_span_lengths_are_poisson():
    """L = #{k : threshold_k <= u}, the kernels' inverse CDF, on Philox words: Poisson(lambda) (chi-square,
    false-failure probability 1e-6; cells below 5 expected pooled)."""
    n = 200_000
    for lam in (3.0, 0.7, 12.0):
        thresholds = np.asarray(reference.poisson_cdf_thresholds(lam), dtype=np.uint64)
        u = reference.RowRandom(31, 0, 0).draw(reference.BART_LENGTH, np.arange(n, dtype=np.uint64))[0]
        draws = np.searchsorted(thresholds, u, side="right")
        pmf = np.asarray([math.exp(-lam) * lam ** k / math.factorial(k) for k in range(64)])
        pmf[-1] += 1 - pmf.sum()
        assert_chisquare(np.bincount(draws, minlength=64)[:64], pmf, what=f"Poisson({lam}) span lengths")


@pytest.mark.parametrize("bad, exc, match", [
    (dict(mask_ratio=0.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=1.5), ValueError, "mask_ratio"),
    (dict(poisson_lambda=0.0), ValueError, "poisson_lambda must be in"),
    (dict(poisson_lambda=17.0), ValueError, "poisson_lambda must be in"),
    (dict(poisson_lambda="3"), TypeError, "poisson_lambda must be a float"),
    (dict(replace_length=2), ValueError, "replace_length must be -1"),
    (dict(replace_length=True), ValueError, "replace_length must be -1"),
    (dict(random_ratio=-0.1), ValueError, "random_ratio"),
    (dict(mask_token_id=V), ValueError, "mask_token_id must be"),
    (dict(decoder_start_token_id=-1), ValueError, "decoder_start_token_id must be"),
    (dict(random_token_range=(5, 5)), ValueError, "random_token_range"),
])
def test_bad_arguments_are_named(bad, exc, match):
    ids, kw = _make("bart")
    with pytest.raises(exc, match=match):
        bart_infill(ids, **{**kw, **bad})


def test_the_op_refuses_a_narrow_output():
    require_backend("cpu")
    from masklm_kernels.masking.denoising import prepare_bart_args

    ids, kw = _make("bart")
    args = prepare_bart_args(ids, **kw)
    with pytest.raises(RuntimeError, match="output width"):
        torch.ops.masklm_kernels.bart_infill.default(*args._replace(width=args.width - 1))
