"""Public masking API: `mask_tokens` (dynamic MLM masking) and `mass_mask` (MASS fragments).

Validation and normalisation happen here, once, in Python; every backend then receives the same
normalised op arguments (see `prepare_mask_tokens_args`), which is what makes them bit-identical.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from .. import _ext
from .._backends import Backend, select_backend
from .._validation import check_int, check_prob, check_range, check_tensor, scalar_tensor, values_checkable
from . import ops, reference
from .inputs import MaskTokensArgs, MassMaskArgs

BACKENDS = (
    Backend("cuda", ("cuda",), lambda: _cuda_requirement(), "CUDA C++ kernels (csrc/masking/*.cu)"),
    Backend("cpu", ("cpu",), lambda: _ext.load_error(), "C++ with OpenMP (csrc/masking/masking_cpu.cpp)"),
    Backend("reference", ("cpu", "cuda"), description="NumPy specification (slow; copies to the host)"),
)


def _cuda_requirement() -> str | None:
    if not _ext.available():
        return _ext.load_error()
    if not _ext.has_cuda_kernels():
        return "masklm_kernels._C was built without CUDA (no CUDA toolkit or CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 or int32 tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] >= 2**24:
        raise ValueError(f"input_ids: sequence length must be < 2^24, got {input_ids.shape[1]}")
    return input_ids.contiguous()


def _per_row(name, t, ids, *, integer=True):
    if t is None:
        return None
    check_tensor(name, t, device=ids.device, shape=(ids.shape[0],), integer=integer)
    return t.to(torch.int64).contiguous()


def _per_token_flags(name, t, ids):
    if t is None:
        return None
    check_tensor(name, t, device=ids.device, shape=tuple(ids.shape), integer=True, boolean_ok=True)
    return (t if t.dtype == torch.bool else t != 0).to(torch.uint8).contiguous()


def _lengths(lengths, ids):
    lengths = _per_row("lengths", lengths, ids)
    if lengths is not None:
        check_range("lengths", lengths, 0, ids.shape[1])
    return lengths


def _special_ids(special_token_ids, ids, vocab_size) -> torch.Tensor:
    if special_token_ids is None:
        return torch.empty(0, dtype=torch.int64, device=ids.device)
    if isinstance(special_token_ids, torch.Tensor):
        check_tensor("special_token_ids", special_token_ids, device=ids.device, integer=True)
        if special_token_ids.dim() != 1:
            raise ValueError(f"special_token_ids must be 1-D, got shape {tuple(special_token_ids.shape)}")
        t = special_token_ids.to(torch.int64).contiguous()
        check_range("special_token_ids", t, 0, vocab_size - 1)
        if values_checkable(t) and t.numel() >= vocab_size and t.unique().numel() >= vocab_size:
            raise ValueError(f"special_token_ids covers every id of the vocabulary (vocab_size={vocab_size}): "
                             "no token could ever be masked")
        return t
    if not isinstance(special_token_ids, (list, tuple, set, frozenset)):
        raise TypeError(f"special_token_ids must be a list of ints or a 1-D tensor, got "
                        f"{type(special_token_ids).__name__}")
    vals = tuple(sorted(check_int(f"special_token_ids[{i}]", v, lo=0, hi=vocab_size)
                        for i, v in enumerate(special_token_ids)))
    if len(set(vals)) >= vocab_size:
        raise ValueError(f"special_token_ids covers every id of the vocabulary (vocab_size={vocab_size}): "
                         "no token could ever be masked")
    if torch.compiler.is_compiling():  # traced: a constant of the graph, no cache needed
        return torch.tensor(vals, dtype=torch.int64, device=ids.device)
    return _id_list_tensor(vals, ids.device)


@functools.lru_cache(maxsize=64)
def _id_list_tensor(vals: tuple, device: torch.device) -> torch.Tensor:
    # The same few special-id lists recur every step: building the tensor (and, on a GPU, a blocking
    # copy from pageable host memory) would be most of their cost. Cached per device; the ops only
    # read it (mutates_args=()).
    return torch.tensor(vals, dtype=torch.int64, device=device)


def _rates(mlm_probability, ids) -> torch.Tensor:
    if isinstance(mlm_probability, torch.Tensor):
        check_tensor("mlm_probability", mlm_probability, device=ids.device, floating=True)
        B, S = ids.shape
        if tuple(mlm_probability.shape) not in ((), (B,), (B, S)):
            raise ValueError(f"mlm_probability must be a float, a ({B},) or a ({B}, {S}) tensor, got shape "
                             f"{tuple(mlm_probability.shape)}")
        check_range("mlm_probability", mlm_probability, 0.0, 1.0)
        return mlm_probability.to(torch.float32).contiguous()
    if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, numbers.Real):
        raise TypeError(f"mlm_probability must be a float or a (B,) / (B, S) float torch.Tensor, got "
                        f"{type(mlm_probability).__name__}")
    return torch.scalar_tensor(check_prob("mlm_probability", mlm_probability), dtype=torch.float32)


def _replacement(mask_prob: float, random_prob: float, mask_token_id, vocab_size, random_token_range,
                 ids: torch.Tensor):
    # ids are written into input_ids' dtype: an id that does not fit would be silently truncated
    vocab_size = check_int("vocab_size", vocab_size, lo=1, hi=torch.iinfo(ids.dtype).max + 2)
    mask_token_id = check_int("mask_token_id", mask_token_id, lo=0, hi=vocab_size)
    if mask_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"mask_replace_prob + random_replace_prob must be at most 1, got {mask_prob} + {random_prob}")
    if random_token_range is None:
        lo, hi = 0, vocab_size
    else:
        if not isinstance(random_token_range, (tuple, list)) or len(random_token_range) != 2:
            raise TypeError(f"random_token_range must be a (low, high) pair of ints, got {random_token_range!r}")
        lo = check_int("random_token_range[0]", random_token_range[0], lo=0, hi=vocab_size)
        hi = check_int("random_token_range[1]", random_token_range[1], lo=lo + 1, hi=vocab_size + 1)
    t_mask = min(int(mask_prob * 2**32), 2**32)
    t_rand = min(int(min(mask_prob + random_prob, 1.0) * 2**32), 2**32)
    return mask_token_id, t_mask, max(t_mask, t_rand), lo, hi


def _ignore_index(ignore_index, ids: torch.Tensor) -> int:
    """Labels have input_ids' dtype: ignore_index must fit in it (a larger one would be truncated)."""
    info = torch.iinfo(ids.dtype)
    return check_int(f"ignore_index (labels are {ids.dtype})", ignore_index, lo=info.min, hi=info.max + 1)


