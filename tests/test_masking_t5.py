"""`t5_span_corruption`: every backend gives the same bits; each row is T5's span corruption with T5's
exact counts (checked against an independent NumPy transcription of `random_spans_noise_mask`'s count
logic), the inputs and labels re-assemble the row, sentinels decrease from <extra_id_0>, the first segment
is kept; the segmentation is a uniformly random choice of cut points (chi-square); bad arguments are
refused naming them."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from masklm_kernels import t5_span_corruption
from masklm_kernels.masking import reference

from helpers import assert_backends_identical, assert_chisquare, assert_equal, named_case, require_backend, rng_for

V, SENTINEL, EOS, PAD = 400, 399, 1, 0
COMMON = dict(vocab_size=V, sentinel_start_id=SENTINEL, eos_token_id=EOS, pad_token_id=PAD)


def _hf_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """The counts of Hugging Face's run_t5_mlm_flax.py `random_spans_noise_mask` (from T5), verbatim."""
    num_noise_tokens = int(np.round(length * noise_density))
    num_nonnoise_tokens = length - num_noise_tokens
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(min(num_noise_tokens, num_nonnoise_tokens) / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)
    return num_noise_tokens, num_noise_spans


def test_counts_are_t5s():
    for density, mean in ((0.15, 3.0), (0.5, 1.0), (0.3, 2.5), (0.1, 8.0), (0.25, 2.0)):
        for n in range(2, 700):
            # T5 computes num_nonnoise before clamping num_noise: the spans use the unclamped complement,
            # which differs from n - noise only where the clamp moved noise (n * density < 0.5 or > n - 0.5)
            hf = _hf_counts(n, density, mean)
            ours = reference.t5_counts(n, density, mean)
            assert ours[0] == hf[0], (n, density)
            unclamped = int(np.round(n * density))
            if 1 <= unclamped <= n - 1:
                assert ours == hf, (n, density, mean)


def _case(rng, B=9, S=40, dtype=torch.int64, **kw):
    ids = torch.from_numpy(rng.integers(5, SENTINEL - 100, size=(B, S))).to(dtype)
    lengths = torch.from_numpy(rng.integers(0, S + 1, size=B))
    lengths[:4] = torch.tensor([0, 1, 2, S])
    return ids, dict(COMMON, lengths=lengths, seed=int(rng.integers(2**40)), step=int(rng.integers(1000)), **kw)


CASES = {
    "t5": {},
    "int32": dict(dtype=torch.int32),
    "dense_noise": dict(noise_density=0.5, mean_noise_span_length=1.0),
    "long_spans": dict(noise_density=0.3, mean_noise_span_length=7.5),
    "sample_ids": dict(sample_ids=torch.tensor([9, 2**40, 7, 3, 1, 0, 12, 5, 6])),
    "no_lengths": dict(lengths=None),
    "decoder_start": dict(decoder_start_token_id=3, ignore_index=-1),
}


def _make(name):
    return named_case(_case, CASES[name], rng_for("t5", name))


@pytest.mark.parametrize("case", list(CASES))
def test_backends_are_bit_identical(case):
    ids, kw = _make(case)
    assert_backends_identical(t5_span_corruption, ids, kw, case)


@pytest.mark.parametrize("case", list(CASES))
def test_each_row_is_t5_span_corruption(case):
    ids, kw = _make(case)
    out = t5_span_corruption(ids, **kw, backend="reference")
    B, S = ids.shape
    lengths = kw.get("lengths", torch.full((B,), S))
    density, mean = kw.get("noise_density", 0.15), kw.get("mean_noise_span_length", 3.0)
    start, ignore = kw.get("decoder_start_token_id", PAD), kw.get("ignore_index", -100)
    for b in range(B):
        n = int(lengths[b])
        row = ids[b, :n].tolist()
        e, d = int(out.input_lengths[b]), int(out.label_lengths[b])
        enc, lab = out.input_ids[b, :e].tolist(), out.labels[b, :d].tolist()
        assert enc[-1] == EOS and lab[-1] == EOS
        assert (out.input_ids[b, e:] == PAD).all() and (out.labels[b, d:] == ignore).all()
        assert out.decoder_input_ids[b, :d].tolist() == [start] + lab[:-1]
        assert (out.decoder_input_ids[b, d:] == PAD).all()
        sentinels = [t for t in enc if t > SENTINEL - 100]
        if n < 2:
            assert enc == row + [EOS] and lab == [EOS] and not sentinels
            continue
        noise, spans = _hf_counts(n, density, mean) if 1 <= round(n * density) <= n - 1 else \
            reference.t5_counts(n, density, mean)
        assert sentinels == [SENTINEL - k for k in range(spans)], "one sentinel per span, <extra_id_0> down"
        assert [t for t in lab if t > SENTINEL - 100] == sentinels
        assert len(lab) - spans - 1 == noise and len(enc) - spans - 1 == n - noise, "T5's exact counts"
        assert enc[0] not in sentinels, "the first segment is kept (T5: non-noise first)"
        # re-assemble: each sentinel of the inputs is replaced by its span from the labels
        spans_of = {}
        for t in lab[:-1]:
            if t in sentinels:
                key = t
                spans_of[key] = []
            else:
                spans_of[key].append(t)
        assert all(spans_of[s] for s in sentinels), "noise spans are not empty"
        rebuilt = list(itertools.chain.from_iterable(spans_of[t] if t in spans_of else [t] for t in enc[:-1]))
        assert rebuilt == row
        assert all(enc[i - 1] not in sentinels for i, t in enumerate(enc[:-1]) if t in sentinels and i > 0), \
            "kept segments are not empty"


