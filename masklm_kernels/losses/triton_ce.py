"""Triton kernel of the masked cross-entropy: one program per row of logits, two sweeps over the vocabulary.

Sweep 1 computes the online log-sum-exp (running max and rescaled sum, as FlashAttention's softmax) and the
row sum of the logits (label smoothing); sweep 2, only when a gradient is wanted, writes

    d loss_i / d x_ij * w_i = w_i * (p_ij * (1 + 2 z lse_i) - eps / V - (1 - eps) [j == y_i])

in the same launch, into a gradient buffer or over the logits themselves (in-place, opt-in: each block of
the row is read before it is overwritten, and no other program touches the row). Everything is computed in
fp32 (fp64 for fp64 inputs, interpreter only) and rounded once when stored, so the true-class gradient p - 1
of a confident prediction keeps its relative accuracy in bf16.

Rows whose label is `ignore_index` write loss 0, lse 0 and a zero gradient row without reading the logits.
A label outside [0, V) that is not `ignore_index` cannot be checked on the host without a synchronisation:
the kernel never dereferences it, and writes NaN as that row's loss and over its gradient row, so that the
error shows in the loss (documented in the API; the CPU path raises instead).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import split_fp32
from .._common import acc_dtype
from .._triton_launch import BlockConfig, Launch
from .inputs import LossOptions

# Vocabulary block per step of a sweep. A row of BERT's 30522 logits takes 8 steps; 4096 fp32 values over 8
# warps are 16 registers per thread and per live array, far from spilling (benchmarks.compile_report checks
# it). Not timed on a GPU yet; the sweeps are memory-bound, so a block this size saturates them.
MAX_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _ce_rows(X, x_stride, Y, G, g_stride, W, w_stride, LOSS, LSE, V, ignore_index,
             eps_hi, eps_lo, z_hi, z_lo,
             BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(Y + row).to(tl.int64)
    labelled = y != ignore_index
    in_range = (y >= 0) & (y < V)
    use = labelled & in_range
    x_row = X + row * x_stride
    cols0 = tl.arange(0, BLOCK_V)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    z = tl.cast(z_hi, ACC) + tl.cast(z_lo, ACC)

    # sweep 1: online log-sum-exp and the row sum; an unused row runs zero steps
    n_steps = tl.where(use, tl.cdiv(V, BLOCK_V), 0)
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    sx = tl.zeros((), ACC)
    for step in range(0, n_steps):
        cols = step * BLOCK_V + cols0
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of -inf logits: no inf - inf
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
        sx += tl.sum(tl.where(cols < V, x, 0.0), 0)
        m = m_new
    lse = tl.where(use, m + tl.log(tl.where(use, d, 1.0)), 0.0)
    x_y = tl.load(x_row + tl.where(use, y, 0), mask=use, other=0.0).to(ACC)
    # the smoothing term only when eps > 0: a logit of -inf makes the row sum -inf, and 0 * inf is NaN
    smooth = tl.where(eps > 0, eps * (lse - sx / V), 0.0)
    loss = (1.0 - eps) * (lse - x_y) + smooth + tl.where(z > 0, z * lse * lse, 0.0)  # likewise z = 0, lse = inf
    nan = float("nan")
    loss = tl.where(use, loss, tl.where(labelled, nan, 0.0))
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)

    if WRITE_GRAD:
        # sweep 2: the gradient row, scaled by this row's weight (w_stride 0: one weight for every row)
        w = tl.load(W + row * w_stride).to(ACC)
        coef = tl.where(use, (1.0 + 2.0 * z * lse) * w, 0.0)
        off = tl.where(use, eps / V * w, 0.0)
        on_y = tl.where(use, (1.0 - eps) * w, 0.0)
        bad = tl.where(labelled & ((y < 0) | (y >= V)), nan, 0.0)  # NaN row for a label out of range
        g_row = G + row * g_stride
        v_read = tl.where(use, V, 0)  # an unused row reads nothing
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            x = tl.load(x_row + cols, mask=cols < v_read, other=float("-inf")).to(ACC)
            g = coef * tl.exp(x - lse) - off - tl.where(cols == y, on_y, 0.0) + bad
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=cols < V)


def block_v(V: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(V))


def launch(logits: torch.Tensor, labels: torch.Tensor, opts: LossOptions, loss: torch.Tensor, lse: torch.Tensor,
           grad: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> Launch:
    """The launch over the rows of logits (N, V) (unit stride along V); see `rows`."""
    N, V = logits.shape
    write_grad = grad is not None
    if write_grad:
        assert grad.shape == logits.shape and grad.stride(1) == 1 and weight is not None
    else:
        grad, weight = logits, loss  # never read or written
    eps, z = split_fp32(opts.label_smoothing), split_fp32(opts.z_loss)
    bv = block_v(V)
    return Launch(_ce_rows, (N,), (logits, logits.stride(0), labels, grad, grad.stride(0), weight,
                                   weight.stride(0) if weight.dim() else 0, loss, lse, V, opts.ignore_index, *eps, *z),
                  dict(BLOCK_V=bv, WRITE_GRAD=write_grad,
                       ACC=tl.float64 if logits.dtype == torch.float64 else tl.float32),
                  BlockConfig(1, bv, NUM_WARPS, 1),
                  label=f"V block {bv} w{NUM_WARPS}" + (" loss+grad" if write_grad else " loss"))


def rows(logits: torch.Tensor, labels: torch.Tensor, opts: LossOptions, grad: torch.Tensor | None = None,
         weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss (N,), lse (N,)) in the accumulation dtype for logits (N, V) with unit stride along V.

    With `grad` (N, V) (which may be `logits` itself) the same launch writes weight_i * d loss_i / d logits
    into it; `weight` is (N,) or 0-dim (one weight for every row), in the accumulation dtype.
    """
    acc = acc_dtype(logits)
    loss = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    lse = torch.empty_like(loss)
    if logits.shape[0]:
        launch(logits, labels, opts, loss, lse, grad, weight)()
    return loss, lse


# Rows of logits per chunk of the fused LM head (linear.run): a chunk holds at most CHUNK_BYTES of logits,
# 512 rows of bf16 logits at V = 50265 -- enough rows for cuBLAS to run its large tiles at H >= 768 -- and
# far below the O(N x V) buffer of an unfused head. Not timed on a GPU yet.
CHUNK_BYTES = 64 << 20


def chunk_rows(V: int, itemsize: int) -> int:
    """Rows per chunk: the largest power of two whose logits fit in CHUNK_BYTES (at least 16)."""
    rows = max(1, CHUNK_BYTES // (V * itemsize))
    return max(16, 1 << (rows.bit_length() - 1))
