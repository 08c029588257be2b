"""Shared inputs, oracle and helpers of the loss tests (test_losses*.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from masklm_kernels.losses import cpu, triton_ce

BACKENDS = ("cpu", "triton", "reference")  # triton: Triton's interpreter without a GPU
# float64 tolerance. Measured: in about 1 process in 8 on this CPU (torch 2.13), the first exp/sum pass of
# a process differs from every later one by ~6e-11 relative in an fp64 logsumexp, in plain torch ops. Every
# algorithmic error is orders of magnitude above this bar.
F64 = dict(atol=1e-10, rtol=1e-9)


@pytest.fixture(params=["default", "chunk=8"])
def chunks(request, monkeypatch):
    """The default chunk (one chunk at these sizes) and small chunks (several, the last one partial): 8 rows
    for the cpu backend, 16 (the least) for triton's fused head."""
    if request.param != "default":
        monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)
        monkeypatch.setattr(cpu, "MIN_CHUNK_ROWS", 8)
        monkeypatch.setattr(triton_ce, "CHUNK_BYTES", 1)


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
