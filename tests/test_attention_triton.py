"""`fused_attention(..., backend="triton")` and `fused_attention_varlen` (triton_fwd.py, triton_bwd.py) against
the float64 specification. Without a GPU the kernels run under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), with a GPU for real (docs/TESTING.md): forward and gradients,
the low-precision bar, rows with no visible key, poisoned outputs, determinism, the work counters (tiles
computed == tiles holding a visible pair; fully visible tiles skip the mask), the custom ops under opcheck
and torch.compile, and the backend choice."""
from __future__ import annotations

import math

import pytest
import torch

from masklm_kernels import BackendUnavailableError, fused_attention, fused_attention_varlen
from masklm_kernels.attention import masks
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
    visibility_of,
)
from helpers import assert_close, assert_equal, assert_within_eager_error, sweep

triton = pytest.importorskip("triton", reason="triton is not installed")
from masklm_kernels.attention import triton_bwd, triton_fwd, triton_host  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = sweep(40, fast=16)
SMALL = {"fwd": triton_host.BlockConfig(16, 16, 4, 1), "dkdv": triton_host.BlockConfig(16, 32, 4, 1),
         "dq": triton_host.BlockConfig(32, 16, 4, 1)}


@pytest.fixture(params=["default", "small"], ids=lambda b: f"blocks={b}")
def blocks(request, monkeypatch):
    """The library's tile configurations (one or two tiles per side at these sizes), and 16-32 wide tiles
    (many tiles per side: skipped, partial and full ones in one launch)."""
    if request.param == "small":
        small = lambda kernel, *a, **kw: SMALL[kernel]  # noqa: E731
        monkeypatch.setattr(triton_fwd, "block_config", small)
        monkeypatch.setattr(triton_bwd, "block_config", small)
    return request.param


def _case(seed, seqs=(1, 17, 113)):
    return attention_case(seed, label="attention triton backend", seqs=seqs, head_dims=(40, 80),
                          spans_within_keys=True, mask_shapes=MASK_SHAPES, zero_rows=True, positions=True)


def _dev(x):
    return {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in x.items()}


def _triton(q, k, v, **kw):
    return fused_attention(q, k, v, backend="triton", **_dev(kw))


def _on_device(*ts):
    return tuple(t.to(DEVICE) for t in ts)


# ------------------------------------------------------------------------------------------------
# float64 (interpreter) / fp32: equal to the specification
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_forward_and_gradients_equal_reference(seed, blocks):
    q, k, v, kw = _case(seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    # fp64 runs under the interpreter only (no GPU configuration); on a GPU the case runs in fp32
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    out, grads = fwd_bwd(_triton, *_on_device(*(t.to(dtype) for t in (q, k, v)), dout.to(dtype)), **kw)
    out_r, grads_r = fwd_bwd(ref64, q, k, v, dout, **kw)
    what = f"case {seed} {tuple(q.shape)} {tuple(k.shape)} {sorted(kw)}"
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out.cpu(), out_r.to(dtype), **tol, msg=f"out, {what}")
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
        assert_close(g.cpu(), g_r.to(dtype), **tol, msg=f"{name}, {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("seed", range(12))
def test_low_precision_within_eager_error(seed, dtype):
    q, k, v, kw = _case(seed)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 2000)).to(dtype)
    out, grads = fwd_bwd(_triton, *_on_device(q, k, v, dout), **kw)
    out_r, grads_r = fwd_bwd(ref64, *(t.double() for t in (q, k, v)), dout.double(), **kw)
    out_e, grads_e = fwd_bwd(lambda *a, **kw_: ref.attention(*a, compute_dtype=dtype, **kw_), q, k, v, dout, **kw)
    what = f"{dtype} case {seed} {sorted(kw)}"
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Slack: 4 ulps of the largest reference value, as the cpu backend's test (eager can be exact by
    # accident), times (1 + max|scaled score|): the flash backward recomputes P from the forward's lse with
    # products summed in another order (S^T in the dK/dV kernel), so P carries ulps of |s| that eager's
    # stored P does not; dq and dk also get 4 ulps of the backward's cancellation (`_cancellation`).
    eps = torch.finfo(dtype).eps
    big = max([1.0] + [float(t.abs().max()) for t in (out_r, *grads_r) if t.numel()])
    slack = 4 * eps * big * (1 + _max_score(q, k, kw))
    cancel = _cancellation(q, k, dout, out_r, kw.get("scale", q.shape[-1] ** -0.5))
    assert_within_eager_error(out.cpu(), out_r, out_e, factor=2, slack=slack, msg=f"out, {what}")
    for name, g, g_r, g_e, c in zip(("dq", "dk", "dv"), grads, grads_r, grads_e, (*cancel, 0.0)):
        assert_within_eager_error(g.cpu(), g_r, g_e, factor=3, slack=slack + 4 * eps * c, msg=f"{name}, {what}")


