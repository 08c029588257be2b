"""`fused_attention(..., backend="cpu")` (masklm_kernels/attention/cpu.py, ops.py) against the float64
specification (reference.py), docs/SEMANTICS.md "Attention" and docs/TESTING.md:
forward and gradients in float64, the FlashAttention low-precision bar, rows with no visible key,
deterministic backward, the custom ops under opcheck and torch.compile, backend="auto"."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import fused_attention
from masklm_kernels.attention import cpu
from masklm_kernels.attention import reference as ref

from attention_cases import (
    MASK_SHAPES,
    OP_CASES,
    attention_case,
    compile_inputs,
    dead_row_case,
    dead_rows,
    fwd_bwd,
    op_args,
    ref64,
)
from helpers import assert_close, assert_equal, assert_within_eager_error

SEEDS = range(40)
BLOCKS = ("default", 16, "16-gather")


def _case(seed):
    return attention_case(seed, label="attention cpu backend", seqs=(1, 17, 113), head_dims=(40, 80),
                          spans_within_keys=True, mask_shapes=MASK_SHAPES, zero_rows=True, positions=True)


@pytest.fixture(params=BLOCKS, ids=lambda b: f"block_q={b}")
def block_q(request, monkeypatch):
    """Every test using it runs with the default BLOCK_Q (one block for S <= 128), with 16 rows per
    block (several blocks, some of them skipped whole), and with 16 rows per block where every piece
    whose key range holds an invisible key gathers its visible keys (the sparse-key path)."""
    if request.param != "default":
        monkeypatch.setattr(cpu, "BLOCK_Q", 16)
    if request.param == "16-gather":
        monkeypatch.setattr(cpu, "GATHER_BELOW", 1.01)
    return cpu.BLOCK_Q


def _cpu(q, k, v, **kw):
    return fused_attention(q, k, v, backend="cpu", **kw)


# ------------------------------------------------------------------------------------------------
# float64: equal to the specification
# ------------------------------------------------------------------------------------------------

def test_cases_cover_every_argument():
    """The random cases mix every mask argument and shape the brief lists (guards the generator)."""
    seen = set()
    for seed in SEEDS:
        q, k, v, kw = _case(seed)
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        seen |= {n for n in kw if n not in ("causal", "span_mode")} | {f"D={D}", f"Sq={Sq}", f"Sk={Sk}"}
        seen |= {"causal"} if kw["causal"] else set()
        seen |= {"Sq!=Sk"} if Sq != Sk else set()
        seen |= {"MQA"} if Hkv == 1 and Hq > 1 else {"GQA"} if Hq > Hkv else set()
        if "spans" in kw:
            seen |= {f"spans{kw['spans'].dim()}d-{kw['span_mode']}"}
        if "attn_mask" in kw:
            seen |= {f"mask-{'bool' if kw['attn_mask'].dtype == torch.bool else 'float'}",
                     f"mask-dim{kw['attn_mask'].dim()}"}
        if bool(dead_rows(q, k, kw).any()):
            seen.add("dead rows")
        if "window_size" in kw and kw["causal"]:
            seen.add("window-causal")
        for n in ("kv_lengths", "q_lengths"):
            if n in kw and bool((kw[n] == 0).any()):
                seen.add(f"zero {n}")
    want = {"causal", "kv_lengths", "q_lengths", "prefix_lengths", "attn_mask", "scale", "D=40", "D=80",
            "Sq=1", "Sq=17", "Sq=113", "Sk=1", "Sk=17", "Sk=113", "Sq!=Sk", "MQA", "GQA",
            "spans2d-inside", "spans2d-outside", "spans3d-inside", "spans3d-outside", "mask-bool",
            "mask-float", "mask-dim1", "mask-dim2", "mask-dim3", "mask-dim4", "dead rows", "zero kv_lengths",
            "zero q_lengths", "window_size", "alibi_slopes", "window-causal"}
    assert want <= seen, f"not covered: {sorted(want - seen)}"


@pytest.mark.parametrize("seed", SEEDS)
def test_float64_forward_and_gradients_equal_reference(seed, block_q):
    q, k, v, kw = _case(seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    out, grads = fwd_bwd(_cpu, q, k, v, dout, **kw)
    out_r, grads_r = fwd_bwd(ref64, q, k, v, dout, **kw)
    what = f"case {seed} {tuple(q.shape)} {tuple(k.shape)} {sorted(kw)}"
    assert out.dtype == torch.float64 and out.shape == q.shape
    assert_close(out, out_r, atol=1e-10, rtol=1e-10, msg=f"out, {what}")
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
        assert g.dtype == torch.float64
        assert_close(g, g_r, atol=1e-10, rtol=1e-10, msg=f"{name}, {what}")


# ------------------------------------------------------------------------------------------------
# fp16 / bf16 / fp32: within 2x (forward) / 3x (gradients) the same-dtype eager error
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("seed", range(12))
def test_low_precision_within_eager_error(seed, dtype, block_q):
    q, k, v, kw = _case(seed)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 2000)).to(dtype)
    out, grads = fwd_bwd(_cpu, q, k, v, dout, **kw)
    # the reference sees the same (rounded) inputs, upcast: only the computation's error is measured
    out_r, grads_r = fwd_bwd(ref64, *(t.double() for t in (q, k, v)), dout.double(), **kw)
    out_e, grads_e = fwd_bwd(lambda *a, **kw_: ref.attention(*a, compute_dtype=dtype, **kw_), q, k, v, dout, **kw)
    what = f"{dtype} case {seed} {sorted(kw)}"
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Absolute slack: 4 ulps of the largest reference value. Needed where the eager computation is exact
    # by accident (Sk = 1: eager dq = dk = 0 exactly, while the FlashAttention backward's
    # rowsum(dO * O) - dO.V cancels only to rounding); measured worst over 40 cases: 2.6 ulps (fp32).
    slack = 4 * torch.finfo(dtype).eps * max([1.0] + [float(t.abs().max()) for t in (out_r, *grads_r) if t.numel()])
    assert_within_eager_error(out, out_r, out_e, factor=2, slack=slack, msg=f"out, {what}")
    for name, g, g_r, g_e in zip(("dq", "dk", "dv"), grads, grads_r, grads_e):
        assert_within_eager_error(g, g_r, g_e, factor=3, slack=slack, msg=f"{name}, {what}")


# ------------------------------------------------------------------------------------------------
# rows with no visible key
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_rows_without_visible_keys_are_zero_with_zero_gradients(mask_kind, dtype, block_q):
    q, k, v, kw, dead = dead_row_case(mask_kind, dtype)
    assert torch.equal(dead_rows(q, k, kw), dead)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, (dq, dk, dv) = fwd_bwd(_cpu, q, k, v, dout, **kw)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    assert (out[dead] == 0).all(), "output of a row with no visible key"
    assert (dq[dead] == 0).all(), "dq of a row with no visible key"
    assert (dk[0] == 0).all() and (dv[0] == 0).all(), "kv_lengths 0: keys get no gradient"
    assert not (out[~dead] == 0).all(dim=-1).any(), "a row with a visible key came out 0"
    # dead rows contribute nothing: a huge upstream gradient on them changes no gradient
    dout2 = dout.clone()
    dout2[dead] = 1e3
    _, grads2 = fwd_bwd(_cpu, q, k, v, dout2, **kw)
    for name, g, g2 in zip(("dq", "dk", "dv"), (dq, dk, dv), grads2):
        assert_equal(g, g2, msg=f"{name} depends on the upstream gradient of dead rows")
    if dtype == torch.float64:
        out_r, grads_r = fwd_bwd(ref64, q, k, v, dout, **kw)
        assert_close(out, out_r, atol=1e-10, rtol=1e-10, msg="out")
        for name, g, g_r in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_r):
            assert_close(g, g_r, atol=1e-10, rtol=1e-10, msg=name)


def test_every_row_dead_everywhere(block_q):
    """kv_lengths all 0: every block is skipped; output 0, gradients 0, never NaN."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 33, 16, generator=g) for _ in range(3))
    out, grads = fwd_bwd(_cpu, q, k, v, torch.ones(q.shape), kv_lengths=torch.tensor([0, 0]), causal=True)
    assert (out == 0).all() and all((t == 0).all() for t in grads)


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bit_identical_across_runs(dtype, block_q):
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, S, D = 3, 6, 2, 113, 80
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    kw = dict(causal=True, prefix_lengths=torch.tensor([10, 0, 50]), kv_lengths=torch.tensor([113, 60, 0]),
              attn_mask=torch.randn(B, 1, 1, S, generator=g))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    out1, grads1 = fwd_bwd(_cpu, q, k, v, dout, **kw)
    out2, grads2 = fwd_bwd(_cpu, q, k, v, dout, **kw)
    assert_equal(out1, out2, msg="out")
    for name, a, b in zip(("dq", "dk", "dv"), grads1, grads2):
        assert_equal(a, b, msg=name)