def _check_id_values(ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids in [0, vocab_size), checked where that costs no device synchronisation (CPU tensors).
    On a GPU out-of-range ids are not detected; they are copied through (into labels too) and never
    used as an index, so they cannot make a kernel touch memory outside its tensors."""
    if not ids.numel() or not values_checkable(ids):
        return
    # one pass: as unsigned, a negative id is above every vocabulary size. NumPy's max takes ~2.5 us at
    # 32 x 512 where torch.aminmax takes 9 (measured, 2 threads): this runs on every call
    a = ids.numpy()
    if int(a.view(f"uint{8 * a.itemsize}").max()) >= vocab_size:
        check_range("input_ids", ids, 0, vocab_size - 1)  # names the first bad value


MAX_SPAN_LENGTH = 64


def _span_cdf(span_lengths) -> list[int] | None:
    if span_lengths is None or span_lengths is False:
        return None
    if span_lengths is True:
        p, max_len = 0.2, 10  # SpanBERT (Joshi et al., 2020): mean span length 3.8
        return reference.span_cdf_thresholds(p, max_len)
    if not isinstance(span_lengths, (tuple, list)) or not span_lengths:
        raise TypeError(f"span_lengths must be None, True, a (p, max_len) pair or a sequence of float probabilities "
                        f"of lengths 1..n, got {span_lengths!r}")
    second = span_lengths[1] if len(span_lengths) == 2 else None
    if isinstance(second, numbers.Integral) and not isinstance(second, bool):
        p = check_prob("span_lengths[0] (geometric p)", span_lengths[0], open_low=True)
        max_len = check_int("span_lengths[1] (max span length)", span_lengths[1], lo=1, hi=MAX_SPAN_LENGTH + 1)
        return reference.span_cdf_thresholds(p, max_len)
    # an explicit law: P(L = 1), ..., P(L = n) (e.g. MacBERT's n-grams: (0.4, 0.3, 0.2, 0.1))
    if not all(isinstance(q, numbers.Real) and not isinstance(q, numbers.Integral) for q in span_lengths):
        raise TypeError(f"span_lengths: an explicit length law must be a sequence of float probabilities (lengths "
                        f"1..n), a pair (p, max_len) must have an int max_len; got {span_lengths!r}")
    if len(span_lengths) > MAX_SPAN_LENGTH:
        raise ValueError(f"span_lengths: an explicit law must have at most {MAX_SPAN_LENGTH} lengths, "
                         f"got {len(span_lengths)}")
    pmf = [check_prob(f"span_lengths[{i}]", float(q)) for i, q in enumerate(span_lengths)]
    total = math.fsum(pmf)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"span_lengths: the probabilities of lengths 1..{len(pmf)} must sum to 1, got {total!r}")
    return reference.span_cdf_from_pmf([q / total for q in pmf])


def prepare_mask_tokens_args(input_ids, *, mask_token_id, vocab_size, mlm_probability=0.15, mask_replace_prob=0.8,
                             random_replace_prob=0.1, lengths=None, attention_mask=None, special_token_ids=None,
                             special_tokens_mask=None, word_ids=None, span_lengths=None, exact=False,
                             random_token_range=None, sample_ids=None, seed=0, step=0,
                             ignore_index=-100) -> MaskTokensArgs:
    """Validate and normalise `mask_tokens` arguments into the op's arguments (inputs.py, schema order)."""
    ids = _check_ids(input_ids)
    dev = ids.device
    mask_prob = check_prob("mask_replace_prob", mask_replace_prob)
    rand_prob = check_prob("random_replace_prob", random_replace_prob)
    mask_token_id, t_mask, t_rand, lo, hi = _replacement(mask_prob, rand_prob, mask_token_id, vocab_size,
                                                         random_token_range, ids)
    _check_id_values(ids, vocab_size)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    words = None
    if word_ids is not None:
        check_tensor("word_ids", word_ids, device=dev, shape=tuple(ids.shape), integer=True)
        words = word_ids.to(torch.int64).contiguous()
    cdf = _span_cdf(span_lengths)
    mode = reference.MODE_SPAN if cdf is not None else reference.MODE_EXACT if exact else reference.MODE_BERNOULLI
    return MaskTokensArgs(
        input_ids=ids, lengths=_lengths(lengths, ids),
        attention_mask=_per_token_flags("attention_mask", attention_mask, ids),
        special_tokens_mask=_per_token_flags("special_tokens_mask", special_tokens_mask, ids),
        special_token_ids=_special_ids(special_token_ids, ids, vocab_size), word_ids=words,
        rates=_rates(mlm_probability, ids), sample_ids=_per_row("sample_ids", sample_ids, ids),
        seed=scalar_tensor("seed", seed, dev), step=scalar_tensor("step", step, dev), mode=mode, span_cdf=cdf or [],
        mask_token_id=mask_token_id, t_mask=t_mask, t_rand=t_rand, rand_lo=lo, rand_hi=hi,
        ignore_index=_ignore_index(ignore_index, ids))


def mask_tokens(input_ids, *, mask_token_id, vocab_size, mlm_probability=0.15, mask_replace_prob=0.8,
                random_replace_prob=0.1, lengths=None, attention_mask=None, special_token_ids=None,
                special_tokens_mask=None, word_ids=None, span_lengths=None, exact=False, random_token_range=None,
                sample_ids=None, seed=0, step=0, ignore_index=-100, backend="auto"):
    """Dynamic MLM masking on the device: returns `(masked_input_ids, labels)`.

    A pure function of its arguments, `seed`, `step` and each row's sample key (Philox4x32-10; no global
    RNG state is read or advanced); the `cpu`, `cuda` and `reference` backends are bit-identical.
    The algorithm is specified in docs/MASKING.md.

    Args:
        input_ids: (B, S) int64 or int32 token ids.
        mask_token_id: id written for the "mask" share; in [0, vocab_size).
        vocab_size: size of the vocabulary; random replacements come from [0, vocab_size) by default.
        mlm_probability: selection rate: a float, a (B,) tensor (per-row rates) or a (B, S) float tensor
            (per-token rates: conditional masking). Values in [0, 1].
        mask_replace_prob, random_replace_prob: absolute shares of the selected tokens replaced by
            `mask_token_id` / a random id (the rest stay unchanged); sum at most 1. Default 80/10/10.
        lengths: (B,) valid length per row (right padding), or
        attention_mask: (B, S) bool/int, nonzero = real token (any padding side). Both may be given.
        special_token_ids: list or 1-D tensor of ids never selected (e.g. CLS, SEP, PAD).
        special_tokens_mask: (B, S) bool/int, nonzero = never selected.
        word_ids: (B, S) int, word index of each token, -1 for none: whole-word masking (a word is
            selected or not as a unit; tokens with -1 are never selected).
        span_lengths: True (SpanBERT: geometric p=0.2 truncated at 10), (p, max_len) (geometric p truncated
            at max_len <= 64), or an explicit law: a sequence of float probabilities of lengths 1..n (n <= 64;
            MacBERT / ERNIE n-grams: (0.4, 0.3, 0.2, 0.1)): span masking
            up to the row's budget `round(mean rate × eligible)`; spans count words when `word_ids` is given.
        exact: select exactly `round(mean rate × eligible)` tokens per row (at least 1 when the rate is
            positive); with a (B, S) rate, without replacement proportionally to the rates. With
            `word_ids`, never more: a word longer than the rest of the budget is passed over (Hugging
            Face's whole-word rule), so a row may fall short by less than its longest word.
        random_token_range: (low, high) range of random replacement ids; default (0, vocab_size).
        sample_ids: (B,) int sample keys (default: the row index); the same key gives the same mask on
            any rank or batch slot.
        seed, step: Python ints or 0-dim integer tensors (a device tensor `step` can advance inside a
            compiled / CUDA-graph-captured step without recompiling or syncing).
        ignore_index: label of unselected positions.
        backend: "auto" (cuda on CUDA tensors, cpu on CPU tensors), "cuda", "cpu" or "reference".

    Returns:
        masked_input_ids (B, S) and labels (B, S), dtype of `input_ids`.

    Value checks (ranges of `lengths` and rate tensors) read tensor values, so they run on CPU tensors in
    eager mode only: on CUDA tensors (a host sync) and while torch.compile traces, they are skipped and
    the kernels clamp lengths to [0, S] and rates to [0, 1]. Negative `word_ids` all mean "no word".

    Equivalent PyTorch (token mode, up to the random stream)::

        eligible = (torch.arange(S) < lengths[:, None]) & ~special
        selected = eligible & (torch.rand(B, S) < p)
        labels = torch.where(selected, input_ids, ignore_index)
        u = torch.rand(B, S)
        out = torch.where(selected & (u < 0.8), mask_token_id, input_ids)
        out = torch.where(selected & (u >= 0.8) & (u < 0.9), torch.randint(vocab_size, (B, S)), out)
    """
    args = prepare_mask_tokens_args(
        input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size, mlm_probability=mlm_probability,
        mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob, lengths=lengths,
        attention_mask=attention_mask, special_token_ids=special_token_ids, special_tokens_mask=special_tokens_mask,
        word_ids=word_ids, span_lengths=span_lengths, exact=exact, random_token_range=random_token_range,
        sample_ids=sample_ids, seed=seed, step=step, ignore_index=ignore_index)
    chosen = select_backend("mask_tokens", BACKENDS, backend, args[0].device)
    op = ops.reference_op("mask_tokens") if chosen.name == "reference" else ops.native_op("mask_tokens")
    return op(*args)


def prepare_mass_mask_args(input_ids, *, lengths, mask_token_id, vocab_size, fragment_ratio=0.5,
                           pred_probs=(0.8, 0.1, 0.1), pad_token_id=0, special_token_ids=None, sample_ids=None,
                           seed=0, step=0, ignore_index=-100) -> MassMaskArgs:
    """Validate and normalise `mass_mask` arguments into the op's arguments (inputs.py, schema order)."""
    ids = _check_ids(input_ids)
    if lengths is None:
        raise ValueError("lengths is required: a (B,) integer tensor of valid lengths")
    ratio = check_prob("fragment_ratio", fragment_ratio, open_low=True)
    if not isinstance(pred_probs, (tuple, list)) or len(pred_probs) != 3:
        raise TypeError(f"pred_probs must be a (mask, random, keep) triple of floats, got {pred_probs!r}")
    shares = [check_prob(f"pred_probs[{i}]", p) for i, p in enumerate(pred_probs)]
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"pred_probs must sum to 1, got {pred_probs!r} (sum {sum(shares)})")
    mask_token_id, t_mask, t_rand, lo, hi = _replacement(shares[0], shares[1], mask_token_id, vocab_size, None, ids)
    _check_id_values(ids, vocab_size)
    # docs/MASKING.md: the ratio in 2^-24 units (plain Python, so that torch.compile traces it)
    ratio_fx = max(1, math.floor(ratio * 2**24 + 0.5))
    return MassMaskArgs(
        input_ids=ids, lengths=_lengths(lengths, ids),
        special_token_ids=_special_ids(special_token_ids, ids, vocab_size),
        sample_ids=_per_row("sample_ids", sample_ids, ids), seed=scalar_tensor("seed", seed, ids.device),
        step=scalar_tensor("step", step, ids.device), ratio_fx=ratio_fx, mask_token_id=mask_token_id, t_mask=t_mask,
        t_rand=t_rand, rand_lo=lo, rand_hi=hi,
        pad_token_id=check_int("pad_token_id", pad_token_id, lo=0, hi=vocab_size),
        ignore_index=_ignore_index(ignore_index, ids))


