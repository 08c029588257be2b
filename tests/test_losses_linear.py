"""`fused_linear_cross_entropy` (the LM head fused with the masked loss) against float64 F.linear +
F.cross_entropy on every backend: values and the gradients of hidden, weight and bias for every option and
reduction, 3-D inputs, every row ignored, bf16 accumulation, memory bound, the labelled-row bound
(`max_labelled_rows`), bad input, the custom ops under opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from masklm_kernels import fused_linear_cross_entropy
from masklm_kernels.losses import cpu
from masklm_kernels.losses.inputs import LossOptions

from helpers import assert_close, assert_equal, assert_within_eager_error
from losses_cases import BACKENDS, CASES, F64, _linear_grads, _linear_inputs, _torch_linear, chunks  # noqa: F401


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
def test_linear_bf16_accumulates_in_fp32(backend, chunks):
    """cpu and reference compute in fp32 from the bf16 inputs: one bf16 rounding of the result. triton runs
    the GPU pipeline -- bf16 logits and gradient chunks between bf16 matmuls that accumulate in fp32, the
    loss kernel in fp32, d weight summed over chunks in fp32 -- and meets the brief's low-precision bar
    against eager bf16 PyTorch (F.linear + F.cross_entropy), which rounds at the same places."""
    h, w, b, y = _linear_inputs(22, N=64, H=64, V=500, dtype=torch.bfloat16)
    loss, grads = _linear_grads(fused_linear_cross_entropy, h, w, b, y, backend=backend, label_smoothing=0.1)
    loss_r, grads_r = _linear_grads(_torch_linear, h, w, b, y, label_smoothing=0.1)
    eps = torch.finfo(torch.bfloat16).eps
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    names = ("d hidden", "d weight", "d bias")
    if backend != "triton":
        assert_close(loss, loss_r, atol=0, rtol=eps, msg="loss")
        for name, g, g_r in zip(names, grads, grads_r):
            # one bf16 rounding of an fp32 accumulation (fp32's own error is far below bf16's ulp)
            assert_close(g, g_r, atol=1e-30, rtol=eps, msg=name)
        return
    loss_e, grads_e = _linear_grads(lambda h_, w_, y_, bias=None, **kw: F.cross_entropy(
        F.linear(h_, w_, bias), y_, **kw), h, w, b, y, label_smoothing=0.1)
    assert_within_eager_error(loss, loss_r, loss_e, factor=2, slack=1e-6, msg="loss")
    for name, g, g_r, g_e in zip(names, grads, grads_r, grads_e):
        assert_within_eager_error(g, g_r, g_e, factor=3, slack=1e-6, msg=name)


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
    chunk = cpu.chunk_rows(V) * V * 4
    assert peak is not None, method
    # one chunk of logits (loss and gradient are computed in it, in place) besides the returned gradients
    # (d weight, d hidden with its sentinel row); the rest is per-row vectors and chunk x H matrices
    bound = chunk + V * H * 4 + (N + 1) * H * 4 + 2 * cpu.chunk_rows(V) * (H + 64) * 4
    assert peak <= bound < full_logits, f"peak {peak} B, bound {bound} B, full logits {full_logits} B"


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


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_linear_opcheck(backend):
    fwd, bwd, reduced = (getattr(torch.ops.masklm_kernels, f"linear_cross_entropy_{backend}_{k}").default
                         for k in ("fwd", "bwd", "reduced"))
    h, w, b, y = _linear_inputs(24, dtype=torch.float32)
    for max_rows in (-1, 40):
        torch.library.opcheck(fwd, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, -100, 0.1, 1e-3,
                                    max_rows))
        torch.library.opcheck(bwd, (torch.randn(y.shape), h.detach(), w.detach(), None, y, -100, 0.0, 0.0, max_rows))
        scale = torch.tensor(0.25)
        torch.library.opcheck(reduced, (h, w, b, y, scale, -100, 0.1, 1e-3, max_rows))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_linear_compile_fullgraph_equals_eager_without_recompiling(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(h_, w_, b_, y_, reduction):
        return fused_linear_cross_entropy(h_, w_, y_, bias=b_, label_smoothing=0.1, reduction=reduction,
                                          backend=backend, max_labelled_rows=32)

    for reduction in ("mean", "none"):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        for seed in range(2):
            h, w, b, y = _linear_inputs(30 + seed, dtype=torch.float32)
            up = torch.randn(y.shape) if reduction == "none" else None
            eager = _linear_grads(lambda *a, bias=None, **kw: fn(a[0], a[1], bias, a[2], reduction), h, w, b, y, up)
            comp = _linear_grads(lambda *a, bias=None, **kw: compiled(a[0], a[1], bias, a[2], reduction), h, w, b, y,
                                 up)
            for name, a, c in zip(("loss", "d hidden", "d weight", "d bias"), (eager[0], *eager[1]),
                                  (comp[0], *comp[1])):
                assert_equal(c, a, msg=f"compiled {name}, {reduction}, seed {seed}")
        assert counter.frame_count == 1
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# max_labelled_rows: the caller's bound on labelled rows (no host synchronisation)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_row_bound_gives_the_same_loss_and_gradients(backend, reduction, chunks):
    h, w, b, y = _linear_inputs(50)
    count = int((y != -100).sum())
    up = torch.randn(y.shape, dtype=torch.float64) if reduction == "none" else None
    loss_r, grads_r = _linear_grads(_torch_linear, h, w, b, y, up, reduction=reduction, z_loss=1e-3)
    for bound in (count, count + 7):
        loss, grads = _linear_grads(fused_linear_cross_entropy, h, w, b, y, up, reduction=reduction, z_loss=1e-3,
                                    backend=backend, max_labelled_rows=bound)
        assert_close(loss, loss_r, **F64, msg=f"loss, bound {bound}")
        for name, g, g_r in zip(("d hidden", "d weight", "d bias"), grads, grads_r):
            assert_close(g, g_r, **F64, msg=f"{name}, bound {bound}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_row_bound_exceeded_gives_nan_not_a_partial_loss(backend):
    h, w, b, y = _linear_inputs(51)
    count = int((y != -100).sum())
    loss, grads = _linear_grads(fused_linear_cross_entropy, h, w, b, y, backend=backend, max_labelled_rows=count - 1)
    assert torch.isnan(loss)
    if backend != "reference":  # the reference's gradient flows through torch.where: 0 for the NaN branch
        # the rows past the bound are not computed at all (0), every computed one is NaN
        assert torch.isnan(grads[0]).any() and torch.isnan(grads[1]).all() and torch.isnan(grads[2]).all()
    none = torch.full_like(y, -100)
    loss, grads = _linear_grads(fused_linear_cross_entropy, h, w, b, none, backend=backend, max_labelled_rows=0)
    assert loss == 0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("per_row", [False, True], ids=["reduced", "per-row"])
def test_linear_row_bound_never_synchronises(backend, per_row):
    """With max_labelled_rows the chunk driver reads no device value on the host: no nonzero (whose output
    size is a count), item, bool, int or tolist on a tensor. (The api's label range check reads values only
    for CPU tensors, where it is free; linear.run is what runs on a GPU.)"""
    from torch.overrides import TorchFunctionMode

    from masklm_kernels.losses import linear, triton_ce

    syncing = {"nonzero", "item", "__bool__", "tolist", "__int__", "__float__", "__index__", "masked_select"}
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    h, w, b, y = _linear_inputs(52, dtype=torch.float32)
    rows_fn = cpu.rows_inplace if backend == "cpu" else triton_ce.rows
    weight = torch.rand(y.shape) if per_row else torch.tensor(0.5)
    with Record():
        loss, dh, dw, db = linear.run(h, w, b, y, rows_fn, LossOptions(-100, 0.1, 1e-3),
                                      max_rows=40, chunk_rows=16, compute_dtype=torch.float32, row_weight=weight)
    assert "nonzero_static" in seen and not syncing & set(seen), sorted(syncing & set(seen))
    assert torch.isfinite(loss).all() and torch.isfinite(dw).all()
