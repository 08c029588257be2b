"""Bad input to ``mask_tokens`` / ``mass_mask`` gets a ``ValueError`` or ``TypeError`` whose message names
the argument and says what was expected (docs/TESTING.md).

Validation happens in Python before a backend is chosen, so every case is checked with every backend
name, including one that cannot run here ("cuda" on a CPU-only machine): the argument's error must
come first, whichever backend was asked for. When CUDA is usable, the checks that do not read tensor
values are repeated on CUDA tensors (value checks are skipped there by design: they would
synchronise the host, and the kernels clamp instead).

Each case builds fresh random inputs (a realistic batch with a zero-length row) and breaks exactly
one argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from helpers import MASK_ID, SPECIAL_IDS, VOCAB_SIZE, make_batch, rng_for

masklm = pytest.importorskip("masklm_kernels")
from masklm_kernels import BackendUnavailableError, mask_tokens, mass_mask  # noqa: E402
from masklm_kernels.masking import BACKENDS  # noqa: E402

B, S = 4, 12
V = VOCAB_SIZE
NAN = float("nan")
DROP = object()  # leave the argument out of the call entirely
#: every backend name the library has, plus "auto"; validation precedes dispatch for all of them
BACKEND_NAMES = ("reference", "cpu", "cuda", "auto")


def _cuda_reasons() -> list[str]:
    """Why the library's "cuda" backend cannot run CUDA inputs here (empty: it can)."""
    (cuda,) = [b for b in BACKENDS if b.name == "cuda"]
    return cuda.not_supported_reasons("cuda" if torch.cuda.is_available() else None)


CUDA_USABLE = not _cuda_reasons()


# ------------------------------------------------------------------------------------------------
# Cases: (op, argument broken, expected exception, how to break it)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    op: str                     # "mask_tokens" or "mass_mask"
    arg: str                    # the argument the message must name (a regex)
    exc: type
    make: Callable              # (batch, rng) -> dict of keyword overrides (input_ids included)
    values: bool = False        # the check reads tensor values (skipped on CUDA tensors by design)
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label or self.arg}"


def _with_bad(rng, shape, bad: float) -> torch.Tensor:
    """Valid rates in [0, 1) with `bad` at one random position."""
    t = torch.from_numpy(rng.uniform(0.0, 1.0, size=shape).astype(np.float32))
    t.view(-1)[int(rng.integers(t.numel()))] = bad
    return t


def _bad_lengths(rng, bt, value: int) -> torch.Tensor:
    L = bt.lengths.clone()
    L[int(rng.integers(B))] = value
    return L