def mass_mask(input_ids, *, lengths, mask_token_id, vocab_size, fragment_ratio=0.5, pred_probs=(0.8, 0.1, 0.1),
              pad_token_id=0, special_token_ids=None, sample_ids=None, seed=0, step=0, ignore_index=-100,
              backend="auto"):
    """MASS fragment masking (Song et al., 2019): one contiguous fragment per row.

    Args:
        input_ids: (B, S) int64 or int32 ids; lengths: (B,) valid lengths.
        mask_token_id, vocab_size: as `mask_tokens`.
        fragment_ratio: fragment length `m = max(1, round(ratio × n))`, n the row's eligible tokens; (0, 1].
        pred_probs: (mask, random, keep) shares for the fragment's encoder tokens; sum 1.
        pad_token_id: decoder input outside the fragment.
        special_token_ids: ids never inside the fragment (e.g. CLS, SEP).
        sample_ids, seed, step, ignore_index, backend: as `mask_tokens`.

    Returns (all in the full-length layout):
        encoder_input_ids (B, S): fragment tokens replaced per `pred_probs`, the rest unchanged;
        decoder_input_ids (B, S): `input_ids[t - 1]` at fragment positions t (`mask_token_id` at t = 0),
            `pad_token_id` elsewhere;
        labels (B, S): `input_ids[t]` inside the fragment, `ignore_index` elsewhere;
        spans (B, 2) int64: `[start, end)` of the fragment (`[0, 0)` for rows with no eligible token),
            ready for `fused_attention(spans=..., span_mode="inside"/"outside")`.

    Equivalent PyTorch (one row, up to the random stream)::

        m = max(1, round(ratio * n)); start = random valid start; t = torch.arange(start, start + m)
        enc = ids.clone(); enc[t] = mask_token_id            # 80% (10% random, 10% kept)
        dec = torch.full_like(ids, pad_token_id); dec[t] = ids[t - 1]
        labels = torch.full_like(ids, ignore_index); labels[t] = ids[t]
    """
    args = prepare_mass_mask_args(
        input_ids, lengths=lengths, mask_token_id=mask_token_id, vocab_size=vocab_size,
        fragment_ratio=fragment_ratio, pred_probs=pred_probs, pad_token_id=pad_token_id,
        special_token_ids=special_token_ids, sample_ids=sample_ids, seed=seed, step=step, ignore_index=ignore_index)
    chosen = select_backend("mass_mask", BACKENDS, backend, args[0].device)
    op = ops.reference_op("mass_mask") if chosen.name == "reference" else ops.native_op("mass_mask")
    return op(*args)
