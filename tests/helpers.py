"""Shared test helpers for the whole ``masklm_kernels`` test suite.

Contents
--------
* tolerances by dtype and a verbose :func:`assert_close` (max abs / rel error and where);
  :func:`assert_equal` for bit-exact comparisons; :func:`assert_within_eager_error` for the
  FlashAttention-style "k x the error of the same-dtype eager computation" bar;
* input factories: random ids, random lengths (always with a zero-length row), special tokens,
  word ids (words of 1..4 tokens, -1 on special / padding positions);
* binomial confidence bounds (exact Clopper-Pearson) with an explicit false-failure probability;
* backend discovery (:func:`backends_to_test`, :func:`require_backend`, :func:`run_backend`);

The independent model of ``docs/MASKING.md`` is in ``masking_model.py``; checks shared by the masking
test files are in ``masking_checks.py``.

Nothing here imports triton.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pytest
import torch

# ----------------------------------------------------------------------------------------------
# Random sweeps
# ----------------------------------------------------------------------------------------------

def sweep(n: int, fast: int) -> list:
    """Seeds 0..n-1 for a parametrised random sweep; those from `fast` on are marked `slow`, so the default
    test run takes the first `fast` and `--full` (scripts/run_tests.sh) all of them."""
    return [s if s < fast else pytest.param(s, marks=pytest.mark.slow) for s in range(n)]


# ----------------------------------------------------------------------------------------------
# Tolerances and comparisons
# ----------------------------------------------------------------------------------------------

#: Default tolerances for float kernels compared against a float64 reference, by dtype of the kernel
#: output.  They equal ``torch.testing.assert_close``'s defaults; kernels whose accumulation order
#: differs from the reference should prefer :func:`assert_within_eager_error`.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-7, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=1.3e-6),
    torch.float16: dict(atol=1e-5, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for ``dtype`` (integer dtypes: exact)."""
    if dtype in TOLERANCES:
        return dict(TOLERANCES[dtype])
    if not dtype.is_floating_point:
        return dict(atol=0.0, rtol=0.0)
    raise KeyError(f"no tolerance for dtype {dtype}")


def _fmt_index(flat_index: int, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(flat_index), tuple(shape))) if len(shape) else ()