def _cases() -> list[Case]:
    c: list[Case] = []

    def add(ops, arg, exc, make, values=False, label=""):
        for op in ops:
            c.append(Case(op, arg, exc, make, values, label or arg))

    MT, MM, BOTH = ("mask_tokens",), ("mass_mask",), ("mask_tokens", "mass_mask")

    # probabilities outside [0, 1]: float, (B,) tensor, (B, S) tensor (NaN included)
    for bad in (1.5, -0.1, NAN, float("inf")):
        add(MT, "mlm_probability", ValueError, lambda bt, r, bad=bad: dict(mlm_probability=bad),
            label=f"mlm_probability={bad}")
    for shape in ((B,), (B, S), ()):
        for bad in (1.5, -0.1, NAN):
            add(MT, "mlm_probability", ValueError,
                lambda bt, r, shape=shape, bad=bad: dict(mlm_probability=_with_bad(r, shape, bad)),
                values=True, label=f"mlm_probability{shape}={bad}")
    for shape in ((B, 1), (S,), (B + 1,), (B, S + 1), (1, B, S)):
        add(MT, "mlm_probability", ValueError,
            lambda bt, r, shape=shape: dict(mlm_probability=torch.full(shape, 0.2)), label=f"mlm_probability{shape}")
    add(MT, "mlm_probability", TypeError, lambda bt, r: dict(mlm_probability=torch.zeros(B, dtype=torch.int64)),
        label="mlm_probability-int-tensor")
    add(MT, "mlm_probability", TypeError, lambda bt, r: dict(mlm_probability="0.15"), label="mlm_probability-str")
    for name in ("mask_replace_prob", "random_replace_prob"):
        for bad in (1.2, -0.1, NAN):
            add(MT, name, ValueError, lambda bt, r, name=name, bad=bad: {name: bad}, label=f"{name}={bad}")
        add(MT, name, TypeError, lambda bt, r, name=name: {name: None}, label=f"{name}=None")
    for pair in ((0.8, 0.3), (1.0, 0.01), (0.5, 0.6)):  # each valid alone, sum above 1
        add(MT, "mask_replace_prob.*random_replace_prob", ValueError,
            lambda bt, r, pair=pair: dict(mask_replace_prob=pair[0], random_replace_prob=pair[1]),
            label=f"replace-sum{pair}")

    # lengths outside [0, S], of the wrong type / shape; mass_mask requires lengths
    for bad in (-1, S + 1, 2**40):
        add(BOTH, "lengths", ValueError, lambda bt, r, bad=bad: dict(lengths=_bad_lengths(r, bt, bad)),
            values=True, label=f"lengths={bad}")
    add(BOTH, "lengths", TypeError, lambda bt, r: dict(lengths=bt.lengths.float()), label="lengths-float")
    add(BOTH, "lengths", TypeError, lambda bt, r: dict(lengths=bt.lengths.bool()), label="lengths-bool")
    add(BOTH, "lengths", TypeError, lambda bt, r: dict(lengths=bt.lengths.tolist()), label="lengths-list")
    add(BOTH, "lengths", ValueError, lambda bt, r: dict(lengths=bt.lengths[:-1]), label="lengths-shape")
    add(BOTH, "lengths", ValueError, lambda bt, r: dict(lengths=bt.lengths[:, None]), label="lengths-2d")
    add(MM, "lengths", ValueError, lambda bt, r: dict(lengths=None), label="lengths=None")
    add(MM, "lengths", TypeError, lambda bt, r: dict(lengths=DROP), label="lengths-missing")

    # input_ids: integer (int64 / int32) 2-D tensor
    add(BOTH, "input_ids", TypeError, lambda bt, r: dict(input_ids=bt.input_ids.float()), label="input_ids-float")
    add(BOTH, "input_ids", TypeError, lambda bt, r: dict(input_ids=bt.input_ids.to(torch.int16)),
        label="input_ids-int16")
    add(BOTH, "input_ids", TypeError, lambda bt, r: dict(input_ids=bt.input_ids.tolist()), label="input_ids-list")
    add(BOTH, "input_ids", ValueError, lambda bt, r: dict(input_ids=bt.input_ids[0]), label="input_ids-1d")
    add(BOTH, "input_ids", ValueError, lambda bt, r: dict(input_ids=bt.input_ids[None]), label="input_ids-3d")
    add(BOTH, "input_ids", ValueError, lambda bt, r: dict(input_ids=bt.input_ids[0, 0]), label="input_ids-0d")

    # per-token / per-row tensors: integer dtype and matching shape
    per_token = {"word_ids": lambda bt: bt.word_ids, "special_tokens_mask": lambda bt: bt.special_tokens_mask,
                 "attention_mask": lambda bt: bt.attention_mask}
    for name, get in per_token.items():
        add(MT, name, TypeError, lambda bt, r, name=name, get=get: {name: get(bt).float()}, label=f"{name}-float")
        add(MT, name, ValueError, lambda bt, r, name=name, get=get: {name: get(bt)[:, :-1]}, label=f"{name}-short")
        add(MT, name, ValueError, lambda bt, r, name=name, get=get: {name: get(bt)[:-1]}, label=f"{name}-rows")
        add(MT, name, ValueError, lambda bt, r, name=name, get=get: {name: get(bt)[0]}, label=f"{name}-1d")
    add(MT, "word_ids", TypeError, lambda bt, r: dict(word_ids=bt.word_ids.bool()), label="word_ids-bool")
    sample_ids = lambda r: torch.from_numpy(r.integers(0, 10**6, size=B))  # noqa: E731
    add(BOTH, "sample_ids", TypeError, lambda bt, r: dict(sample_ids=sample_ids(r).float()), label="sample_ids-float")
    add(BOTH, "sample_ids", ValueError, lambda bt, r: dict(sample_ids=sample_ids(r)[:-1]), label="sample_ids-short")
    add(BOTH, "sample_ids", ValueError, lambda bt, r: dict(sample_ids=sample_ids(r)[:, None]), label="sample_ids-2d")

    # special token ids: ints in a list, or an integer 1-D tensor
    add(BOTH, "special_token_ids", TypeError, lambda bt, r: dict(special_token_ids=[0, 1.5]), label="special-float")
    add(BOTH, "special_token_ids", TypeError, lambda bt, r: dict(special_token_ids=[0, "2"]), label="special-str")
    add(BOTH, "special_token_ids", TypeError, lambda bt, r: dict(special_token_ids=[True]), label="special-bool")
    add(BOTH, "special_token_ids", TypeError, lambda bt, r: dict(special_token_ids=torch.tensor([0.0, 1.0])),
        label="special-float-tensor")
    add(BOTH, "special_token_ids", ValueError, lambda bt, r: dict(special_token_ids=torch.tensor([[0, 1]])),
        label="special-2d-tensor")
    add(BOTH, "special_token_ids", TypeError, lambda bt, r: dict(special_token_ids="012"), label="special-str-arg")
    for bad in (-1, VOCAB_SIZE):
        add(BOTH, "special_token_ids", ValueError, lambda bt, r, bad=bad: dict(special_token_ids=[0, bad]),
            label=f"special-outside-vocab={bad}")

    # ids inside the vocabulary
    for bad in (V, V + 7, -1):
        add(BOTH, "mask_token_id", ValueError, lambda bt, r, bad=bad: dict(mask_token_id=bad),
            label=f"mask_token_id={bad}")
    add(BOTH, "mask_token_id", TypeError, lambda bt, r: dict(mask_token_id=float(MASK_ID)), label="mask_token_id-float")
    add(BOTH, "vocab_size", ValueError, lambda bt, r: dict(vocab_size=0, mask_token_id=0), label="vocab_size=0")
    add(BOTH, "vocab_size", TypeError, lambda bt, r: dict(vocab_size=float(V)), label="vocab_size-float")
    for rng_ in ((0, V + 1), (-1, 10), (V, V + 1), (10, 10), (10, 5)):
        add(MT, r"random_token_range", ValueError, lambda bt, r, rr=rng_: dict(random_token_range=rr),
            label=f"random_token_range={rng_}")
    for rng_ in ((1, 2, 3), 5, (0.0, 10.0), (None, 10)):
        add(MT, r"random_token_range", TypeError, lambda bt, r, rr=rng_: dict(random_token_range=rr),
            label=f"random_token_range={rng_!r}")

    # seed / step: Python ints or 0-dim integer tensors; other scalars
    for name in ("seed", "step"):
        for bad, exc in ((1.0, TypeError), ("1", TypeError), (True, TypeError), (torch.tensor([1]), TypeError),
                         (torch.tensor(1.0), TypeError), (torch.tensor([[1]]), TypeError), (2**64, ValueError)):
            add(BOTH, name, exc, lambda bt, r, name=name, bad=bad: {name: bad}, label=f"{name}={bad!r}")
    add(BOTH, "ignore_index", TypeError, lambda bt, r: dict(ignore_index=-100.0), label="ignore_index-float")
    add(MM, "pad_token_id", TypeError, lambda bt, r: dict(pad_token_id=0.0), label="pad_token_id-float")
    for bad in (-1, VOCAB_SIZE):
        add(MM, "pad_token_id", ValueError, lambda bt, r, bad=bad: dict(pad_token_id=bad), label=f"pad_token_id={bad}")

    # mask_tokens options
    for bad in (1, 0, None, "yes", np.bool_(True)):
        add(MT, "exact", TypeError, lambda bt, r, bad=bad: dict(exact=bad), label=f"exact={bad!r}")
    for bad in ((0, 10), (0.2, 0), (1.5, 10), (NAN, 10), (0.2, 1000), (0.2,), (0.2, 10.0), (0.5, 0.6), (-0.5, 1.5),
                (NAN, 1.0), (1 / 65,) * 65):  # explicit laws: not summing to 1, a negative or NaN entry, too long
        add(MT, "span_lengths", ValueError, lambda bt, r, bad=bad: dict(span_lengths=bad), label=f"span_lengths={bad}")
    for bad in ("yes", 1, (), (0.2, 10, 3), (1, 0, 0), (0.5, True)):
        add(MT, "span_lengths", TypeError, lambda bt, r, bad=bad: dict(span_lengths=bad), label=f"span_lengths={bad!r}")

    # mass_mask options
    for bad in (0, 0.0, -0.1, 1.5, NAN, float("inf")):
        add(MM, "fragment_ratio", ValueError, lambda bt, r, bad=bad: dict(fragment_ratio=bad),
            label=f"fragment_ratio={bad}")
    add(MM, "fragment_ratio", TypeError, lambda bt, r: dict(fragment_ratio="0.5"), label="fragment_ratio-str")
    for bad in ((0.8, 0.1, 0.2), (0.5, 0.1, 0.1), (0.0, 0.0, 0.0), (1.0, 1.0, -1.0)):
        add(MM, r"pred_probs", ValueError, lambda bt, r, bad=bad: dict(pred_probs=bad), label=f"pred_probs={bad}")
    for bad in ((NAN, 0.5, 0.5), (1.2, -0.1, -0.1)):
        add(MM, r"pred_probs", ValueError, lambda bt, r, bad=bad: dict(pred_probs=bad), label=f"pred_probs={bad}")
    for bad in ((0.8, 0.2), (0.8, 0.1, 0.1, 0.0), 0.8, "abc"):
        add(MM, r"pred_probs", TypeError, lambda bt, r, bad=bad: dict(pred_probs=bad), label=f"pred_probs={bad!r}")

    # one tensor argument on another device than input_ids
    dev_args = {
        "lengths": (BOTH, lambda bt, r: bt.lengths),
        "attention_mask": (MT, lambda bt, r: bt.attention_mask),
        "special_tokens_mask": (MT, lambda bt, r: bt.special_tokens_mask),
        "word_ids": (MT, lambda bt, r: bt.word_ids),
        "sample_ids": (BOTH, lambda bt, r: sample_ids(r)),
        "mlm_probability": (MT, lambda bt, r: _with_bad(r, (B, S), 0.5)),
        "special_token_ids": (BOTH, lambda bt, r: torch.tensor(SPECIAL_IDS)),
        "seed": (BOTH, lambda bt, r: torch.tensor(int(r.integers(2**31)))),
        "step": (BOTH, lambda bt, r: torch.tensor(int(r.integers(2**31)))),
    }
    for name, (ops, get) in dev_args.items():
        add(ops, name, ValueError, lambda bt, r, name=name, get=get: {name: get(bt, r).to("meta")},
            label=f"{name}-meta")
    return c


