"""What only the Triton loss kernel does (Triton's interpreter without a GPU): the in-place gradient, the
GPU behaviour for labels out of range (no host check there), every output element written, logits of -inf,
and the one-backward rule of gradients computed in the forward."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import masked_cross_entropy
from masklm_kernels._backends import BackendUnavailableError
from masklm_kernels.losses import triton_ce
from masklm_kernels.losses.inputs import LossOptions

from helpers import assert_close
from losses_cases import F64, _inputs, _loss_and_grad, _torch_loss

OPS = torch.ops.masklm_kernels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_gradient_is_written_over_the_logits(reduction):
    x, y = _inputs(60, N=29, V=211)
    loss_r, grad_r = _loss_and_grad(_torch_loss, x, y, reduction=reduction, label_smoothing=0.1)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf buffer, as the output of an LM head
    ptr = logits.data_ptr()
    loss = masked_cross_entropy(logits, y, reduction=reduction, label_smoothing=0.1, inplace_grad=True,
                                backend="triton")
    assert_close(loss.detach(), loss_r, **F64, msg="loss")
    assert_close(logits.detach(), grad_r, **F64, msg="logits buffer after the forward: the unit-scaled gradient")
    (grad,) = torch.autograd.grad(loss * 3.0, logits)
    assert grad.data_ptr() == ptr, "the gradient is the logits buffer itself"
    assert_close(grad, 3.0 * grad_r, **F64, msg="gradient")


def test_inplace_gradient_is_refused_where_it_would_corrupt_a_saved_tensor():
    x, y = _inputs(61, N=8, V=50)
    leaf = x.clone().requires_grad_(True)
    logits = torch.tanh(leaf)  # tanh saves its output for its backward
    loss = masked_cross_entropy(logits, y, inplace_grad=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_inplace_gradient_is_triton_only_and_says_so(backend):
    x, y = _inputs(62, N=4, V=9)
    with pytest.raises(BackendUnavailableError, match="inplace_grad=True: only the triton backend"):
        masked_cross_entropy(x.requires_grad_(), y, inplace_grad=True, backend=backend)
    with pytest.raises(TypeError, match="inplace_grad must be a bool"):
        masked_cross_entropy(x, y, inplace_grad=1, backend="triton")


def test_a_second_backward_through_gradients_computed_in_the_forward_raises():
    """The backward scales the forward's gradient in place; running it twice (retain_graph=True) would
    scale it twice, so autograd's version check refuses it."""
    x, y = _inputs(63, N=8, V=50)
    leaf = x.clone().requires_grad_(True)
    loss = masked_cross_entropy(leaf, y, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_labels_out_of_range_give_nan_rows_without_touching_memory_out_of_bounds():
    """On CUDA the api does not check label values (a host synchronisation); the kernel never reads at an
    out-of-range label and marks the row: NaN loss, NaN gradient row. Ignored and valid rows are exact."""
    x, y = _inputs(64, N=12, V=70)
    y[1], y[4], y[7] = 70, -1, -100
    loss = OPS.cross_entropy_triton_fwd(x, y, -100, 0.1, 1e-3)
    grad = OPS.cross_entropy_triton_bwd(torch.ones(12, dtype=torch.float64), x, y, -100, 0.1, 1e-3)
    bad = torch.zeros(12, dtype=torch.bool)
    bad[[1, 4]] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    assert loss[7] == 0 and (grad[7] == 0).all()
    good = ~bad
    y_ok = torch.where(bad, -100, y)
    loss_r, grad_r = _loss_and_grad(_torch_loss, x, y_ok, torch.ones(12, dtype=torch.float64), reduction="none",
                                    label_smoothing=0.1, z_loss=1e-3)
    assert_close(loss[good], loss_r[good], **F64, msg="valid rows' loss")
    assert_close(grad[good], grad_r[good], **F64, msg="valid rows' gradient")
    total, _ = OPS.cross_entropy_triton_reduced(x, y, torch.tensor(1.0, dtype=torch.float64), -100, 0.0, 0.0)
    assert torch.isnan(total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_element_is_written(dtype):
    x, y = _inputs(65, N=23, V=300, dtype=dtype)
    y[::3] = -100
    grad = torch.full_like(x, float("nan"))
    loss, lse = triton_ce.rows(x, y, LossOptions(-100, 0.2, 1e-2), grad, torch.rand(23))
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(grad).all()
    assert (grad[::3] == 0).all() and (loss[::3] == 0).all()


def test_a_block_of_minus_infinity_logits_is_not_nan():
    """Logits of -inf (a banned vocabulary range) filling the whole first block of a row: the online
    log-sum-exp must not compute inf - inf."""
    V = triton_ce.MAX_BLOCK_V + 904
    x, y = _inputs(66, N=5, V=V)
    x[:, : triton_ce.block_v(V)] = float("-inf")
    y[:] = V - 1
    loss = OPS.cross_entropy_triton_fwd(x, y, -100, 0.0, 1e-3)
    grad = OPS.cross_entropy_triton_bwd(torch.ones(5, dtype=torch.float64), x, y, -100, 0.0, 1e-3)
    loss_r, grad_r = _loss_and_grad(_torch_loss, x, y, torch.ones(5, dtype=torch.float64), reduction="none",
                                    z_loss=1e-3)
    assert_close(loss, loss_r, **F64, msg="loss")
    assert_close(grad, grad_r, **F64, msg="grad")


def test_inplace_gradient_under_compile_fullgraph_equals_eager():
    def fn(x, y):
        return masked_cross_entropy(x * 2.0, y, inplace_grad=True, label_smoothing=0.1, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x, y = _inputs(67, N=9, V=41, dtype=torch.float32)
    loss_e, grad_e = _loss_and_grad(fn, x, y)
    loss_c, grad_c = _loss_and_grad(compiled, x, y)
    assert_close(loss_c, loss_e, atol=0, rtol=0, msg="loss")
    assert_close(grad_c, grad_e, atol=0, rtol=0, msg="grad")
    torch._dynamo.reset()
