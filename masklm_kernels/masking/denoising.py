"""Encoder-decoder denoising objectives on the device: `t5_span_corruption` (T5) and `bart_infill` (BART).

The same guarantees as `mask_tokens`: validation here, once; every backend (`cuda`, `cpu`, `reference`)
receives the same normalised op arguments (`inputs.T5SpanCorruptionArgs`) and returns the same bits; the
outputs are a pure function of (ids, lengths, seed, step, sample id). Specified in docs/MASKING.md.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .._backends import select_backend
from .._validation import check_int, check_prob, scalar_tensor
from . import ops, reference
from .api import BACKENDS, _check_id_values, _check_ids, _ignore_index, _lengths, _per_row, _replacement
from .inputs import BartInfillArgs, T5SpanCorruptionArgs


class T5Batch(NamedTuple):
    """`t5_span_corruption`'s outputs, padded on the right; widths are the most any row of the input's
    width can need (a function of S and the densities, not of the values: no host synchronisation)."""
    input_ids: torch.Tensor        # (B, We) kept tokens, one sentinel per noise span, EOS; then pad_token_id
    input_lengths: torch.Tensor    # (B,) int64
    decoder_input_ids: torch.Tensor  # (B, Wd) labels shifted right after decoder_start_token_id; then pad
    labels: torch.Tensor           # (B, Wd) each sentinel then its span's tokens, EOS; then ignore_index
    label_lengths: torch.Tensor    # (B,) int64


def prepare_t5_args(input_ids, *, vocab_size, sentinel_start_id, eos_token_id, lengths=None, noise_density=0.15,
                    mean_noise_span_length=3.0, pad_token_id=0, decoder_start_token_id=None, num_sentinels=100,
                    sample_ids=None, seed=0, step=0, ignore_index=-100) -> T5SpanCorruptionArgs:
    """Validate and normalise `t5_span_corruption` arguments into the op's (inputs.py, schema order)."""
    ids = _check_ids(input_ids)
    top = torch.iinfo(ids.dtype).max + 1
    vocab_size = check_int("vocab_size", vocab_size, lo=1, hi=top + 1)
    density = check_prob("noise_density", noise_density, open_low=True)
    if density >= 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if isinstance(mean_noise_span_length, bool) or not isinstance(mean_noise_span_length, numbers.Real):
        raise TypeError(f"mean_noise_span_length must be a float, got {type(mean_noise_span_length).__name__}")
    mean = float(mean_noise_span_length)
    if not 1.0 <= mean < 1e9:
        raise ValueError(f"mean_noise_span_length must be in [1, 1e9) (spans are at least one token), got {mean}")
    sentinel_start_id = check_int("sentinel_start_id", sentinel_start_id, lo=0, hi=vocab_size)
    eos_token_id = check_int("eos_token_id", eos_token_id, lo=0, hi=vocab_size)
    pad_token_id = check_int("pad_token_id", pad_token_id, lo=0, hi=vocab_size)
    start = pad_token_id if decoder_start_token_id is None else decoder_start_token_id
    start = check_int("decoder_start_token_id", start, lo=0, hi=vocab_size)
    num_sentinels = check_int("num_sentinels", num_sentinels, lo=1)
    _check_id_values(ids, vocab_size)
    enc_width, dec_width, most = reference.t5_widths(ids.shape[1], density, mean, lengths is not None)
    if most > num_sentinels or sentinel_start_id - (most - 1) < 0:
        raise ValueError(f"sentinel_start_id / num_sentinels: rows of {ids.shape[1]} tokens can have {most} noise "
                         f"spans, which needs {most} sentinel ids from {sentinel_start_id} down; there are "
                         f"{min(num_sentinels, sentinel_start_id + 1)} (T5 has 100: <extra_id_0> .. <extra_id_99>)")
    return T5SpanCorruptionArgs(
        input_ids=ids, lengths=_lengths(lengths, ids), sample_ids=_per_row("sample_ids", sample_ids, ids),
        seed=scalar_tensor("seed", seed, ids.device), step=scalar_tensor("step", step, ids.device),
        noise_density=density, mean_noise_span_length=mean, sentinel_start_id=sentinel_start_id,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, decoder_start_token_id=start,
        ignore_index=_ignore_index(ignore_index, ids), enc_width=enc_width, dec_width=dec_width)


