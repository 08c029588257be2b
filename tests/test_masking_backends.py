"""``mask_tokens``: every backend equals the independent spec model (tests/masking_model.py, written
from docs/MASKING.md) and the backends are bit-identical to each other, for every mode.

Shapes are small because the reference backend is NumPy and the spec model is plain Python.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import (
    MASK_ID,
    SPECIAL_IDS,
    VOCAB_SIZE,
    assert_equal,
    backends_to_test,
    left_pad,
    make_batch,
    require_backend,
    rng_for,
    run_backend,
)
from masking_model import model_mask_tokens

masklm = pytest.importorskip("masklm_kernels")
mask_tokens = masklm.mask_tokens

COMMON = dict(mask_token_id=MASK_ID, vocab_size=VOCAB_SIZE)


def _row_rates(rng, B):
    r = rng.uniform(0.0, 1.0, size=B).astype(np.float32)
    r[: min(B, 3)] = [0.0, 1.0, 0.5][: min(B, 3)]  # rate 0, rate 1, and a middle rate
    return torch.from_numpy(r)


def _token_rates(rng, B, S, zero_frac=0.2):
    r = rng.uniform(0.0, 1.0, size=(B, S)).astype(np.float32)
    r[rng.uniform(size=(B, S)) < zero_frac] = 0.0
    return torch.from_numpy(r)


def _word_split_by_special(rng, B, S):
    """Word ids that repeat across a special token and across a padding gap: per the spec a unit is a
    maximal run of *consecutive eligible* tokens with the same id, so these are two units each."""
    bt = make_batch(rng, B, S)
    wid = bt.word_ids.clone()
    spec = bt.special_tokens_mask.clone()
    ids = bt.input_ids.clone()
    for b in range(B):
        L = int(bt.lengths[b])
        if L >= 10:
            # positions 2..7 are one word id, with a SEP in the middle at 4
            wid[b, 2:8] = 10_000 + b
            ids[b, 4] = 2
            spec[b, 4] = 1
            wid[b, 4] = -1
    return ids, dict(lengths=bt.lengths, special_tokens_mask=spec, word_ids=wid)


def build_case(name: str, B: int, S: int):
    """``(input_ids, kwargs)`` for the named case; fresh random inputs per case."""
    rng = rng_for("mask_tokens case", name, B, S)
    bt = make_batch(rng, B, S)
    ids = bt.input_ids
    base = dict(COMMON, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), seed=1234, step=5)
    if name == "token_float":
        return ids, base
    if name == "token_row_rates":
        return ids, dict(base, mlm_probability=_row_rates(rng, B))
    if name == "token_token_rates":
        return ids, dict(base, mlm_probability=_token_rates(rng, B, S))
    if name == "token_token_rates_float64":
        return ids, dict(base, mlm_probability=_token_rates(rng, B, S).to(torch.float64) * 0.999)
    if name == "exact_float":
        return ids, dict(base, exact=True, mlm_probability=0.3)
    if name == "exact_tiny_rate":  # k = max(round(p n), 1) = 1
        return ids, dict(base, exact=True, mlm_probability=0.001)
    if name == "exact_row_rates":
        return ids, dict(base, exact=True, mlm_probability=_row_rates(rng, B))
    if name == "exact_token_rates":
        return ids, dict(base, exact=True, mlm_probability=_token_rates(rng, B, S))
    if name == "words_bernoulli":
        return ids, dict(base, word_ids=bt.word_ids, mlm_probability=0.3)
    if name == "words_bernoulli_token_rates":
        return ids, dict(base, word_ids=bt.word_ids, mlm_probability=_token_rates(rng, B, S))
    if name == "words_exact":
        return ids, dict(base, word_ids=bt.word_ids, exact=True, mlm_probability=0.3)
    if name == "words_exact_row_rates":
        return ids, dict(base, word_ids=bt.word_ids, exact=True, mlm_probability=_row_rates(rng, B))
    if name == "words_exact_token_rates":
        return ids, dict(base, word_ids=bt.word_ids, exact=True, mlm_probability=_token_rates(rng, B, S))
    if name == "words_split_by_special":
        ids2, kw = _word_split_by_special(rng, B, S)
        return ids2, dict(COMMON, mlm_probability=0.5, seed=3, **kw)
    if name == "span_default":
        return ids, dict(base, span_lengths=True, mlm_probability=0.2)
    if name == "span_custom":
        return ids, dict(base, span_lengths=(0.3, 5), mlm_probability=0.25)
    if name == "span_max_len_1":
        return ids, dict(base, span_lengths=(0.5, 1), mlm_probability=0.25)
    if name == "span_words":
        return ids, dict(base, span_lengths=True, word_ids=bt.word_ids, mlm_probability=0.3)
    if name == "span_row_rates":
        return ids, dict(base, span_lengths=True, mlm_probability=_row_rates(rng, B))
    if name == "span_token_rates":
        return ids, dict(base, span_lengths=(0.2, 6), mlm_probability=_token_rates(rng, B, S))
    if name == "span_ngram_words":  # MacBERT: an explicit law of 1- to 4-grams, counted in words
        return ids, dict(base, span_lengths=(0.4, 0.3, 0.2, 0.1), word_ids=bt.word_ids, mlm_probability=0.2)
    if name == "span_point_law":  # all mass on length 3
        return ids, dict(base, span_lengths=(0.0, 0.0, 1.0), mlm_probability=0.25)
    if name == "span_high_rate":  # exercises the 4n + 64 iteration guard and the fill
        return ids, dict(base, span_lengths=True, mlm_probability=0.97)
    if name == "special_by_mask":
        return ids, dict(COMMON, lengths=bt.lengths, special_tokens_mask=bt.special_tokens_mask)
    if name == "special_by_mask_bool":
        return ids, dict(COMMON, lengths=bt.lengths, special_tokens_mask=bt.special_tokens_mask.bool())
    if name == "special_ids_only":  # no lengths: padding excluded because PAD is a special id
        return ids, dict(COMMON, special_token_ids=list(SPECIAL_IDS), mlm_probability=0.4)
    if name == "special_ids_tensor":
        return ids, dict(COMMON, lengths=bt.lengths, special_token_ids=torch.tensor(SPECIAL_IDS))
    if name == "no_lengths_no_special":
        return ids, dict(COMMON, mlm_probability=0.4)
    if name == "attention_mask_right":
        return ids, dict(COMMON, attention_mask=bt.attention_mask, special_token_ids=list(SPECIAL_IDS))
    if name == "attention_mask_left":
        lp = left_pad(bt)
        return lp.input_ids, dict(COMMON, attention_mask=lp.attention_mask, special_tokens_mask=lp.special_tokens_mask,
                                  word_ids=lp.word_ids, mlm_probability=0.3)
    if name == "attention_mask_left_exact":
        lp = left_pad(bt)
        return lp.input_ids, dict(COMMON, attention_mask=lp.attention_mask.bool(), special_token_ids=list(SPECIAL_IDS),
                                  exact=True, mlm_probability=0.25)
    if name == "sample_ids":
        sid = torch.tensor([7, 0, 2**32 + 3, 2**40 + 11, 123456789, 5, 2**33, 99][:B], dtype=torch.int64)
        return ids, dict(base, sample_ids=sid, mlm_probability=0.3)
    if name == "random_token_range":
        return ids, dict(base, random_token_range=(10, 50), mask_replace_prob=0.3, random_replace_prob=0.6)
    if name == "split_50_30":
        return ids, dict(base, mask_replace_prob=0.5, random_replace_prob=0.3, mlm_probability=0.4)
    if name == "split_100_0":
        return ids, dict(base, mask_replace_prob=1.0, random_replace_prob=0.0)
    if name == "split_0_100":
        return ids, dict(base, mask_replace_prob=0.0, random_replace_prob=1.0)
    if name == "split_0_0":
        return ids, dict(base, mask_replace_prob=0.0, random_replace_prob=0.0)
    if name == "int32_ids":
        return ids.to(torch.int32), dict(base, mlm_probability=0.3)
    if name == "int32_ids_exact_words":
        return ids.to(torch.int32), dict(base, word_ids=bt.word_ids.to(torch.int32), exact=True,
                                         lengths=bt.lengths.to(torch.int32))
    if name == "tensor_seed_step":
        return ids, dict(base, seed=torch.tensor(2**40 + 5), step=torch.tensor(7), mlm_probability=0.3)
    if name == "large_seed_step":
        return ids, dict(base, seed=2**63 - 1, step=2**33 + 3, mlm_probability=0.3)
    if name == "ignore_index_minus_1":
        return ids, dict(base, ignore_index=-1)
    if name == "rate_zero":
        return ids, dict(base, mlm_probability=0.0)
    if name == "rate_one":
        return ids, dict(base, mlm_probability=1.0)
    raise KeyError(name)


CASES = [
    "token_float", "token_row_rates", "token_token_rates", "token_token_rates_float64",
    "exact_float", "exact_tiny_rate", "exact_row_rates", "exact_token_rates",
    "words_bernoulli", "words_bernoulli_token_rates", "words_exact", "words_exact_row_rates",
    "words_exact_token_rates", "words_split_by_special",
    "span_default", "span_custom", "span_max_len_1", "span_words", "span_row_rates", "span_token_rates",
    "span_high_rate", "span_ngram_words", "span_point_law",
    "special_by_mask", "special_by_mask_bool", "special_ids_only", "special_ids_tensor", "no_lengths_no_special",
    "attention_mask_right", "attention_mask_left", "attention_mask_left_exact",
    "sample_ids", "random_token_range", "split_50_30", "split_100_0", "split_0_100", "split_0_0",
    "int32_ids", "int32_ids_exact_words", "tensor_seed_step", "large_seed_step", "ignore_index_minus_1",
    "rate_zero", "rate_one",
]

# (B, S) for the spec-model comparison: odd S, a zero-length row (make_batch), B small.
MODEL_SHAPE = (6, 47)
# Larger shapes for backend-vs-backend equality (the reference backend is still in the loop).
CROSS_SHAPES = [(8, 128), (3, 1), (1, 113)]


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("case", CASES)
def test_mask_tokens_matches_spec_model(case, backend):
    require_backend(backend)
    ids, kw = build_case(case, *MODEL_SHAPE)
    out, labels = run_backend(mask_tokens, backend, ids, **kw)
    exp_out, exp_labels = model_mask_tokens(ids, **kw)
    assert out.dtype == ids.dtype, f"masked_input_ids dtype {out.dtype} != input dtype {ids.dtype}"
    assert out.shape == ids.shape and labels.shape == ids.shape
    assert not labels.dtype.is_floating_point
    assert_equal(out.to(torch.int64), torch.from_numpy(exp_out), msg=f"{case}/{backend}: masked_input_ids vs spec")
    assert_equal(labels.to(torch.int64), torch.from_numpy(exp_labels), msg=f"{case}/{backend}: labels vs spec")


@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES)
def test_mask_tokens_backends_bit_identical(case, shape):
    backends = backends_to_test()
    for b in backends:
        require_backend(b)
    ids, kw = build_case(case, *shape)
    results = {b: run_backend(mask_tokens, b, ids, **kw) for b in backends}
    ref_out, ref_labels = results["reference"]
    for b in backends[1:]:
        out, labels = results[b]
        assert_equal(out, ref_out, msg=f"{case}: masked_input_ids {b} vs reference")
        assert_equal(labels, ref_labels, msg=f"{case}: labels {b} vs reference")


@pytest.mark.parametrize("case", ["token_float", "exact_token_rates", "span_words", "words_bernoulli"])
def test_auto_backend_equals_reference(case):
    ids, kw = build_case(case, 4, 64)
    auto = mask_tokens(ids, **kw)
    ref = mask_tokens(ids, backend="reference", **kw)
    assert_equal(auto[0], ref[0], msg=f"{case}: auto vs reference masked ids")
    assert_equal(auto[1], ref[1], msg=f"{case}: auto vs reference labels")


def test_cpu_backend_bit_identical_large():
    """A larger batch on the C++ backend against the reference backend (all modes in one sweep)."""
    require_backend("cpu")
    for case in ["token_token_rates", "exact_token_rates", "words_exact", "span_words", "span_default"]:
        ids, kw = build_case(case, 16, 512)
        ref = run_backend(mask_tokens, "reference", ids, **kw)
        cpu = run_backend(mask_tokens, "cpu", ids, **kw)
        assert_equal(cpu[0], ref[0], msg=f"{case}: cpu vs reference masked ids (16x512)")
        assert_equal(cpu[1], ref[1], msg=f"{case}: cpu vs reference labels (16x512)")


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_masking_backends import build_case, mask_tokens, run_backend, assert_equal
import masklm_kernels._C as C
assert C.cpu_isa() == {isa!r}, C.cpu_isa()
for case in ["token_float", "token_row_rates", "token_token_rates", "exact_token_rates", "span_words"]:
    ids, kw = build_case(case, 8, 300)
    ref = run_backend(mask_tokens, "reference", ids, **kw)
    cpu = run_backend(mask_tokens, "cpu", ids, **kw)
    assert_equal(cpu[0], ref[0], msg=case + ": masked ids")
    assert_equal(cpu[1], ref[1], msg=case + ": labels")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpu_simd_versions_bit_identical(isa):
    """The CPU backend's Philox has one version per ISA (csrc/masking/philox_simd.cpp); the normal run
    uses the best one, so the others are forced with MASKLM_CPU_ISA in a subprocess."""
    import os
    import subprocess
    import sys

    require_backend("cpu")
    from masklm_kernels import _C

    if isa == "avx2" and _C.cpu_isa() not in ("avx512", "avx2"):
        pytest.skip(f"this CPU has no AVX2 (best version: {_C.cpu_isa()})")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MASKLM_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests_dir, isa=isa)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"MASKLM_CPU_ISA={isa}:\n{r.stdout}\n{r.stderr}"