# ------------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", OP_CASES)
def test_opcheck_forward(kind):
    args = op_args(kind, requires_grad=True)
    torch.library.opcheck(torch.ops.masklm_kernels.attention_cpu_fwd.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", OP_CASES)
def test_opcheck_backward(kind, dtype):
    args = op_args(kind, dtype)
    q, k, v, *meta = args
    out, lse = torch.ops.masklm_kernels.attention_cpu_fwd(*args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    torch.library.opcheck(torch.ops.masklm_kernels.attention_cpu_bwd.default, (dout, q, k, v, out, lse, *meta))


def _attn_fn(q, k, v, kv_lengths, spans, mask):
    return fused_attention(q, k, v, causal=True, kv_lengths=kv_lengths, spans=spans, span_mode="outside",
                           attn_mask=mask, backend="cpu")


def _check_compiled(fn, seeds, *, atol, rtol):
    for seed in seeds:
        (q, k, v, *meta), dout = compile_inputs(seed)
        out_e, grads_e = fwd_bwd(lambda q_, k_, v_: _attn_fn(q_, k_, v_, *meta), q, k, v, dout)
        out_c, grads_c = fwd_bwd(lambda q_, k_, v_: fn(q_, k_, v_, *meta), q, k, v, dout)
        assert_close(out_c, out_e, atol=atol, rtol=rtol, msg=f"compiled out, seed {seed}")
        for name, a, b in zip(("dq", "dk", "dv"), grads_c, grads_e):
            assert_close(a, b, atol=atol, rtol=rtol, msg=f"compiled {name}, seed {seed}")


def test_compile_aot_eager_equals_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(_attn_fn, backend=counter, fullgraph=True)
    _check_compiled(fn, range(3), atol=0, rtol=0)  # new kv_lengths / spans / mask values each call
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for changed metadata values"
    torch._dynamo.reset()


def test_compile_inductor_equals_eager():
    torch._dynamo.reset()
    fn = torch.compile(_attn_fn, fullgraph=True)
    _check_compiled(fn, range(2), atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_auto_on_cpu_tensors_is_the_cpu_backend(seed):
    q, k, v, kw = _case(seed)
    q, k, v = (t.float() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
    out_a, grads_a = fwd_bwd(lambda *a, **kw_: fused_attention(*a, backend="auto", **kw_), q, k, v, dout, **kw)
    out_c, grads_c = fwd_bwd(_cpu, q, k, v, dout, **kw)
    assert_equal(out_a, out_c, msg="out")
    for name, a, c in zip(("dq", "dk", "dv"), grads_a, grads_c):
        assert_equal(a, c, msg=name)
    assert_equal(fused_attention(q, k, v, **kw), out_c, msg="default backend")


def test_float_attn_mask_gradient_is_not_silently_dropped():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    try:
        out = fused_attention(q, k, v, attn_mask=bias, backend="cpu")
        (grad,) = torch.autograd.grad(out.sum(), bias, allow_unused=True)
    except (ValueError, TypeError, RuntimeError):
        return  # refusing a mask that requires grad would be fine too
    out_r = fused_attention(q, k, v, attn_mask=bias, backend="reference")
    (grad_r,) = torch.autograd.grad(out_r.sum(), bias)
    assert grad is not None, "no gradient for attn_mask"
    assert_close(grad, grad_r, atol=1e-10, rtol=1e-10, msg="d attn_mask")


def test_auto_differentiates_a_float_attn_mask_through_the_reference():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    (grad_auto,) = torch.autograd.grad(fused_attention(q, k, v, attn_mask=bias).sum(), bias)
    (grad_ref,) = torch.autograd.grad(fused_attention(q, k, v, attn_mask=bias, backend="reference").sum(), bias)
    assert_close(grad_auto, grad_ref, atol=1e-12, rtol=1e-12, msg="d attn_mask under backend='auto'")


def test_op_schemas_are_derived_from_the_mask_description():
    """The padded ops' schema is q, k, v (dout ... lse for the backward), `inputs.Mask`'s fields in order,
    the scale, then the dropout arguments (one per `inputs.Dropout` field, defaulting to off): adding a
    field changes every op with it."""
    import dataclasses

    from masklm_kernels.attention.inputs import Dropout, Mask

    fields = [f.name for f in dataclasses.fields(Mask)]
    dropout = ["dropout_p", "dropout_seed", "dropout_offset", "sample_ids"]
    assert len(dropout) == len(dataclasses.fields(Dropout))
    for backend in ("cpu", "triton"):
        fwd = getattr(torch.ops.masklm_kernels, f"attention_{backend}_fwd").default._schema
        bwd = getattr(torch.ops.masklm_kernels, f"attention_{backend}_bwd").default._schema
        assert [a.name for a in fwd.arguments] == ["q", "k", "v", *fields, "scale", *dropout]
        assert [a.name for a in bwd.arguments] == ["dout", "q", "k", "v", "out", "lse", *fields, "scale", *dropout]


def test_a_sliding_window_computes_only_its_band(monkeypatch):
    """Each piece (BLOCK_Q query rows) runs ATen's kernel on the keys its window reaches, not on all Sk: with
    window (8, 8) over 256 keys and 64-row pieces, 64 + 16 keys per piece. Without padding every batch row
    sees the same pairs: one call per query block covers the whole batch (ALiBi slopes per row included),
    and the result is the reference's."""
    monkeypatch.setattr(cpu, "BLOCK_Q", 64)
    calls = []
    flash = cpu._FLASH

    def recording(q, k, v, *args, **kw):
        calls.append(tuple(k.shape[::2]))
        return flash(q, k, v, *args, **kw)

    monkeypatch.setattr(cpu, "_FLASH", recording)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 256, 16, generator=g, dtype=torch.float64) for _ in range(3))
    slopes = torch.rand(3, 2, generator=g)
    for kw in (dict(window_size=(8, 8)), dict(window_size=(8, 8), alibi_slopes=slopes)):
        calls.clear()
        out = _cpu(q, k, v, **kw)
        assert len(calls) == 4 and all(b == 3 and n <= 64 + 16 for b, n in calls), calls
        assert_close(out, ref64(q, k, v, **kw), atol=1e-12, rtol=1e-10, msg=f"windowed cpu vs reference {kw}")
    calls.clear()
    _cpu(q, k, v, window_size=(8, 8), kv_lengths=torch.tensor([256, 200, 100]))  # per-row lengths: per row
    assert len(calls) == 4 + 4 + 2 and all(b == 1 for b, _ in calls), calls
