"""Attention dropout (`dropout_p` of `fused_attention` / `fused_attention_varlen`) on every backend.

The oracle is reference.py: the keep rule written out in NumPy, applied to the fp64 probabilities. The
keep masks of the three backends are compared bit for bit (`dropout_mask`), then the kernels' outputs and
gradients against the reference with the same seed, which holds only if they drew that same mask.
Statistics (keep rate, unbiased scaling) use exact binomial / normal bounds with a stated false-failure
probability. The Triton kernels run under the interpreter on CPU (conftest.py)."""
from __future__ import annotations

import math

import pytest
import torch

from masklm_kernels import fused_attention, fused_attention_varlen
from masklm_kernels.attention import reference as ref
from masklm_kernels.attention.dropout import dropout_mask

from attention_cases import MASK_SHAPES, attention_case, dead_row_case, fwd_bwd, ref64
from helpers import assert_binomial, assert_close, assert_equal, backend_error, sweep

BACKENDS = ["cpu", "triton", "reference"]
KERNELS = ["cpu", "triton"]


def _require(backend: str):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    elif backend == "cpu" and backend_error("cpu"):
        pytest.skip(backend_error("cpu"))


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _to(kw, dev):
    return {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


# ------------------------------------------------------------------------------------------------
# the keep mask: the same bits everywhere
# ------------------------------------------------------------------------------------------------

MASK_CASES = [  # (B, H, Sq, Sk, p, seed, offset, sample_ids)
    (2, 3, 37, 41, 0.1, 0, 0, None),
    (1, 5, 1, 129, 0.5, -1, 2**32 + 7, None),  # offsets count modulo 2^32
    (3, 2, 70, 9, 0.9, 2**63 - 1, -3, [0, 2**40 + 5, -9]),  # 64-bit sample keys, negative ones
    (2, 1, 17, 17, 0.3, 12345, 1, [7, 7]),  # one sample key twice: the same mask twice
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", range(len(MASK_CASES)))
def test_keep_masks_are_bit_identical_to_the_specification(case, backend):
    _require(backend)
    B, H, Sq, Sk, p, seed, offset, samples = MASK_CASES[case]
    dev = _device(backend)
    sample_ids = None if samples is None else torch.tensor(samples, device=dev)
    kw = dict(dropout_p=p, dropout_seed=seed, dropout_offset=offset)
    want = ref.dropout_keep(B, H, Sq, Sk, p=p, seed=seed, offset=offset, sample_ids=samples)
    got = dropout_mask(B, H, Sq, Sk, sample_ids=sample_ids, device=dev, backend=backend, **kw)
    assert got.dtype == torch.bool and got.shape == (B, H, Sq, Sk)
    assert_equal(got.cpu(), want, msg=f"{backend} keep mask, case {case}")
    if samples == [7, 7]:
        assert_equal(want[0], want[1], msg="equal sample keys")


def test_seed_offset_sample_and_head_each_change_the_mask():
    base = dict(p=0.5, seed=3, offset=4, sample_ids=[10, 11])
    m = ref.dropout_keep(2, 2, 16, 16, **base)
    assert not torch.equal(m[0], m[1]), "batch rows with different sample keys"
    assert not torch.equal(m[:, 0], m[:, 1]), "heads"
    for change in (dict(seed=-3), dict(offset=5), dict(sample_ids=[12, 11])):
        other = ref.dropout_keep(2, 2, 16, 16, **{**base, **change})
        frac = (other[0] != m[0]).float().mean().item()
        assert 0.35 < frac < 0.65, f"{change}: {frac:.2f} of the pairs changed (independent masks: ~0.5)"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_a_binomial_bound(p):
    keep = ref.dropout_keep(4, 4, 64, 64, p=p, seed=11, offset=0)
    assert_binomial(int(keep.sum()), keep.numel(), 1 - p, what=f"keep rate at p={p}")


# ------------------------------------------------------------------------------------------------
# outputs and gradients: equal to the reference with the same mask (fp64)
# ------------------------------------------------------------------------------------------------

def _case(seed):
    return attention_case(seed, label="attention dropout", seqs=(1, 17, 40), head_dims=(16, 40),
                          spans_within_keys=True, mask_shapes=MASK_SHAPES, zero_rows=True, positions=True)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("seed", sweep(16, fast=6))
def test_forward_and_gradients_equal_the_reference_with_the_same_mask(seed, backend):
    """Every mask kind (causal, prefix, lengths, spans, dense masks), GQA, odd sizes; p and the sample keys
    drawn per case."""
    _require(backend)
    q, k, v, kw = _case(seed)
    g = torch.Generator().manual_seed(seed)
    p = (0.1, 0.5, 0.25)[seed % 3]
    drop = dict(dropout_p=p, dropout_seed=1000 + seed, dropout_offset=seed)
    if seed % 2:
        drop["sample_ids"] = torch.randint(-2**40, 2**40, (q.shape[0],), generator=g)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dev = _device(backend)
    args = [t.to(dev) for t in (q, k, v, dout)]
    out, grads = fwd_bwd(lambda *a: fused_attention(*a, backend=backend, **_to({**kw, **drop}, dev)), *args)
    want, want_grads = fwd_bwd(lambda *a: ref64(*a, **kw, **drop), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9, msg=f"{backend} {name}, seed {seed}")


@pytest.mark.parametrize("backend", KERNELS)
def test_masked_and_dead_positions_stay_zero(backend):
    """Rows with no visible key (one reason per batch row) stay exactly 0 with zero gradients, no NaN."""
    _require(backend)
    q, k, v, kw, dead = dead_row_case("float", torch.float32)
    dev = _device(backend)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    drop = dict(dropout_p=0.4, dropout_seed=5)
    out, (dq, _, _) = fwd_bwd(lambda *a: fused_attention(*a, backend=backend, **_to({**kw, **drop}, dev)),
                              *(t.to(dev) for t in (q, k, v, dout)))
    out, dq = out.cpu(), dq.cpu()
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[dead] == 0).all() and (dq[dead] == 0).all()
    want = ref64(q.double(), k.double(), v.double(), **kw, **drop)
    assert_close(out, want.float(), atol=2e-5, rtol=2e-4, msg=f"{backend} out")


@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_equals_the_reference_and_the_padded_layout(backend):
    """A packed sequence with sample key s drops what a padded batch row with key s drops."""
    _require(backend)
    g = torch.Generator().manual_seed(4)
    lens = [5, 0, 23, 17]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T, Hq, Hkv, D, S = int(cu[-1]), 4, 2, 16, max(lens)
    q, k, v = (torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    samples = torch.tensor([9, 3, 2**33, -1])
    drop = dict(dropout_p=0.3, dropout_seed=77, dropout_offset=6, sample_ids=samples)
    dev = _device(backend)

    def packed(q_, k_, v_):
        return fused_attention_varlen(q_, k_, v_, cu.to(dev), cu.to(dev), S, S, causal=True, backend=backend,
                                      **_to(drop, dev))

    out, grads = fwd_bwd(packed, *(t.to(dev) for t in (q, k, v, dout)))
    want, want_grads = fwd_bwd(lambda *a: ref.varlen_attention(*a, cu, cu, causal=True, **drop), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9, msg=f"{backend} varlen {name}")

    def pad(t):
        x = t.new_zeros(len(lens), S, *t.shape[1:])
        for b, (a, n) in enumerate(zip(cu[:-1].tolist(), lens)):
            x[b, :n] = t[a:a + n]
        return x.transpose(1, 2)

    lengths = torch.tensor(lens)
    padded = fused_attention(pad(q), pad(k), pad(v), causal=True, kv_lengths=lengths, q_lengths=lengths,
                             backend="reference", **drop)
    assert_close(pad(out.cpu()), padded, atol=1e-10, rtol=1e-9, msg="padded == packed")


# ------------------------------------------------------------------------------------------------
# statistics, determinism, the off switch
# ------------------------------------------------------------------------------------------------

def test_scaling_is_unbiased():
    """The mean output over many seeds equals the output without dropout: each element's mean over N
    seeds lies within 5 standard errors (normal approximation; per element false failure < 6e-7)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64) for _ in range(3))
    kw = dict(causal=True, kv_lengths=torch.tensor([10]))
    base = fused_attention(q, k, v, backend="cpu", **kw)
    outs = torch.stack([fused_attention(q, k, v, backend="cpu", dropout_p=0.3, dropout_seed=s, **kw)
                        for s in range(400)])
    err = (outs.mean(0) - base).abs()
    se = outs.std(0) / math.sqrt(outs.shape[0])
    assert (err <= 5 * se + 1e-12).all(), f"max z = {(err / (se + 1e-30)).max():.2f}"


@pytest.mark.parametrize("backend", KERNELS)
def test_deterministic_and_p_zero_is_the_plain_kernel(backend):
    _require(backend)
    q, k, v, kw = _case(3)
    dev = _device(backend)
    q, k, v = (t.float().to(dev) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    kw = _to(kw, dev)
    kw.pop("attn_mask", None)
    run = lambda **d: fwd_bwd(lambda *a: fused_attention(*a, backend=backend, **kw, **d), q, k, v, dout)  # noqa: E731
    first, second = run(dropout_p=0.2, dropout_seed=4), run(dropout_p=0.2, dropout_seed=4)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert_equal(a, b, msg="two runs")
    plain, zero = run(), run(dropout_p=0.0, dropout_seed=4)
    for a, b in zip((plain[0], *plain[1]), (zero[0], *zero[1])):
        assert_equal(a, b, msg="dropout_p=0")


def test_seed_drawn_from_the_generator_is_reproducible():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    a = fused_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    b = fused_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    c = fused_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(2))
    assert_equal(a, b, msg="same generator state")
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = fused_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    assert_equal(fused_attention(q, k, v, dropout_p=0.5), d, msg="torch.manual_seed")


@pytest.mark.parametrize("bad, error", [
    (dict(dropout_p=1.0), ValueError), (dict(dropout_p=-0.1), ValueError), (dict(dropout_p=True), TypeError),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError), (dict(dropout_p=0.1, dropout_offset=torch.zeros(2)), TypeError),
    (dict(dropout_p=0.1, sample_ids=torch.zeros(3, dtype=torch.long)), ValueError),
    (dict(dropout_p=0.1, dropout_seed=1, generator=torch.Generator()), ValueError),
    (dict(dropout_p=0.1, generator=3), TypeError),
])
def test_bad_dropout_arguments_are_named(bad, error):
    q = torch.randn(2, 2, 5, 16)
    with pytest.raises(error, match="dropout_p|dropout_seed|dropout_offset|sample_ids|generator"):
        fused_attention(q, q, q, **bad)


# ------------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile without recompiles when the offset changes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_with_dropout(backend):
    _require(backend)
    dev = _device(backend)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, h, 19, 16, generator=g).to(dev).requires_grad_() for h in (4, 2, 2))
    seed, offset = torch.tensor(3).to(dev), torch.tensor(8).to(dev)
    samples = torch.tensor([5, 2**35]).to(dev)
    args = (q, k, v, torch.tensor([19, 7]).to(dev), None, None, None, None, True, "inside", 6, -1,
            torch.rand(4, generator=g).expand(2, 4).contiguous().to(dev), 0.25, 0.2, seed, offset, samples)
    fwd = getattr(torch.ops.masklm_kernels, f"attention_{backend}_fwd")
    bwd = getattr(torch.ops.masklm_kernels, f"attention_{backend}_bwd")
    torch.library.opcheck(fwd.default, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = fwd(q, k, v, *args[3:])
    dout = torch.randn(out.shape, generator=g).to(dev)
    torch.library.opcheck(bwd.default, (dout, q, k, v, out, lse, *args[3:]))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=dev)
    qv, kv_, vv = (t[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v))
    varlen = getattr(torch.ops.masklm_kernels, f"attention_varlen_{backend}_fwd")
    torch.library.opcheck(varlen.default, (qv, kv_, vv, cu, cu, 12, 12, False, -1, -1, None, 0.25, 0.3, seed, offset,
                                           samples))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph_without_recompiling_when_the_offset_changes(backend):
    _require(backend)
    from torch._dynamo.testing import CompileCounterWithBackend

    dev = _device(backend)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 21, 16, generator=g).to(dev) for h in (4, 2, 2))
    dout = torch.randn(q.shape, generator=g).to(dev)
    lengths, seed = torch.tensor([21, 9]).to(dev), torch.tensor(17).to(dev)

    def fn(q_, k_, v_, offset):
        return fused_attention(q_, k_, v_, causal=True, kv_lengths=lengths, dropout_p=0.1, dropout_seed=seed,
                               dropout_offset=offset, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    outs = []
    for step in range(3):
        offset = torch.tensor(step).to(dev)
        out_e, grads_e = fwd_bwd(lambda *a: fn(*a, offset), q, k, v, dout)
        out_c, grads_c = fwd_bwd(lambda *a: compiled(*a, offset), q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out_c, *grads_c), (out_e, *grads_e)):
            assert_equal(a, b, msg=f"compiled {name}, offset {step}")
        outs.append(out_c)
    assert not torch.equal(outs[0], outs[1]), "a new offset draws a new mask"
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for new offsets"
    torch._dynamo.reset()