def assert_close(actual, expected, *, atol: float | None = None, rtol: float | None = None,
                 dtype: torch.dtype | None = None, equal_nan: bool = False, msg: str = "") -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` with a verbose failure message.

    Tolerances default to :data:`TOLERANCES` for ``dtype`` (default: ``actual``'s dtype). The
    comparison is done in float64. The message reports the max absolute and relative errors with
    their indices, the number of mismatches and the first few mismatching elements.
    """
    actual_t = torch.as_tensor(actual)
    expected_t = torch.as_tensor(expected)
    if actual_t.shape != expected_t.shape:
        raise AssertionError(f"{msg}: shape mismatch {tuple(actual_t.shape)} vs {tuple(expected_t.shape)}")
    tol = tolerance(dtype or actual_t.dtype)
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    a = actual_t.detach().to("cpu", torch.float64)
    e = expected_t.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    diff = (a - e).abs()
    ok = diff <= atol + rtol * e.abs()
    ok |= (a == e)  # equal infinities
    if equal_nan:
        ok |= nan_a & nan_e
    if bool(ok.all()):
        return
    bad = ~ok
    n_bad = int(bad.sum())
    finite = torch.isfinite(diff)
    diff_f = torch.where(finite, diff, torch.zeros_like(diff))
    rel = diff_f / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    i_abs = int(diff_f.flatten().argmax())
    i_rel = int(rel.flatten().argmax())
    shape = tuple(a.shape)
    lines = [
        f"{msg}: {n_bad} / {a.numel()} elements differ (atol={atol:g}, rtol={rtol:g})",
        f"  max abs error {float(diff_f.flatten()[i_abs]):.6g} at {_fmt_index(i_abs, shape)} "
        f"(actual {float(a.flatten()[i_abs]):.9g}, expected {float(e.flatten()[i_abs]):.9g})",
        f"  max rel error {float(rel.flatten()[i_rel]):.6g} at {_fmt_index(i_rel, shape)}",
    ]
    n_nan = int((nan_a & ~nan_e).sum())
    if n_nan:
        lines.append(f"  {n_nan} NaN in actual where expected is not NaN")
    for fi in torch.nonzero(bad.flatten()).flatten()[:8].tolist():
        lines.append(f"  at {_fmt_index(fi, shape)}: actual {float(a.flatten()[fi]):.9g} "
                     f"expected {float(e.flatten()[fi]):.9g}")
    raise AssertionError("\n".join(lines))


def assert_equal(actual, expected, *, msg: str = "", check_dtype: bool = True) -> None:
    """Bit-exact equality of two tensors / arrays with the location of the first mismatches."""
    a = actual.detach().cpu() if isinstance(actual, torch.Tensor) else torch.as_tensor(np.asarray(actual))
    e = expected.detach().cpu() if isinstance(expected, torch.Tensor) else torch.as_tensor(np.asarray(expected))
    if tuple(a.shape) != tuple(e.shape):
        raise AssertionError(f"{msg}: shape mismatch {tuple(a.shape)} vs {tuple(e.shape)}")
    if check_dtype and a.dtype != e.dtype:
        raise AssertionError(f"{msg}: dtype mismatch {a.dtype} vs {e.dtype}")
    if a.dtype.is_floating_point or e.dtype.is_floating_point:
        a64, e64 = a.to(torch.float64), e.to(torch.float64)
        bad = ~((a64 == e64) | (torch.isnan(a64) & torch.isnan(e64)))
    else:
        bad = a.to(torch.int64) != e.to(torch.int64)
    if not bool(bad.any()):
        return
    shape = tuple(a.shape)
    idx = torch.nonzero(bad.flatten()).flatten()
    lines = [f"{msg}: {idx.numel()} / {a.numel()} elements differ"]
    for fi in idx[:10].tolist():
        lines.append(f"  at {_fmt_index(fi, shape)}: actual {a.flatten()[fi].item()} expected {e.flatten()[fi].item()}")
    raise AssertionError("\n".join(lines))


def assert_within_eager_error(actual, reference64, eager, *, factor: float, slack: float | None = None,
                              msg: str = "") -> None:
    """FlashAttention's low-precision bar: ``max|actual - ref| <= factor * max|eager - ref| + slack``.

    ``reference64`` is the float64 reference; ``eager`` the same computation in the kernel's dtype with
    eager PyTorch. ``slack`` defaults to the dtype's machine epsilon (guards against an eager error of
    exactly 0 on tiny inputs).
    """
    a = torch.as_tensor(actual).detach().cpu().to(torch.float64)
    r = torch.as_tensor(reference64).detach().cpu().to(torch.float64)
    g = torch.as_tensor(eager).detach().cpu().to(torch.float64)
    dt = torch.as_tensor(actual).dtype
    if slack is None:
        slack = torch.finfo(dt).eps if dt.is_floating_point else 0.0
    if torch.isnan(a).any() and not torch.isnan(r).any():
        raise AssertionError(f"{msg}: NaN in output")
    err = (a - r).abs().max().item() if a.numel() else 0.0
    err_eager = (g - r).abs().max().item() if g.numel() else 0.0
    if not err <= factor * err_eager + slack:
        i = int((a - r).abs().flatten().argmax())
        raise AssertionError(
            f"{msg}: max abs error {err:.6g} at {_fmt_index(i, tuple(a.shape))} exceeds "
            f"{factor} x eager error {err_eager:.6g} + {slack:.3g}")


# ----------------------------------------------------------------------------------------------
# Binomial confidence bounds
# ----------------------------------------------------------------------------------------------

#: Probability that one statistical assertion fails although the implementation is correct.
#: With a few hundred statistical assertions in the suite, the chance of any spurious failure is
#: below 1e-3 (union bound); since the inputs and seeds are fixed, a correct implementation that
#: passes once passes every time.
FALSE_FAILURE_PROB = 1e-6


def clopper_pearson(k: int, n: int, alpha: float = FALSE_FAILURE_PROB) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval for a binomial proportion at confidence ``1 - alpha``.

    For any true proportion ``p``, ``P(p not in interval) <= alpha`` (the interval is conservative).
    """
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def binomial_acceptance(n: int, p: float, alpha: float = FALSE_FAILURE_PROB) -> tuple[int, int]:
    """``[k_lo, k_hi]`` such that ``P(K < k_lo) <= alpha/2`` and ``P(K > k_hi) <= alpha/2`` for ``K ~ Bin(n, p)``."""
    from scipy.stats import binom

    if p <= 0:
        return 0, 0
    if p >= 1:
        return n, n
    k_lo = int(binom.ppf(alpha / 2, n, p))
    # ppf gives the smallest k with cdf >= alpha/2, so P(K < k_lo) < alpha/2 holds for k_lo itself.
    k_hi = int(binom.isf(alpha / 2, n, p))
    # isf gives the smallest k with sf(k) = P(K > k) <= alpha/2.
    return k_lo, k_hi


def assert_binomial(k: int, n: int, p: float, *, alpha: float = FALSE_FAILURE_PROB, what: str = "") -> None:
    """Assert that ``k`` successes out of ``n`` are consistent with success probability ``p``.

    Exact binomial acceptance region at two-sided level ``alpha``: a correct implementation fails
    with probability at most ``alpha``.
    """
    k, n = int(k), int(n)
    assert n > 0, f"{what}: no trials"
    k_lo, k_hi = binomial_acceptance(n, p, alpha)
    if not (k_lo <= k <= k_hi):
        lo, hi = clopper_pearson(k, n, alpha)
        raise AssertionError(
            f"{what}: observed {k}/{n} = {k / n:.5f}, expected p = {p:.5f}; acceptance region "
            f"[{k_lo}, {k_hi}] (two-sided, false-failure probability {alpha:g}); "
            f"Clopper-Pearson interval of the observation [{lo:.5f}, {hi:.5f}]")


def assert_proportions_ordered(k_low: int, n_low: int, k_high: int, n_high: int, *,
                               alpha: float = FALSE_FAILURE_PROB, what: str = "") -> None:
    """Assert that proportion ``high`` is larger than proportion ``low``: the upper Clopper-Pearson
    bound of ``low`` lies below the lower bound of ``high`` (each at level ``alpha``)."""
    _, hi_low = clopper_pearson(k_low, n_low, alpha)
    lo_high, _ = clopper_pearson(k_high, n_high, alpha)
    assert hi_low < lo_high, (
        f"{what}: low group {k_low}/{n_low} (upper bound {hi_low:.4f}) not clearly below "
        f"high group {k_high}/{n_high} (lower bound {lo_high:.4f})")


def assert_chisquare(observed: Sequence[int], expected_probs: Sequence[float], *,
                     alpha: float = FALSE_FAILURE_PROB, what: str = "") -> None:
    """Pearson chi-square goodness of fit; fails when the p-value is below ``alpha``.

    Cells with an expected count below 5 are pooled with their neighbour so that the chi-square
    approximation holds.
    """
    from scipy.stats import chisquare

    obs = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(expected_probs, dtype=np.float64)
    assert obs.shape == probs.shape
    assert abs(probs.sum() - 1.0) < 1e-9, f"{what}: probabilities sum to {probs.sum()}"
    n = obs.sum()
    exp = probs * n
    if np.any((exp == 0) & (obs > 0)):
        bad = np.nonzero((exp == 0) & (obs > 0))[0]
        raise AssertionError(f"{what}: observations in cells of probability 0: {bad.tolist()}")
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    # pool small cells (left to right)
    po, pe, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(obs, exp):
        acc_o += o
        acc_e += e
        if acc_e >= 5:
            po.append(acc_o)
            pe.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        if pe:
            po[-1] += acc_o
            pe[-1] += acc_e
        else:
            po.append(acc_o)
            pe.append(acc_e)
    if len(pe) < 2:
        return
    stat, pvalue = chisquare(po, pe)
    assert pvalue >= alpha, (
        f"{what}: chi-square {stat:.2f} on {len(pe) - 1} dof, p-value {pvalue:.3g} < {alpha:g}\n"
        f"  observed {np.round(po).astype(int).tolist()}\n  expected {np.round(pe, 1).tolist()}")


# ----------------------------------------------------------------------------------------------
# Input factories
# ----------------------------------------------------------------------------------------------

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3
SPECIAL_IDS = (PAD_ID, CLS_ID, SEP_ID)
#: Ordinary token ids are drawn from ``[FIRST_ORDINARY_ID, vocab_size)``: never a special id, never
#: the mask id, never 0.
FIRST_ORDINARY_ID = 5
VOCAB_SIZE = 1000


def seed_for(*parts) -> int:
    """A reproducible 32-bit seed from arbitrary labels (a test's name, a case id, ...)."""
    return zlib.crc32(repr(parts).encode()) & 0xFFFFFFFF


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng(seed_for(*parts))


def random_ids(rng: np.random.Generator, B: int, S: int, *, vocab_size: int = VOCAB_SIZE,
               low: int = FIRST_ORDINARY_ID, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Random ordinary token ids in ``[low, vocab_size)`` (no special, mask or zero ids)."""
    return torch.from_numpy(rng.integers(low, vocab_size, size=(B, S), dtype=np.int64)).to(dtype)


def random_lengths(rng: np.random.Generator, B: int, S: int, *, zero_row: bool = True,
                   full_row: bool = True, one_row: bool = False) -> torch.Tensor:
    """Row lengths in ``[0, S]`` (int64, shape (B,)): row 0 has length 0 when ``zero_row``, the last
    row length S when ``full_row``, row 1 length 1 when ``one_row``; the rest uniform."""
    lengths = rng.integers(0, S + 1, size=B, dtype=np.int64)
    if zero_row and B >= 1:
        lengths[0] = 0
    if one_row and B >= 2:
        lengths[1] = min(1, S)
    if full_row and B >= 2:
        lengths[-1] = S
    return torch.from_numpy(lengths)


def lengths_to_attention_mask(lengths: torch.Tensor, S: int, *, left_padding: bool = False,
                              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    pos = torch.arange(S).unsqueeze(0)
    lengths = lengths.to(torch.int64).unsqueeze(1)
    m = pos >= (S - lengths) if left_padding else pos < lengths
    return m.to(dtype)


@dataclass
class Batch:
    """A realistic MLM batch: ``[CLS] a ... [SEP] b ... [SEP] [PAD] ...`` per row."""

    input_ids: torch.Tensor          # (B, S)
    lengths: torch.Tensor            # (B,) int64
    attention_mask: torch.Tensor     # (B, S) int64, 1 inside the row
    special_tokens_mask: torch.Tensor  # (B, S) int64, 1 on CLS/SEP/PAD
    word_ids: torch.Tensor           # (B, S) int64, -1 on special and padding positions

    @property
    def shape(self):
        return tuple(self.input_ids.shape)


def random_word_ids(rng: np.random.Generator, content: np.ndarray, *, max_word_len: int = 4) -> np.ndarray:
    """Word ids for one row: runs of 1..max_word_len consecutive content positions share an id;
    ids increase along the row; -1 where ``content`` is False. A word never crosses a non-content
    position."""
    S = content.shape[0]
    wid = np.full(S, -1, dtype=np.int64)
    next_id = 0
    s = 0
    while s < S:
        if not content[s]:
            s += 1
            continue
        L = int(rng.integers(1, max_word_len + 1))
        e = s
        while e < S and e < s + L and content[e]:
            wid[e] = next_id
            e += 1
        next_id += 1
        s = e
    return wid


def make_batch(rng: np.random.Generator, B: int, S: int, *, vocab_size: int = VOCAB_SIZE,
               dtype: torch.dtype = torch.int64, lengths: torch.Tensor | None = None,
               zero_row: bool = True, one_row: bool = False, with_special: bool = True,
               max_word_len: int = 4) -> Batch:
    """Random batch with lengths (a zero-length row by default), CLS/SEP/PAD special tokens
    (a middle SEP for rows of length >= 8), and word ids of 1..``max_word_len`` tokens."""
    if lengths is None:
        lengths = random_lengths(rng, B, S, zero_row=zero_row, one_row=one_row)
    ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, size=(B, S), dtype=np.int64)
    special = np.zeros((B, S), dtype=bool)
    word_ids = np.full((B, S), -1, dtype=np.int64)
    for b in range(B):
        L = int(lengths[b])
        ids[b, L:] = PAD_ID
        special[b, L:] = True
        if with_special and L >= 1:
            ids[b, 0] = CLS_ID
            special[b, 0] = True
        if with_special and L >= 2:
            ids[b, L - 1] = SEP_ID
            special[b, L - 1] = True
        if with_special and L >= 8:
            mid = int(rng.integers(2, L - 2))
            ids[b, mid] = SEP_ID
            special[b, mid] = True
        word_ids[b] = random_word_ids(rng, ~special[b], max_word_len=max_word_len)
    return Batch(
        input_ids=torch.from_numpy(ids).to(dtype),
        lengths=lengths.clone().to(torch.int64),
        attention_mask=lengths_to_attention_mask(lengths, S),
        special_tokens_mask=torch.from_numpy(special.astype(np.int64)),
        word_ids=torch.from_numpy(word_ids),
    )


def left_pad(batch: Batch) -> Batch:
    """The same rows, left-padded (content moved to the end of each row)."""
    B, S = batch.shape
    ids = torch.full_like(batch.input_ids, PAD_ID)
    spec = torch.ones_like(batch.special_tokens_mask)
    wid = torch.full_like(batch.word_ids, -1)
    for b in range(B):
        L = int(batch.lengths[b])
        if L:
            ids[b, S - L:] = batch.input_ids[b, :L]
            spec[b, S - L:] = batch.special_tokens_mask[b, :L]
            wid[b, S - L:] = batch.word_ids[b, :L]
    return Batch(ids, batch.lengths.clone(), lengths_to_attention_mask(batch.lengths, S, left_padding=True),
                 spec, wid)


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------

def cpu_extension_error() -> str | None:
    """``None`` when the C++ extension ``masklm_kernels._C`` loaded, else why it did not
    (``masklm_kernels._ext.load_error()`` when the package provides it)."""
    try:
        import masklm_kernels  # noqa: F401
    except Exception as exc:  # pragma: no cover - the package itself is broken
        return f"masklm_kernels failed to import: {exc!r}"
    try:
        from masklm_kernels import _ext
    except Exception:
        _ext = None
    if _ext is not None and hasattr(_ext, "load_error"):
        err = _ext.load_error()
        return None if not err else f"C++ extension unavailable: {err}"
    try:
        import masklm_kernels._C  # noqa: F401
        return None
    except Exception as exc:
        return f"C++ extension masklm_kernels._C unavailable: {exc!r}"


def _op_has_kernel(op_name: str, dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dispatch_key))
    except Exception:
        return False


def cuda_backend_error() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    err = cpu_extension_error()
    if err:
        return err
    if not _op_has_kernel("masklm_kernels::mask_tokens", "CUDA"):
        return "masklm_kernels._C was built without CUDA kernels"
    return None


def backend_error(backend: str) -> str | None:
    """Why ``backend`` cannot run here (``None`` when it can)."""
    if backend == "reference":
        try:
            import masklm_kernels  # noqa: F401
        except Exception as exc:
            return f"masklm_kernels failed to import: {exc!r}"
        return None
    if backend == "cpu":
        return cpu_extension_error()
    if backend == "cuda":
        return cuda_backend_error()
    return f"unknown backend {backend!r}"


def backends_to_test() -> list[str]:
    """``["reference", "cpu"]`` plus ``"cuda"`` when a CUDA device and CUDA kernels are present.

    "cpu" is listed even when the extension failed to load so that its tests show up as skipped
    (with the reason) rather than silently disappear; call :func:`require_backend` in the test.
    """
    out = ["reference", "cpu"]
    if torch.cuda.is_available() and cuda_backend_error() is None:
        out.append("cuda")
    return out


def require_backend(backend: str) -> None:
    """Skip the calling test, with the reason, when ``backend`` cannot run."""
    err = backend_error(backend)
    if err is not None:
        pytest.skip(f"backend {backend!r} unavailable: {err}")


def fast_backend() -> str:
    """The fastest backend available on CPU tensors, for statistics on large inputs."""
    return "cpu" if cpu_extension_error() is None else "reference"


def device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return x


def run_backend(fn, backend: str, *args, **kwargs):
    """Call ``fn(*args, backend=backend, **kwargs)`` with tensors moved to the backend's device;
    return the outputs on the CPU (a tuple)."""
    dev = device_for(backend)
    args = tuple(_to_device(a, dev) for a in args)
    kwargs = {k: _to_device(v, dev) for k, v in kwargs.items()}
    out = fn(*args, backend=backend, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.cpu()
    return tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in out)


def assert_backends_identical(fn, input_ids: torch.Tensor, kwargs: dict, what: str) -> None:
    """`fn(input_ids, **kwargs, backend=...)` on every backend that can run here (CUDA tensors for "cuda")
    returns, output by output, the reference backend's bits."""
    outs = {}
    for backend in backends_to_test():
        if backend != "reference":
            require_backend(backend)
        dev = device_for(backend)
        dkw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        outs[backend] = [t.cpu() for t in fn(input_ids.to(dev), **dkw, backend=backend)]
    ref = outs.pop("reference")
    for backend, got in outs.items():
        for i, (g, r) in enumerate(zip(got, ref)):
            assert_equal(g, r, msg=f"{what}: {backend} output {i}")


def named_case(builder, overrides: dict, rng) -> tuple[torch.Tensor, dict]:
    """(input_ids, kwargs) of `builder(rng, dtype=...)` with `overrides` applied: "dtype" picks the ids'
    dtype, lengths=None drops the lengths (full rows)."""
    kw = dict(overrides)
    ids, base = builder(rng, dtype=kw.pop("dtype", torch.int64))
    base.update(kw)
    if "lengths" in base and base["lengths"] is None:
        base.pop("lengths")
    return ids, base
