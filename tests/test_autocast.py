"""Every op under `torch.autocast` (masklm_kernels/_autocast.py): attention and the fused head run in the
autocast dtype, cross-entropy keeps its logits' dtype, both losses return fp32, float64 is never cast,
masking is unaffected; the result equals the op called outside autocast on the inputs cast by hand (bit
for bit), gradients reach the fp32 inputs in fp32, the raw custom ops behave as the public functions,
and torch.compile traces it. CPU autocast (bf16) always; CUDA (fp16 and bf16) where a GPU is present."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from masklm_kernels import (
    fused_attention,
    fused_attention_varlen,
    fused_linear_cross_entropy,
    mask_tokens,
    masked_cross_entropy,
)

from helpers import assert_equal

HAS_TRITON = importlib.util.find_spec("triton") is not None
SETTINGS = [("cpu", torch.bfloat16, b) for b in ("cpu", "reference") + (("triton",) if HAS_TRITON else ())]
if torch.cuda.is_available():
    SETTINGS += [("cuda", dt, b) for dt in (torch.float16, torch.bfloat16) for b in ("triton", "reference")]
IDS = [f"{dev}-{str(dt)[6:]}-{b}" for dev, dt, b in SETTINGS]


def _leaves(*shapes, device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).to(device).requires_grad_() for s in shapes]


def _grads(out, xs):
    return torch.autograd.grad(out.float().sum(), xs, allow_unused=True)


def _check(fn, leaves, device, dtype, *, cast, out_dtype):
    """fn under autocast == fn outside it on `cast(leaves)`; output dtype; fp32 gradients."""
    with torch.autocast(device, dtype=dtype):
        got = fn(*leaves)
    assert got.dtype == out_dtype, f"output dtype {got.dtype}, expected {out_dtype}"
    want = fn(*cast(leaves))
    assert_equal(got.to(want.dtype), want, msg="autocast vs inputs cast by hand")
    for x, g, w in zip(leaves, _grads(got, leaves), _grads(want, leaves)):
        assert g.dtype == x.dtype == torch.float32
        assert_equal(g, w, msg="gradient of an fp32 input")


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=IDS)
def test_attention_runs_in_the_autocast_dtype(device, dtype, backend):
    q, k, v = _leaves((2, 4, 19, 32), (2, 2, 23, 32), (2, 2, 23, 32), device=device)
    lengths = torch.tensor([19, 7], device=device), torch.tensor([23, 5], device=device)
    fn = lambda q, k, v: fused_attention(q, k, v, causal=True, q_lengths=lengths[0],  # noqa: E731
                                         kv_lengths=lengths[1], backend=backend)
    _check(fn, [q, k, v], device, dtype, cast=lambda xs: [x.to(dtype) for x in xs], out_dtype=dtype)
    # mixed input dtypes are accepted under autocast (as SDPA): k and v arrive in fp32, q already cast
    with torch.autocast(device, dtype=dtype):
        assert fn(q.to(dtype), k, v).dtype == dtype


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=IDS)
def test_varlen_attention_runs_in_the_autocast_dtype(device, dtype, backend):
    q, k, v = _leaves((30, 4, 32), (30, 2, 32), (30, 2, 32), device=device, seed=1)
    cu = torch.tensor([0, 11, 11, 30], dtype=torch.int32, device=device)
    fn = lambda q, k, v: fused_attention_varlen(q, k, v, cu, cu, 19, 19, causal=True, backend=backend)  # noqa: E731
    _check(fn, [q, k, v], device, dtype, cast=lambda xs: [x.to(dtype) for x in xs], out_dtype=dtype)


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=IDS)
def test_fused_head_casts_like_linear_and_returns_fp32(device, dtype, backend):
    hidden, weight, bias = _leaves((37, 32), (101, 32), (101,), device=device, seed=2)
    labels = torch.randint(0, 101, (37,), generator=torch.Generator().manual_seed(3)).to(device)
    labels[::3] = -100
    fn = lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, backend=backend)  # noqa: E731
    _check(fn, [hidden, weight, bias], device, dtype, cast=lambda xs: [x.to(dtype) for x in xs],
           out_dtype=torch.float32)


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=IDS)
def test_cross_entropy_keeps_the_logits_dtype_and_returns_fp32(device, dtype, backend):
    for logits_dtype in (dtype, torch.float32):  # bf16 logits from an autocast linear, or fp32 ones
        (logits,) = _leaves((37, 101), device=device, seed=4)
        labels = torch.randint(0, 101, (37,), generator=torch.Generator().manual_seed(5)).to(device)
        x = logits.detach().to(logits_dtype).requires_grad_()
        fn = lambda x: masked_cross_entropy(x, labels, backend=backend)  # noqa: E731
        with torch.autocast(device, dtype=dtype):
            got = fn(x)
        assert got.dtype == torch.float32
        want = fn(x)  # outside autocast: in x's dtype, computed from the same (uncast) logits
        assert_equal(got.to(want.dtype), want, msg=f"cross-entropy, {logits_dtype} logits")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_is_never_cast(backend):
    q, k, v = _leaves((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16), device="cpu", dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_attention(q, k, v, backend=backend).dtype == torch.float64
        h, w = _leaves((5, 16), (7, 16), device="cpu", dtype=torch.float64)
        assert fused_linear_cross_entropy(h, w, torch.arange(5), backend=backend).dtype == torch.float64


def test_raw_custom_ops_cast_as_the_public_functions():
    q, k, v = _leaves((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16), device="cpu", seed=6)
    args = (None, None, None, None, None, True, "inside", -1, -1, None, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = torch.ops.masklm_kernels.attention_cpu_fwd(q, k, v, *args)
    want, _ = torch.ops.masklm_kernels.attention_cpu_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args)
    assert_equal(out, want, msg="raw attention op under autocast")
    h, w = _leaves((5, 16), (7, 16), device="cpu", seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = torch.ops.masklm_kernels.linear_cross_entropy_cpu_fwd(h, w, None, torch.arange(5), -100, 0.0, 0.0, -1)
    want = torch.ops.masklm_kernels.linear_cross_entropy_cpu_fwd(h.bfloat16(), w.bfloat16(), None, torch.arange(5),
                                                                 -100, 0.0, 0.0, -1)
    assert_equal(rows, want, msg="raw fused-head op under autocast")


def test_masking_is_unaffected_by_autocast():
    ids = torch.randint(5, 1000, (4, 64), generator=torch.Generator().manual_seed(8))
    rates = torch.rand(4, 64, generator=torch.Generator().manual_seed(9)) * 0.4  # fp32 probabilities
    kw = dict(mask_token_id=3, vocab_size=1000, mlm_probability=rates, seed=1, exact=True)
    want = mask_tokens(ids, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mask_tokens(ids, **kw)
    for g, w in zip(got, want):
        assert_equal(g, w, msg="masking under autocast")


def test_compiled_under_autocast_equals_eager():
    q, k, v = _leaves((2, 2, 17, 16), (2, 2, 17, 16), (2, 2, 17, 16), device="cpu", seed=10)
    w = _leaves((33, 16), device="cpu", seed=11)[0]
    labels = torch.randint(0, 33, (2, 17), generator=torch.Generator().manual_seed(12))

    def step(q, k, v, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = fused_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 17, 32)[..., :16]
            return fused_linear_cross_entropy(h, w, labels)

    want = step(q, k, v, w)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, w)
    assert got.dtype == torch.float32
    assert_equal(got, want, msg="compiled under autocast")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_backward_inside_autocast_equals_backward_outside(reduction):
    """A backward called inside the autocast block computes what it computes outside it (the backward ops
    run with autocast excluded)."""
    h, w = _leaves((6, 16), (50, 16), device="cpu", seed=13)
    labels = torch.tensor([1, -100, 7, 49, 0, 3])
    q, k, v = _leaves((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16), device="cpu", seed=14)

    def run(inside: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction).sum() + \
                fused_attention(q, k, v, causal=True).float().sum()
            if inside:
                return torch.autograd.grad(loss, (h, w, q, k, v))
        return torch.autograd.grad(loss, (h, w, q, k, v))

    for got, want in zip(run(True), run(False)):
        assert_equal(got, want, msg=f"gradient, backward inside vs outside autocast ({reduction})")