def test_a_row_is_a_pure_function_of_its_key():
    ids, kw = _make("sample_ids")
    a = t5_span_corruption(ids, **kw, backend="reference")
    perm = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7, 8])
    kw2 = dict(kw, lengths=kw["lengths"][perm], sample_ids=kw["sample_ids"][perm])
    b = t5_span_corruption(ids[perm], **kw2, backend="reference")
    for x, y in zip(a, b):
        assert_equal(x[perm], y, msg="rows follow their sample ids")
    c = t5_span_corruption(ids, **dict(kw, step=kw["step"] + 1), backend="reference")
    assert not torch.equal(a.labels, c.labels), "a new step draws new spans"


def test_segmentation_is_a_uniform_choice_of_cut_points():
    """Choosing 3 of 9 gaps (10 items into 4 segments): each of the C(9, 3) = 84 subsets equally likely
    (chi-square, false-failure probability 1e-6), through the sampler every backend runs."""
    counts = {}
    n = 84 * 60
    for sample in range(n):
        lengths = reference.segmentation(reference.RowRandom(11, 0, sample), reference.T5_NOISE, 10, 4)
        assert len(lengths) == 4 and sum(lengths) == 10 and min(lengths) >= 1
        counts[tuple(lengths)] = counts.get(tuple(lengths), 0) + 1
    subsets = list(itertools.combinations(range(9), 3))
    assert len(subsets) == math.comb(9, 3) and set(counts) <= {
        tuple(np.diff((-1, *s, 9))) for s in subsets}
    observed = [counts.get(tuple(np.diff((-1, *s, 9))), 0) for s in subsets]
    assert_chisquare(observed, [1 / 84] * 84, what="segmentations of 10 items into 4")


@pytest.mark.parametrize("bad, exc, match", [
    (dict(noise_density=0.0), ValueError, "noise_density"),
    (dict(noise_density=1.0), ValueError, "noise_density must be in"),
    (dict(noise_density=float("nan")), ValueError, "noise_density"),
    (dict(mean_noise_span_length=0.5), ValueError, "mean_noise_span_length must be in"),
    (dict(mean_noise_span_length="3"), TypeError, "mean_noise_span_length must be"),
    (dict(sentinel_start_id=0), ValueError, "sentinel_start_id / num_sentinels"),
    (dict(num_sentinels=1), ValueError, "sentinel_start_id / num_sentinels"),
    (dict(sentinel_start_id=V), ValueError, "sentinel_start_id must be"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id must be"),
    (dict(decoder_start_token_id=1.0), TypeError, "decoder_start_token_id must be an int"),
])
def test_bad_arguments_are_named(bad, exc, match):
    ids, kw = _make("t5")
    with pytest.raises(exc, match=match):
        t5_span_corruption(ids, **{**kw, **bad})


def test_the_op_refuses_widths_that_would_overflow():
    """Direct torch.ops callers: output widths below what S allows, or sentinels below 0, are refused by
    the C++ op (never a write outside the buffers)."""
    require_backend("cpu")
    from masklm_kernels.masking.denoising import prepare_t5_args

    ids, kw = _make("t5")
    args = prepare_t5_args(ids, **kw)
    op = torch.ops.masklm_kernels.t5_span_corruption.default
    with pytest.raises(RuntimeError, match="output widths"):
        op(*args._replace(enc_width=args.enc_width - 1))
    with pytest.raises(RuntimeError, match="sentinel ids would go below 0"):
        op(*args._replace(sentinel_start_id=0))


def test_ids_outside_the_vocabulary_are_refused():
    ids, kw = _make("t5")
    ids[1, 3] = V + 5
    with pytest.raises(ValueError, match="input_ids"):
        t5_span_corruption(ids, **kw)
