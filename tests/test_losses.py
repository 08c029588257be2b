"""`masked_cross_entropy` (masklm_kernels/losses/) against float64 `F.cross_entropy` (BRIEF.md, "Cross-entropy
semantics"): values and gradients for every option and reduction on every backend, 3-D inputs, all rows
ignored, large logits, low precision, bad input, the custom ops under opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_equal
from masklm_kernels import fused_linear_cross_entropy, masked_cross_entropy
from masklm_kernels.losses import cpu

BACKENDS = ("cpu", "reference")
# float64 tolerance. Measured: in about 1 process in 8 on this CPU (torch 2.13), the first exp/sum pass of
# a process differs from every later one by ~6e-11 relative in an fp64 logsumexp, in plain torch ops. Every
# algorithmic error is orders of magnitude above this bar.
F64 = dict(atol=1e-10, rtol=1e-9)


@pytest.fixture(params=["default", "chunk=8"])
def chunks(request, monkeypatch):
    """The default chunk (one chunk at these sizes) and 8 rows per chunk (several, the last one partial)."""
    if request.param != "default":
        monkeypatch.setattr(cpu, "CHUNK_ROWS", 8)


def _inputs(seed, N=37, V=101, dtype=torch.float64, ignore_index=-100, frac_ignored=0.4, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < frac_ignored] = ignore_index
    return x, y


def _torch_loss(x, y, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", num_items=None):
    """float64 F.cross_entropy plus z-loss, with num_items; the independent oracle."""
    x = x.double()
    keep = y != ignore_index
    rows = F.cross_entropy(x, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    rows = rows + z_loss * torch.where(keep, torch.logsumexp(x, -1) ** 2, torch.zeros(()))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (num_items if num_items is not None else keep.sum())


def _loss_and_grad(fn, x, y, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, y, **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), grad


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(label_smoothing=1.0),
    dict(z_loss=1e-3),
    dict(z_loss=0.5, label_smoothing=0.2),
    dict(ignore_index=5),
    dict(num_items=50.0),
    dict(num_items=torch.tensor(13)),
]


CASES = [pytest.param(o, r, id=f"{r}-" + (",".join(f"{k}={v}" for k, v in o.items()) or "plain"))
         for o in OPTIONS for r in ("mean", "sum", "none") if r == "mean" or "num_items" not in o]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts, reduction", CASES)
def test_float64_equals_torch(opts, reduction, backend, chunks):
    x, y = _inputs(1, ignore_index=opts.get("ignore_index", -100))
    upstream = torch.randn(y.shape, dtype=torch.float64) if reduction == "none" else None
    loss, grad = _loss_and_grad(masked_cross_entropy, x, y, upstream, reduction=reduction, backend=backend, **opts)
    loss_r, grad_r = _loss_and_grad(_torch_loss, x, y, upstream, reduction=reduction, **opts)
    assert loss.dtype == torch.float64 and loss.shape == loss_r.shape
    assert_close(loss, loss_r, **F64, msg=f"loss {backend} {reduction} {opts}")
    assert_close(grad, grad_r, **F64, msg=f"grad {backend} {reduction} {opts}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_inputs_and_a_vocabulary_not_a_multiple_of_any_block(backend, chunks):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 30522, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30522, (3, 5), generator=g)
    y[0, :3] = -100
    for reduction in ("mean", "none"):
        loss, grad = _loss_and_grad(masked_cross_entropy, x, y, reduction=reduction, label_smoothing=0.1,
                                    backend=backend)
        loss_r, grad_r = _loss_and_grad(lambda a, b, **kw: _torch_loss(a.flatten(0, 1), b.flatten(), **kw)
                                        .reshape(b.shape if reduction == "none" else ()), x, y,
                                        reduction=reduction, label_smoothing=0.1)
        assert loss.shape == loss_r.shape
        assert_close(loss, loss_r, **F64, msg=f"3-D loss {reduction}")
        assert_close(grad, grad_r, **F64, msg=f"3-D grad {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(reduction, backend):
    x, _ = _inputs(3)
    y = torch.full((x.shape[0],), -100)
    loss, grad = _loss_and_grad(masked_cross_entropy, x, y, reduction=reduction, z_loss=0.1, backend=backend)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    x, y = _inputs(4, scale=1e4)
    x = x.float()
    loss, grad = _loss_and_grad(masked_cross_entropy, x, y, backend=backend, z_loss=1e-4)
    loss_r, grad_r = _loss_and_grad(_torch_loss, x.double(), y, z_loss=1e-4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, loss_r.float(), atol=0, rtol=1e-5, msg="loss at |x| ~ 1e4")
    assert_close(grad, grad_r.float(), atol=1e-6, rtol=1e-4, msg="grad at |x| ~ 1e4")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_accumulates_in_fp32(dtype, backend):
    """Loss and gradients of bf16/fp16 logits equal the fp64 computation on the same (rounded) logits up to
    one rounding of the result: the accumulation is fp32, including the true-class gradient of confident
    predictions (p close to 1, where p - 1 cancels)."""
    x, y = _inputs(5, N=64, V=1000, dtype=dtype)
    keep = y != -100
    x[keep, y[keep]] += 12  # confident: the true class dominates, its gradient p - 1 is tiny
    loss, grad = _loss_and_grad(masked_cross_entropy, x, y, backend=backend, label_smoothing=0.05)
    loss_r, grad_r = _loss_and_grad(_torch_loss, x.double(), y, label_smoothing=0.05)
    eps = torch.finfo(dtype).eps
    subnormal = torch.finfo(dtype).smallest_normal * eps  # spacing of the subnormals (fp16: 6e-8)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, loss_r, atol=0, rtol=eps, msg="loss")
    assert_close(grad, grad_r, atol=subnormal, rtol=eps, msg="grad")
    true = grad[keep, y[keep]].double()
    assert_close(true, grad_r[keep, y[keep]], atol=0, rtol=eps, msg="true-class gradient")


def test_backends_agree_bitwise_in_float32_and_are_deterministic():
    x, y = _inputs(6, N=300, V=517, dtype=torch.float32)
    a = _loss_and_grad(masked_cross_entropy, x, y, backend="cpu", z_loss=1e-2)
    b = _loss_and_grad(masked_cross_entropy, x, y, backend="cpu", z_loss=1e-2)
    assert_equal(a[0], b[0], msg="loss")
    assert_equal(a[1], b[1], msg="grad")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

_X, _Y = _inputs(7, N=6, V=11, dtype=torch.float32)

BAD = [
    ("logits-list", TypeError, r"logits must be a torch.Tensor", dict(logits=[[0.0]])),
    ("logits-int", TypeError, r"logits must be float16", dict(logits=_X.long())),
    ("logits-1d", ValueError, r"logits must be \(N, V\) or \(B, S, V\)", dict(logits=_X[0])),
    ("labels-float", TypeError, r"labels must be a signed integer", dict(labels=_Y.float())),
    ("labels-uint8", TypeError, r"labels must be a signed integer", dict(labels=_Y.clamp_min(0).to(torch.uint8))),
    ("labels-shape", ValueError, r"labels must have shape \(6,\)", dict(labels=_Y[:5])),
    ("labels-device", ValueError, r"labels must be on the device of logits", dict(labels=_Y.to("meta"))),
    ("labels-too-big", ValueError, r"labels must be in \[0, 11\) or ignore_index",
     dict(labels=_Y.clamp_min(0) + 11)),
    ("labels-negative", ValueError, r"labels must be in \[0, 11\)", dict(labels=torch.full((6,), -1))),
    ("reduction", ValueError, r"reduction must be one of", dict(reduction="avg")),
    ("smoothing-high", ValueError, r"label_smoothing must be in \[0.0, 1.0\]", dict(label_smoothing=1.5)),
    ("smoothing-str", TypeError, r"label_smoothing must be a float", dict(label_smoothing="0.1")),
    ("z_loss-negative", ValueError, r"z_loss must be in", dict(z_loss=-1.0)),
    ("ignore_index-float", TypeError, r"ignore_index must be an int", dict(ignore_index=-100.0)),
    ("num_items-zero", ValueError, r"num_items must be > 0", dict(num_items=0)),
    ("num_items-str", TypeError, r"num_items must be a positive number", dict(num_items="3")),
    ("num_items-1d", TypeError, r"num_items must be a number or a 0-dim tensor", dict(num_items=torch.ones(2))),
    ("backend", ValueError, r"backend must be one of", dict(backend="triton-ish")),
]


@pytest.mark.parametrize("name, exc, match, kw", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_naming_the_argument(name, exc, match, kw):
    kw = dict(kw)
    logits, labels = kw.pop("logits", _X), kw.pop("labels", _Y)
    for backend in ((kw.pop("backend"),) if "backend" in kw else BACKENDS):
        with pytest.raises(exc, match=match):
            masked_cross_entropy(logits, labels, backend=backend, **kw)


# ------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x, y = _inputs(8, N=20, V=33, dtype=dtype)
    torch.library.opcheck(torch.ops.masklm_kernels.cross_entropy_cpu_fwd.default,
                          (x.requires_grad_(), y, -100, 0.1, 1e-3))
    rows, lse = torch.ops.masklm_kernels.cross_entropy_cpu_fwd(x.detach(), y, -100, 0.1, 1e-3)
    torch.library.opcheck(torch.ops.masklm_kernels.cross_entropy_cpu_bwd.default,
                          (torch.randn(rows.shape), x.detach(), y, lse, -100, 0.1, 1e-3))


def test_compile_fullgraph_equals_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(x, y):
        return masked_cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, backend="cpu")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for seed in range(3):  # other labels (and ignored rows) each call
        x, y = _inputs(10 + seed, dtype=torch.float32)
        loss_e, grad_e = _loss_and_grad(fn, x, y)
        loss_c, grad_c = _loss_and_grad(compiled, x, y)
        assert_equal(loss_c, loss_e, msg=f"compiled loss, seed {seed}")
        assert_equal(grad_c, grad_e, msg=f"compiled grad, seed {seed}")
    assert counter.frame_count == 1
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ------------------------------------------------------------------------------------------------

def _linear_inputs(seed, N=37, H=24, V=57, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.4] = -100
    return h, w, b, y


def _linear_grads(fn, h, w, b, y, upstream=None, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, **kw)
    grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), grads


def _torch_linear(h, w, y, *, bias=None, **kw):
    return _torch_loss(F.linear(h.double(), w.double(), None if bias is None else bias.double()), y, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("opts, reduction", CASES)
def test_linear_float64_equals_torch(opts, reduction, with_bias, backend, chunks):
    h, w, b, y = _linear_inputs(20, bias=with_bias)
    if "ignore_index" in opts:
        y = torch.where(y == -100, opts["ignore_index"], y)
    upstream = torch.randn(y.shape, dtype=torch.float64) if reduction == "none" else None
    loss, grads = _linear_grads(fused_linear_cross_entropy, h, w, b, y, upstream, reduction=reduction,
                                backend=backend, **opts)
    loss_r, grads_r = _linear_grads(_torch_linear, h, w, b, y, upstream, reduction=reduction, **opts)
    assert_close(loss, loss_r, **F64, msg=f"loss {backend} {reduction} {opts}")
    for name, g, g_r in zip(("d hidden", "d weight", "d bias"), grads, grads_r):
        assert_close(g, g_r, **F64, msg=f"{name} {backend} {reduction} {opts}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_three_d_and_every_row_ignored(backend):
    h, w, b, y = _linear_inputs(21, N=30)
    h3, y3 = h.reshape(5, 6, -1), y.reshape(5, 6)
    loss, grads = _linear_grads(fused_linear_cross_entropy, h3, w, b, y3, backend=backend, z_loss=1e-2)
    loss_r, grads_r = _linear_grads(_torch_linear, h, w, b, y, z_loss=1e-2)
    assert_close(loss, loss_r, **F64, msg="3-D loss")
    assert_close(grads[0].reshape(h.shape), grads_r[0], **F64, msg="3-D d hidden")
    none = torch.full_like(y3, -100)
    loss, grads = _linear_grads(fused_linear_cross_entropy, h3, w, b, none, backend=backend)
    assert loss == 0 and all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bf16_accumulates_in_fp32(backend):
    h, w, b, y = _linear_inputs(22, N=64, H=64, V=500, dtype=torch.bfloat16)
    loss, grads = _linear_grads(fused_linear_cross_entropy, h, w, b, y, backend=backend, label_smoothing=0.1)
    loss_r, grads_r = _linear_grads(_torch_linear, h, w, b, y, label_smoothing=0.1)
    eps = torch.finfo(torch.bfloat16).eps
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_close(loss, loss_r, atol=0, rtol=eps, msg="loss")
    for name, g, g_r in zip(("d hidden", "d weight", "d bias"), grads, grads_r):
        # one bf16 rounding of an fp32 accumulation (fp32's own error is far below bf16's ulp)
        assert_close(g, g_r, atol=1e-30, rtol=eps, msg=name)


def test_linear_cpu_never_holds_the_full_logits():
    """Peak memory of forward + backward (torch's CPU allocator, as the benchmark harness measures it) stays far
    below the (N, V) fp32 logits that an unfused head would allocate."""
    from benchmarks.harness import Case, peak_memory

    N, H, V = 2048, 64, 8000
    h, w, _, y = _linear_inputs(23, N=N, H=H, V=V, dtype=torch.float32, bias=False)
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        torch.autograd.grad(fused_linear_cross_entropy(h, w, y, backend="cpu"), (h, w))

    peak, method = peak_memory(Case("fused_linear_cross_entropy", "cpu", {}, fn=step))
    full_logits = N * V * 4
    chunk = cpu.CHUNK_ROWS * V * 4
    assert peak is not None, method
    # a chunk of logits, its probabilities and gradient, plus fp32 weight, its gradient and d hidden
    assert peak < 4 * chunk + 3 * V * H * 4 + N * H * 4 < full_logits, f"peak {peak} B vs full logits {full_logits} B"


LINEAR_BAD = [
    ("hidden-1d", ValueError, r"hidden must be \(N, H\) or \(B, S, H\)", dict(hidden=torch.randn(4))),
    ("hidden-int", TypeError, r"hidden must be float16", dict(hidden=torch.ones(6, 4, dtype=torch.long))),
    ("weight-size", ValueError, r"weight must be \(V, H\) with H = hidden's last size \(4\)",
     dict(weight=torch.randn(9, 5))),
    ("weight-dtype", TypeError, r"weight must have the dtype of hidden", dict(weight=torch.randn(9, 4).double())),
    ("weight-device", ValueError, r"weight must be on the device of hidden",
     dict(weight=torch.randn(9, 4, device="meta"))),
    ("bias-shape", ValueError, r"bias must have shape \(9,\)", dict(bias=torch.randn(8))),
    ("bias-dtype", TypeError, r"bias must have the dtype of hidden", dict(bias=torch.randn(9).half())),
    ("labels-shape", ValueError, r"labels must have shape \(6,\)", dict(labels=torch.zeros(5, dtype=torch.long))),
    ("labels-float", TypeError, r"labels must be a signed integer", dict(labels=torch.zeros(6))),
    ("labels-range", ValueError, r"labels must be in \[0, 9\)", dict(labels=torch.full((6,), 9))),
    ("reduction", ValueError, r"reduction must be one of", dict(reduction="max")),
    ("smoothing", ValueError, r"label_smoothing must be in", dict(label_smoothing=-0.1)),
]


@pytest.mark.parametrize("name, exc, match, kw", LINEAR_BAD, ids=[b[0] for b in LINEAR_BAD])
def test_linear_bad_input_is_refused_naming_the_argument(name, exc, match, kw):
    kw = dict(kw)
    hidden, weight = kw.pop("hidden", torch.randn(6, 4)), kw.pop("weight", torch.randn(9, 4))
    labels = kw.pop("labels", torch.zeros(6, dtype=torch.long))
    for backend in BACKENDS:
        with pytest.raises(exc, match=match):
            fused_linear_cross_entropy(hidden, weight, labels, backend=backend, **kw)


def test_linear_opcheck_and_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    h, w, b, y = _linear_inputs(24, dtype=torch.float32)
    torch.library.opcheck(torch.ops.masklm_kernels.linear_cross_entropy_cpu_fwd.default,
                          (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, -100, 0.1, 1e-3))
    rows, lse = torch.ops.masklm_kernels.linear_cross_entropy_cpu_fwd(h.detach(), w.detach(), None, y, -100, 0.0, 0.0)
    torch.library.opcheck(torch.ops.masklm_kernels.linear_cross_entropy_cpu_bwd.default,
                          (torch.randn(rows.shape), h.detach(), w.detach(), None, y, lse, -100, 0.0, 0.0))

    def fn(h_, w_, b_, y_):
        return fused_linear_cross_entropy(h_, w_, y_, bias=b_, label_smoothing=0.1, backend="cpu")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for seed in range(2):
        h, w, b, y = _linear_inputs(30 + seed, dtype=torch.float32)
        eager = _linear_grads(lambda *a, bias=None, **kw: fn(a[0], a[1], bias, a[2]), h, w, b, y)
        comp = _linear_grads(lambda *a, bias=None, **kw: compiled(a[0], a[1], bias, a[2]), h, w, b, y)
        for name, a, c in zip(("loss", "d hidden", "d weight", "d bias"), (eager[0], *eager[1]),
                              (comp[0], *comp[1])):
            assert_equal(c, a, msg=f"compiled {name}, seed {seed}")
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_modules_forward_their_options():
    from masklm_kernels.losses import FusedLinearCrossEntropyLoss, MaskedCrossEntropyLoss

    x, y = _inputs(40, dtype=torch.float32)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    assert_equal(MaskedCrossEntropyLoss(**opts)(x, y), masked_cross_entropy(x, y, **opts), msg="module loss")
    h, w, b, y = _linear_inputs(41, dtype=torch.float32)
    module = FusedLinearCrossEntropyLoss(**opts)
    assert "label_smoothing=0.1" in repr(module)
    assert_equal(module(h, w, y, bias=b, num_items=None), fused_linear_cross_entropy(h, w, y, bias=b, **opts),
                 msg="fused module loss")