CASES = _cases()


def _call(case: Case, backend: str, device: str = "cpu"):
    rng = rng_for("errors", case.id)
    bt = make_batch(rng, B, S)
    kwargs = dict(input_ids=bt.input_ids, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS),
                  mask_token_id=MASK_ID, vocab_size=V)
    kwargs.update(case.make(bt, rng))
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
              for k, v in kwargs.items() if v is not DROP}
    fn = mask_tokens if case.op == "mask_tokens" else mass_mask
    return fn(kwargs.pop("input_ids"), backend=backend, **kwargs)


def _assert_raises_naming(case: Case, backend: str, device: str = "cpu"):
    with pytest.raises(case.exc, match=case.arg) as info:
        _call(case, backend, device)
    msg = str(info.value)
    # names the argument (checked by match) *and* says what was expected
    assert re.search(r"must|required|expected", msg), f"message does not say what was expected: {msg!r}"
    # a range / shape / type error is not a backend error
    assert not isinstance(info.value, BackendUnavailableError), msg
    return msg


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_argument_is_named(case, backend):
    _assert_raises_naming(case, backend)


@pytest.mark.skipif(not CUDA_USABLE, reason=f"CUDA backend unavailable: {'; '.join(_cuda_reasons())}")
@pytest.mark.parametrize("case", [c for c in CASES if not c.values], ids=lambda c: c.id)
def test_bad_argument_is_named_on_cuda_tensors(case):
    _assert_raises_naming(case, "auto", "cuda")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_range_errors_report_the_offending_value(backend):
    rng = rng_for("offending value", backend)
    bt = make_batch(rng, B, S)
    bad = _bad_lengths(rng, bt, S + 3)
    with pytest.raises(ValueError, match=rf"lengths.*\b{S + 3}\b"):
        mask_tokens(bt.input_ids, lengths=bad, mask_token_id=MASK_ID, vocab_size=V, backend=backend)
    with pytest.raises(ValueError, match=r"mlm_probability.*nan"):
        mask_tokens(bt.input_ids, mlm_probability=_with_bad(rng, (B, S), NAN), mask_token_id=MASK_ID, vocab_size=V,
                    backend=backend)
    with pytest.raises(ValueError, match=r"fragment_ratio.*1\.5"):
        mass_mask(bt.input_ids, lengths=bt.lengths, mask_token_id=MASK_ID, vocab_size=V, fragment_ratio=1.5,
                  backend=backend)