def _max_score(q, k, kw) -> float:
    """max |scale * q.k + float attn_mask| over all pairs (an upper bound over the visible ones)."""
    if not q.numel() or not k.numel():
        return 0.0
    rep = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2)).abs().amax()
    bias = kw.get("attn_mask")
    finite = 0.0 if bias is None or bias.dtype == torch.bool else float(bias[torch.isfinite(bias)].abs().max())
    return float(s) * kw.get("scale", q.shape[-1] ** -0.5) + finite


def _cancellation(q, k, dout, out, scale) -> tuple[float, float]:
    """The FlashAttention backward forms dS = P * (dO.V - rowsum(dO * O)) from two terms that cancel (exactly
    so for a row with one visible key, where eager's dq is exactly 0): dq and dk carry an absolute error of
    a few ulps of scale * max_i sum_d |dO_id O_id| times max|k| (dq) or max|q| (dk), whatever eager's."""
    if not q.numel() or not k.numel():
        return 0.0, 0.0
    row = float((dout.double().abs() * out.double().abs()).sum(-1).max())
    return scale * row * float(k.abs().max()), scale * row * float(q.abs().max())


def test_outputs_are_fully_written(monkeypatch):
    """Every buffer the launchers allocate (out, lse, delta, dq, dk, dv) starts NaN-filled: none is read
    before it is written, and nothing is left unwritten (dead rows and padding included)."""
    real_empty_like = torch.empty_like

    def poisoned(*a, **kw):
        t = real_empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)

    monkeypatch.setattr(torch, "empty_like", poisoned)
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(torch.zeros(*a, **kw)))
    for seed in range(6):
        q, k, v, kw = _case(seed, seqs=(17, 40))
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        dtype = torch.float64 if DEVICE == "cpu" else torch.float32
        out, grads = fwd_bwd(_triton, *_on_device(*(t.to(dtype) for t in (q, k, v)), dout.to(dtype)), **kw)
        out_r, grads_r = fwd_bwd(ref64, q, k, v, dout, **kw)
        for name, t, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_r, *grads_r)):
            assert torch.isfinite(t).all(), f"{name} not fully written (case {seed})"
            assert_close(t.cpu(), r.to(dtype), atol=2e-5, rtol=2e-5, msg=f"{name}, case {seed}")


# ------------------------------------------------------------------------------------------------
# rows with no visible key, determinism
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_rows_without_visible_keys_are_zero_with_zero_gradients(mask_kind, dtype, blocks):
    q, k, v, kw, dead = dead_row_case(mask_kind, dtype)
    assert torch.equal(dead_rows(q, k, kw), dead)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, (dq, dk, dv) = (t.cpu() if isinstance(t, torch.Tensor) else tuple(g.cpu() for g in t)
                         for t in fwd_bwd(_triton, *_on_device(q, k, v, dout), **kw))
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    assert (out[dead] == 0).all() and (dq[dead] == 0).all(), "a row with no visible key got output / gradient"
    assert (dk[0] == 0).all() and (dv[0] == 0).all(), "kv_lengths 0: keys get no gradient"
    assert not (out[~dead] == 0).all(dim=-1).any(), "a row with a visible key came out 0"
    dout2 = dout.clone()
    dout2[dead] = 1e3
    _, grads2 = fwd_bwd(_triton, *_on_device(q, k, v, dout2), **kw)
    for name, g, g2 in zip(("dq", "dk", "dv"), (dq, dk, dv), grads2):
        assert_equal(g, g2.cpu(), msg=f"{name} depends on the upstream gradient of dead rows")