def t5_span_corruption(input_ids, *, vocab_size, sentinel_start_id, eos_token_id, lengths=None, noise_density=0.15,
                       mean_noise_span_length=3.0, pad_token_id=0, decoder_start_token_id=None, num_sentinels=100,
                       sample_ids=None, seed=0, step=0, ignore_index=-100, backend="auto") -> T5Batch:
    """T5's span corruption (Raffel et al., 2020), with T5's `random_spans_noise_mask` counts, on the device.

    Each row of n tokens (`lengths[b]`, default S; no special-token handling: pass the text's ids, EOS is
    appended) gets exactly `noise = clamp(round(n × noise_density), 1, n - 1)` noise tokens in
    `spans = max(round(min(noise, n - noise) / mean_noise_span_length), 1)` spans (round half to even, as
    NumPy), the noise and the kept tokens each cut into `spans` non-empty segments at uniformly random
    places and interleaved kept-first. Span k is replaced by the sentinel `sentinel_start_id - k` in the
    inputs and announced by it in the labels (T5's `<extra_id_k>`, ids decreasing)::

        row          a b c d e f g h            (noise: c d, g)
        input_ids    a b <X0> e f <X1> h </s>
        labels       <X0> c d <X1> g </s>
        decoder_in   <pad> <X0> c d <X1> g

    Rows shorter than 2 are not corrupted (inputs: the row and EOS; labels: EOS).

    Args:
        input_ids: (B, S) int64 or int32 ids in [0, vocab_size).
        vocab_size, sentinel_start_id (T5: len(tokenizer) - 1, `<extra_id_0>`), eos_token_id, pad_token_id.
        lengths: optional (B,) valid lengths (right padding).
        noise_density: in (0, 1) (T5: 0.15); mean_noise_span_length: >= 1 (T5: 3).
        decoder_start_token_id: first decoder input (default pad_token_id, T5's).
        num_sentinels: how many sentinel ids exist (T5: 100): more spans than that is an error.
        sample_ids, seed, step, ignore_index, backend: as `mask_tokens`.

    Returns a `T5Batch` (input_ids, input_lengths, decoder_input_ids, labels, label_lengths).

    Equivalent NumPy (Hugging Face's run_t5_mlm_flax.py; ours draws the segmentation from Philox)::

        mask = random_spans_noise_mask(n)                       # the counts above, random segmentation
        input_ids = filter_input_ids(ids, create_sentinel_ids(mask)) + [eos]
        labels = filter_input_ids(ids, create_sentinel_ids(~mask)) + [eos]
    """
    args = prepare_t5_args(input_ids, vocab_size=vocab_size, sentinel_start_id=sentinel_start_id,
                           eos_token_id=eos_token_id, lengths=lengths, noise_density=noise_density,
                           mean_noise_span_length=mean_noise_span_length, pad_token_id=pad_token_id,
                           decoder_start_token_id=decoder_start_token_id, num_sentinels=num_sentinels,
                           sample_ids=sample_ids, seed=seed, step=step, ignore_index=ignore_index)
    chosen = select_backend("t5_span_corruption", BACKENDS, backend, args[0].device)
    name = "t5_span_corruption"
    op = ops.reference_op(name) if chosen.name == "reference" else ops.native_op(name)
    return T5Batch(*op(*args))


MAX_POISSON_LAMBDA = 16.0  # the 64-entry CDF table then holds all but < 1e-17 of the law


def prepare_bart_args(input_ids, *, vocab_size, mask_token_id, decoder_start_token_id, lengths=None, mask_ratio=0.3,
                      poisson_lambda=3.0, replace_length=1, random_ratio=0.0, random_token_range=None, pad_token_id=0,
                      sample_ids=None, seed=0, step=0, ignore_index=-100) -> BartInfillArgs:
    """Validate and normalise `bart_infill` arguments into the op's (inputs.py, schema order)."""
    ids = _check_ids(input_ids)
    ratio = check_prob("mask_ratio", mask_ratio, open_low=True)
    if isinstance(poisson_lambda, bool) or not isinstance(poisson_lambda, numbers.Real):
        raise TypeError(f"poisson_lambda must be a float, got {type(poisson_lambda).__name__}")
    lam = float(poisson_lambda)
    if not 0.0 < lam <= MAX_POISSON_LAMBDA:
        raise ValueError(f"poisson_lambda must be in (0, {MAX_POISSON_LAMBDA}], got {poisson_lambda}")
    if isinstance(replace_length, bool) or replace_length not in (-1, 0, 1):
        raise ValueError(f"replace_length must be -1 (replace every masked token), 0 (delete them) or 1 (one "
                         f"token per span), got {replace_length!r}")
    random_ratio = check_prob("random_ratio", random_ratio)
    mask_token_id, t_mask, _, lo, hi = _replacement(1.0 - random_ratio, random_ratio, mask_token_id, vocab_size,
                                                    random_token_range, ids)
    _check_id_values(ids, vocab_size)
    S = ids.shape[1]
    width = S + (math.ceil((S - 2) * ratio) if S >= 3 else 0)
    return BartInfillArgs(
        input_ids=ids, lengths=_lengths(lengths, ids), sample_ids=_per_row("sample_ids", sample_ids, ids),
        seed=scalar_tensor("seed", seed, ids.device), step=scalar_tensor("step", step, ids.device), mask_ratio=ratio,
        poisson_cdf=reference.poisson_cdf_thresholds(lam), replace_length=int(replace_length),
        mask_token_id=mask_token_id, t_mask=t_mask, rand_lo=lo, rand_hi=hi,
        pad_token_id=check_int("pad_token_id", pad_token_id, lo=0, hi=vocab_size),
        decoder_start_token_id=check_int("decoder_start_token_id", decoder_start_token_id, lo=0, hi=vocab_size),
        ignore_index=_ignore_index(ignore_index, ids), width=width)