def test_valid_call_passes_validation():
    """Control: the default arguments of the cases above are accepted (every failure comes from the one
    broken argument)."""
    bt = make_batch(rng_for("valid control"), B, S)
    for fn in (mask_tokens, mass_mask):
        out = fn(bt.input_ids, lengths=bt.lengths, special_token_ids=list(SPECIAL_IDS), mask_token_id=MASK_ID,
                 vocab_size=V, backend="reference")
        assert out[0].shape == (B, S)


# ------------------------------------------------------------------------------------------------
# Backend names and unavailable backends
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["mask_tokens", "mass_mask"])
@pytest.mark.parametrize("backend, exc", [("foo", ValueError), ("CPU", ValueError), ("triton", ValueError),
                                          ("", ValueError), (None, TypeError), (1, TypeError)])
def test_unknown_backend_is_named(op, backend, exc):
    bt = make_batch(rng_for("unknown backend", op, repr(backend)), B, S)
    fn = mask_tokens if op == "mask_tokens" else mass_mask
    with pytest.raises(exc, match="backend") as info:
        fn(bt.input_ids, lengths=bt.lengths, mask_token_id=MASK_ID, vocab_size=V, backend=backend)
    for name in ("auto", "cpu", "reference"):  # lists the valid names
        assert name in str(info.value)