def test_backward_is_bit_identical_across_runs():
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, S, D = 2, 6, 2, 70, 80
    q, k, v, dout = _on_device(*(torch.randn(B, h, S, D, generator=g).to(torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq)))
    kw = dict(causal=True, prefix_lengths=torch.tensor([10, 50]), kv_lengths=torch.tensor([70, 33]),
              attn_mask=torch.randn(B, 1, 1, S, generator=g))
    out1, grads1 = fwd_bwd(_triton, q, k, v, dout, **kw)
    out2, grads2 = fwd_bwd(_triton, q, k, v, dout, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out1, *grads1), (out2, *grads2)):
        assert_equal(a, b, msg=name)


# ------------------------------------------------------------------------------------------------
# work: tiles computed == tiles holding a visible pair; fully visible tiles skip the mask
# ------------------------------------------------------------------------------------------------

def _single_span_case(seed):
    """Metadata masks only (every kind and combination, windows and ALiBi included), spans one per row or
    "outside": the cases where "every pair of the tile visible" is decided exactly (overlapping inside-spans
    are decided conservatively)."""
    q, k, v, kw = attention_case(seed, label="attention triton tiles", seqs=(1, 17, 70), head_dims=(16,),
                                 spans_within_keys=True, zero_rows=True, positions=True)
    kw.pop("attn_mask", None)
    if "spans" in kw and kw["span_mode"] == "inside" and kw["spans"].dim() == 3:
        kw["spans"] = kw["spans"][:, :1]
    if "spans" in kw and kw["span_mode"] == "outside":
        # a window over keys with gaps (the spans) is classified conservatively: a tile whose window part
        # falls in a gap is computed (and fully masked)
        kw.pop("window_size", None)
    return q, k, v, kw


@pytest.mark.parametrize("seed", sweep(24, fast=10))
def test_tiles_computed_are_exactly_the_tiles_with_a_visible_pair(seed, blocks):
    q, k, v, kw = _single_span_case(seed)
    with triton_host.record_tiles() as launches:
        fwd_bwd(_triton, *_on_device(q, k, v, torch.randn(q.shape, dtype=q.dtype)), **kw)
    B, Hq, Sq, _ = q.shape
    vis = visibility_of(q, k, kw).expand(B, Hq, Sq, k.shape[2])
    assert [launch.kernel for launch in launches] == ["fwd", "dkdv", "dq"]
    for launch in launches:
        needed = ref.tiles_needed(vis, launch.block_m, launch.block_n)
        full = ref.tiles_full(vis, launch.block_m, launch.block_n)
        what = f"{launch.kernel} {launch.block_m}x{launch.block_n}, case {seed} {sorted(kw)}"
        assert launch.computed == needed, f"{what}: computed {launch.computed} tiles, {needed} hold a visible pair"
        assert launch.masked == needed - full, \
            f"{what}: {launch.masked} tiles masked, {needed - full} are not fully visible"


def test_dense_mask_tiles_are_all_masked_and_skipping_still_follows_the_metadata():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=g) for _ in range(3))
    kw = dict(causal=True, kv_lengths=torch.tensor([40, 70]))
    mask = torch.rand(70, 70, generator=g) < 0.5
    with triton_host.record_tiles() as launches:
        _triton(*_on_device(q, k, v), attn_mask=mask, **kw)
    vis = masks.visibility(q.shape[0], q.shape[2], k.shape[2], **kw).expand(q.shape[0], q.shape[1], -1, -1)
    (launch,) = launches
    assert launch.computed == ref.tiles_needed(vis, launch.block_m, launch.block_n) == launch.masked


