"""`masked_cross_entropy` (masklm_kernels/losses/) against float64 `F.cross_entropy` (docs/SEMANTICS.md, "Cross-entropy
semantics"): values and gradients for every option and reduction on every backend (triton under Triton's
interpreter without a GPU), 3-D inputs, all rows ignored, large logits, low precision, bad input, the custom
ops under opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import fused_linear_cross_entropy, masked_cross_entropy

from helpers import assert_close, assert_equal
from losses_cases import BACKENDS, CASES, F64, _inputs, _linear_inputs, _loss_and_grad, _torch_loss, chunks  # noqa: F401


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
    ops = torch.ops.masklm_kernels
    torch.library.opcheck(ops.cross_entropy_cpu_fwd.default, (x.requires_grad_(), y, -100, 0.1, 1e-3))
    rows, lse = ops.cross_entropy_cpu_fwd(x.detach(), y, -100, 0.1, 1e-3)
    torch.library.opcheck(ops.cross_entropy_cpu_bwd.default, (torch.randn(rows.shape), x.detach(), y, lse, -100, 0.1,
                                                              1e-3))
    torch.library.opcheck(ops.cross_entropy_triton_fwd.default, (x, y, -100, 0.1, 1e-3))
    torch.library.opcheck(ops.cross_entropy_triton_bwd.default, (torch.randn(rows.shape), x.detach(), y, -100, 0.1,
                                                                 1e-3))
    torch.library.opcheck(ops.cross_entropy_triton_reduced.default, (x, y, torch.tensor(0.5), -100, 0.1, 1e-3))
    torch.library.opcheck(ops.cross_entropy_triton_reduced_inplace.default,
                          (x.detach().clone(), y, torch.tensor(0.5), -100, 0.1, 1e-3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_equals_eager_without_recompiling(backend, reduction):
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(x, y):
        return masked_cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, reduction=reduction, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for seed in range(3):  # other labels (and ignored rows) each call
        x, y = _inputs(10 + seed, dtype=torch.float32)
        up = torch.randn(y.shape) if reduction == "none" else None
        loss_e, grad_e = _loss_and_grad(fn, x, y, up)
        loss_c, grad_c = _loss_and_grad(compiled, x, y, up)
        assert_equal(loss_c, loss_e, msg=f"compiled loss, seed {seed}")
        assert_equal(grad_c, grad_e, msg=f"compiled grad, seed {seed}")
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