@pytest.mark.parametrize("op", ["mask_tokens", "mass_mask"])
def test_requested_cuda_backend_unavailable(op):
    """backend="cuda" on CPU tensors (and, without CUDA, on any tensors) raises, listing every reason."""
    bt = make_batch(rng_for("cuda unavailable", op), B, S)
    fn = mask_tokens if op == "mask_tokens" else mass_mask
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda'") as info:
        fn(bt.input_ids, lengths=bt.lengths, mask_token_id=MASK_ID, vocab_size=V, backend="cuda")
    assert isinstance(info.value, ValueError)
    (cuda,) = [b for b in BACKENDS if b.name == "cuda"]
    for reason in cuda.not_supported_reasons(bt.input_ids.device):  # lists why, never falls back
        assert reason in str(info.value)


@pytest.mark.parametrize("op", ["mask_tokens", "mass_mask"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_backend_cannot_run_tensors_on_meta(op, backend):
    """All inputs on the meta device pass validation (no values are read) but no backend runs them."""
    bt = make_batch(rng_for("meta inputs", op, backend), B, S)
    fn = mask_tokens if op == "mask_tokens" else mass_mask
    with pytest.raises(BackendUnavailableError, match=r"meta") as info:
        fn(bt.input_ids.to("meta"), lengths=bt.lengths.to("meta"), mask_token_id=MASK_ID, vocab_size=V,
           backend=backend)
    if backend != "auto":
        assert f"backend={backend!r}" in str(info.value)


@pytest.mark.parametrize("op", ["mask_tokens", "mass_mask"])
def test_missing_extension_is_reported_not_bypassed(op, monkeypatch):
    """backend="cpu" without the C++ extension raises with the load error; "auto" falls back to the
    reference backend (a supported one), which gives the result the extension would have."""
    from masklm_kernels import _ext

    reason = "masklm_kernels._C could not be imported (simulated by the test)"
    bt = make_batch(rng_for("missing extension", op), B, S)
    fn = mask_tokens if op == "mask_tokens" else mass_mask
    kw = dict(lengths=bt.lengths, mask_token_id=MASK_ID, vocab_size=V, seed=11, step=3)
    expected = fn(bt.input_ids, backend="reference", **kw)
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(_ext, "load_error", lambda: reason)
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu'") as info:
        fn(bt.input_ids, backend="cpu", **kw)
    assert reason in str(info.value)
    got = fn(bt.input_ids, backend="auto", **kw)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