# ------------------------------------------------------------------------------------------------
# varlen
# ------------------------------------------------------------------------------------------------

def _varlen_case(seed):
    g = torch.Generator().manual_seed(seed)
    B = 4
    lq = torch.randint(0, 40, (B,), generator=g)
    lk = torch.randint(0, 40, (B,), generator=g)
    lq[1], lk[2] = 0, 0  # an empty query sequence, a sequence with no keys
    cu = lambda L: torch.cat([torch.zeros(1, dtype=torch.int64), L.cumsum(0)]).to(torch.int32)  # noqa: E731
    Hkv = 2
    Hq = Hkv * (1 + seed % 3)
    D = (40, 80, 64)[seed % 3]
    q = torch.randn(int(lq.sum()), Hq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(int(lk.sum()), Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, cu(lq), cu(lk), int(lq.max()), int(lk.max())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_varlen_equals_reference(seed, causal, blocks):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(seed)
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    run = lambda q_, k_, v_, backend, dev: fused_attention_varlen(  # noqa: E731
        q_, k_, v_, cu_q.to(dev), cu_k.to(dev), mq, mk, causal=causal, backend=backend)
    out, grads = fwd_bwd(lambda *a: run(*a, "triton", DEVICE), *_on_device(*(t.to(dtype) for t in (q, k, v)),
                                                                           dout.to(dtype)))
    out_r, grads_r = fwd_bwd(lambda *a: run(*a, "reference", "cpu"), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_r, *grads_r)):
        assert_close(a.cpu(), b.to(dtype), **tol, msg=f"varlen {name}, case {seed}")


def test_varlen_low_precision_within_eager_error():
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(7)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    run = lambda backend, dt, dev: fused_attention_varlen(  # noqa: E731
        *(t.to(dev, dt) for t in (q, k, v)), cu_q.to(dev), cu_k.to(dev), mq, mk, causal=True, backend=backend)
    out = run("triton", torch.bfloat16, DEVICE).cpu()
    ref_out = run("reference", torch.float64, "cpu")
    eager = torch.cat([ref.attention(*(t[a:b].transpose(0, 1)[None] for t in (q,)),
                                     *(t[c:d].transpose(0, 1)[None] for t in (k, v)), causal=True,
                                     compute_dtype=torch.bfloat16)[0].transpose(0, 1)
                       for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(),
                                             cu_k[1:].tolist())])
    assert_within_eager_error(out, ref_out, eager, factor=2, slack=4 * 2 ** -8, msg="varlen bf16")


# ------------------------------------------------------------------------------------------------
# custom ops, torch.compile, backend choice
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", OP_CASES)
def test_opcheck(kind):
    args = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in op_args(kind, requires_grad=True))
    torch.library.opcheck(torch.ops.masklm_kernels.attention_triton_fwd.default, args)
    q, k, v, *meta = (t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    out, lse = torch.ops.masklm_kernels.attention_triton_fwd(q, k, v, *meta)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.device)
    torch.library.opcheck(torch.ops.masklm_kernels.attention_triton_bwd.default, (dout, q, k, v, out, lse, *meta))


def test_opcheck_varlen():
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(1)
    slopes = torch.rand(cu_q.shape[0] - 1, q.shape[1], generator=torch.Generator().manual_seed(2))
    args = (*_on_device(*(t.float().requires_grad_() for t in (q, k, v)), cu_q, cu_k), mq, mk, True, 6, 0,
            slopes.to(DEVICE), 0.2)
    torch.library.opcheck(torch.ops.masklm_kernels.attention_varlen_triton_fwd.default, args)