def bart_infill(input_ids, *, vocab_size, mask_token_id, decoder_start_token_id, lengths=None, mask_ratio=0.3,
                poisson_lambda=3.0, replace_length=1, random_ratio=0.0, random_token_range=None, pad_token_id=0,
                sample_ids=None, seed=0, step=0, ignore_index=-100, backend="auto") -> T5Batch:
    """BART's text infilling (Lewis et al., 2020; fairseq's DenoisingDataset, mask_length="span-poisson"),
    on the device.

    Row b has n = lengths[b] tokens (default S), its first and last (BOS / EOS) never touched. A budget of
    k = ceil((n - 2) × mask_ratio) tokens is split into spans of Poisson(poisson_lambda) lengths (drawn
    until they reach k, the last trimmed); spans of length 0 are insertions. The positive spans start at
    distinct positions chosen uniformly among 1 .. n - 2 and cover their length (not the last token); then,
    with `replace_length` = 1 (BART) each span becomes one `mask_token_id`, 0 deletes it, -1 masks each
    of its tokens; each insertion adds one mask at a uniformly chosen place (never first nor last).
    `random_ratio` of the replaced / inserted tokens get a random id in `random_token_range` instead. The
    row changes length: shorter (spans merged into single masks) or longer (insertions)::

        row        <s> a b c d e f </s>          (spans: b c d, then f; one insertion)
        input_ids  <s> a <mask> e <mask> <mask> </s>
        labels     <s> a b c d e f </s>
        decoder_in <decoder_start> <s> a b c d e f

    Args:
        input_ids: (B, S) int64 or int32 ids in [0, vocab_size); lengths: optional (B,) valid lengths.
        mask_token_id, vocab_size, decoder_start_token_id (BART: EOS), pad_token_id.
        mask_ratio: in (0, 1] (BART: 0.3); poisson_lambda: in (0, 16] (BART: 3).
        replace_length: -1, 0 or 1 (fairseq's); random_ratio: in [0, 1] (fairseq's `mask_random`).
        random_token_range: (low, high) of random ids; default (0, vocab_size).
        sample_ids, seed, step, ignore_index, backend: as `mask_tokens`.

    Returns a `T5Batch` (the encoder-decoder layout both objectives share): input_ids (B, S + k_max)
    padded with pad_token_id, input_lengths, decoder_input_ids (B, S), labels (B, S) (the row, then
    ignore_index), label_lengths. fairseq decides `random_ratio` per span; here per replaced token (the
    same with replace_length 1, where a span leaves one token).
    """
    args = prepare_bart_args(input_ids, vocab_size=vocab_size, mask_token_id=mask_token_id,
                             decoder_start_token_id=decoder_start_token_id, lengths=lengths, mask_ratio=mask_ratio,
                             poisson_lambda=poisson_lambda, replace_length=replace_length, random_ratio=random_ratio,
                             random_token_range=random_token_range, pad_token_id=pad_token_id, sample_ids=sample_ids,
                             seed=seed, step=step, ignore_index=ignore_index)
    chosen = select_backend("bart_infill", BACKENDS, backend, args[0].device)
    op = ops.reference_op("bart_infill") if chosen.name == "reference" else ops.native_op("bart_infill")
    return T5Batch(*op(*args))