def test_compile_fullgraph_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(q, k, v, kv_lengths, spans, mask):
        return fused_attention(q, k, v, causal=True, kv_lengths=kv_lengths, spans=spans, span_mode="outside",
                               attn_mask=mask, backend="triton")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for seed in range(3):  # new lengths / spans / mask values each call
        (q, k, v, *meta), dout = compile_inputs(seed)
        q, k, v, dout, *meta = _on_device(q, k, v, dout, *meta)
        out_e, grads_e = fwd_bwd(lambda *a: fn(*a, *meta), q, k, v, dout)
        out_c, grads_c = fwd_bwd(lambda *a: compiled(*a, *meta), q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out_c, *grads_c), (out_e, *grads_e)):
            assert_equal(a, b, msg=f"compiled {name}, seed {seed}")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for changed metadata values"
    torch._dynamo.reset()


def test_auto_keeps_cpu_tensors_on_the_cpu_backend_even_under_the_interpreter():
    q, k, v, kw = _case(2)
    q, k, v = (t.float() for t in (q, k, v))
    assert_equal(fused_attention(q, k, v, **kw), fused_attention(q, k, v, backend="cpu", **kw), msg="auto on CPU")


def test_explicit_triton_explains_why_it_cannot_run(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="interpreter"):
        fused_attention(q, q, q, backend="triton")
    bias = torch.zeros(8, 8, requires_grad=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="attn_mask"):
        fused_attention(q, q, q, attn_mask=bias, backend="triton")


def test_block_configs_cover_every_head_dim():
    for kernel in ("fwd", "dkdv", "dq"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for D in range(16, 257, 8):
                if triton_host.unsupported(dtype, D):
                    continue
                for dense, dropout in ((False, False), (True, False), (False, True), (True, True)):
                    cfg = triton_host.block_config(kernel, D, dtype, dense, dropout)
                    assert cfg.block_m >= 16 and cfg.block_n >= 16 and math.log2(cfg.block_m).is_integer()


def test_triton_backend_names_the_inputs_it_has_no_gpu_configuration_for():
    """On CUDA tensors (facts only: no GPU needed) fp64, and fp32 with head_dim > 128, are refused with the
    reason; `auto` then takes the reference."""
    from masklm_kernels.attention.api import BACKENDS

    triton_backend = next(b for b in BACKENDS if b.name == "triton")
    cuda = torch.device("cuda")
    reasons = lambda dtype, d: triton_backend.not_supported_reasons(  # noqa: E731
        cuda, dict(device=cuda, dtype=dtype, head_dim=d))
    assert any("float64" in r for r in reasons(torch.float64, 64))
    assert any("head_dim > 128" in r for r in reasons(torch.float32, 136))
    assert reasons(torch.float32, 128) == [] and reasons(torch.bfloat16, 256) == []


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_varlen_custom_ops_opcheck_and_compile(backend):
    """The packed layout's custom ops of both backends: opcheck, and torch.compile(fullgraph=True) equal to
    eager without recompiling for new cu_seqlens values of the same batch size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dev = DEVICE if backend == "triton" else "cpu"
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(3)
    q, k, v, cu_q, cu_k = (t.to(dev) for t in (q.float(), k.float(), v.float(), cu_q, cu_k))
    op = getattr(torch.ops.masklm_kernels, f"attention_varlen_{backend}_fwd")
    torch.library.opcheck(op.default, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, mq, mk,
                                       True, -1, -1, None, 0.2))

    def fn(q_, k_, v_, cu_q_, cu_k_):
        return fused_attention_varlen(q_, k_, v_, cu_q_, cu_k_, mq, mk, causal=True, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    lengths = cu_q[1:] - cu_q[:-1]
    for order in (lengths, lengths.flip(0)):  # the same tokens split into sequences differently
        cq = torch.cat([cu_q[:1], order.cumsum(0).to(torch.int32)])
        out_e, grads_e = fwd_bwd(lambda *a: fn(*a, cq, cu_k), q, k, v, dout)
        out_c, grads_c = fwd_bwd(lambda *a: compiled(*a, cq, cu_k), q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out_c, *grads_c), (out_e, *grads_e)):
            assert_equal(a, b, msg=f"compiled varlen {name}, lengths {order.tolist()}")
    assert counter.frame_count == 1
    torch._dynamo.reset()
