"""Public loss API: `masked_cross_entropy` and `fused_linear_cross_entropy` (BRIEF.md, "Cross-entropy semantics")."""
from __future__ import annotations

import numbers

import torch

from .._backends import Backend, select_backend
from .._validation import INT_DTYPES, check_int, values_checkable
from . import ops, reference

BACKENDS = (
    Backend("cpu", ("cpu",), description="labelled rows only, chunked fp32 PyTorch (O(chunk x V) extra memory)"),
    Backend("reference", ("cpu", "cuda"), description="dense PyTorch specification (every row, autograd)"),
)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _check_logits_labels(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"logits must be (N, V) or (B, S, V) with V >= 1, got shape {tuple(logits.shape)}")
    _check_labels(labels, "logits", logits, "the vocabulary axis")
    return logits, labels


def _check_labels(labels: torch.Tensor, like: str, t: torch.Tensor, last_axis: str) -> None:
    """Signed integer labels with the shape of `t` without its last axis, on t's device."""
    if labels.dtype not in INT_DTYPES or labels.dtype == torch.uint8:
        raise TypeError(f"labels must be a signed integer tensor (class indices), got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(t.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(t.shape[:-1])} ({like} without {last_axis}), got "
                         f"{tuple(labels.shape)}")
    if labels.device != t.device:
        raise ValueError(f"labels must be on the device of {like} ({t.device}), got {labels.device}")


def _check_float(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _check_labels_in_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    if labels.numel() and values_checkable(labels):  # CUDA: would synchronise the host
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {V}) or ignore_index ({ignore_index}), got "
                             f"{int(labels[bad].flatten()[0])}")


def _num_items(num_items, device):
    if num_items is None:
        return None
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.dtype.is_complex:
            raise TypeError(f"num_items must be a number or a 0-dim tensor, got shape {tuple(num_items.shape)}")
        return num_items.to(device)
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a positive number or a 0-dim tensor, got {type(num_items).__name__}")
    if not num_items > 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    return num_items


def _check_options(ignore_index, label_smoothing, z_loss, reduction, num_items, labels, V: int):
    """The options both losses share, normalised; labels range-checked against the V classes."""
    ignore_index = check_int("ignore_index", ignore_index, lo=-(2**63), hi=2**63)
    label_smoothing = _check_float("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_float("z_loss", z_loss, 0.0, float("inf"))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_items = _num_items(num_items, labels.device)
    _check_labels_in_range(labels, V, ignore_index)
    return ignore_index, label_smoothing, z_loss, num_items


def masked_cross_entropy(logits, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                         num_items=None, backend="auto"):
    """Cross-entropy over the labelled rows only, with torch's label smoothing and PaLM's z-loss.

    Args:
        logits: (N, V) or (B, S, V), fp16 / bf16 / fp32 / fp64; accumulation is fp32 (fp64 for fp64).
        labels: (N,) or (B, S) integer class indices in [0, V), or `ignore_index` for unlabelled rows.
        ignore_index: label of rows that carry no loss (default -100).
        label_smoothing: eps in [0, 1]: the target puts 1 - eps on the label and eps / V on every class.
        z_loss: coefficient of lse**2 added per labelled row (PaLM), >= 0.
        reduction: "mean" (sum / number of labelled rows, or / num_items), "sum" or "none" (labels' shape).
        num_items: divide the sum by this instead (exact gradient accumulation over micro-batches); a
            positive number or a 0-dim tensor.
        backend: "auto" (cpu on CPU tensors, else reference), "cpu" or "reference".

    Returns the loss in the logits' dtype. With no labelled row the mean is 0 and gradients are 0 (not NaN).

    Equivalent PyTorch (labelled rows present)::

        F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                        label_smoothing=label_smoothing, reduction="sum") / n_labelled
        + z_loss * (torch.logsumexp(logits.float(), -1)[labels != ignore_index] ** 2).sum() / n_labelled
    """
    logits, labels = _check_logits_labels(logits, labels)
    V = logits.shape[-1]
    ignore_index, label_smoothing, z_loss, num_items = _check_options(
        ignore_index, label_smoothing, z_loss, reduction, num_items, labels, V)
    chosen = select_backend("masked_cross_entropy", BACKENDS, backend, logits.device)
    flat_logits = logits.reshape(-1, V)
    flat_labels = labels.reshape(-1).to(torch.int64)
    if chosen.name == "cpu":
        rows, _ = ops.cross_entropy_cpu_fwd(flat_logits.contiguous(), flat_labels.contiguous(), ignore_index,
                                            label_smoothing, z_loss)
    else:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows = reference.row_losses(flat_logits, flat_labels, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, z_loss=z_loss, compute_dtype=acc)
    return reference.reduce(rows, labels, ignore_index, reduction, num_items).to(logits.dtype)


def _check_linear(hidden, weight, bias, labels):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) or (B, S, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must be (V, H) with H = hidden's last size ({hidden.shape[-1]}), got shape "
                         f"{tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}), got {t.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (one per class), got {tuple(bias.shape)}")
    _check_labels(labels, "hidden", hidden, "its last axis")


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, reduction="mean", num_items=None, backend="auto"):
    """The LM head fused with `masked_cross_entropy`: logits = hidden @ weight.T + bias are computed only for
    labelled rows, a chunk of rows at a time, and never materialised for all N rows.

    Args:
        hidden: (N, H) or (B, S, H) final hidden states, fp16 / bf16 / fp32 / fp64.
        weight: (V, H) output embedding (tied or not), hidden's dtype and device.
        labels: (N,) or (B, S) class indices in [0, V), or `ignore_index`.
        bias: optional (V,).
        ignore_index, label_smoothing, z_loss, reduction, num_items: as `masked_cross_entropy`.
        backend: "auto" (cpu on CPU tensors, else reference), "cpu" or "reference".

    Returns the loss in hidden's dtype; gradients for hidden, weight and bias. Peak extra memory of the cpu
    backend is O(CHUNK_ROWS x V) plus an fp32 copy of weight and its gradient; the work is proportional to
    the labelled rows. The cpu backend recomputes the labelled rows' logits in the backward (no N x V
    buffer is kept). The labelled rows are found on the host (free for CPU tensors).

    Equivalent PyTorch::

        masked_cross_entropy(F.linear(hidden, weight, bias), labels, ...)   # materialises (N, V) logits
    """
    _check_linear(hidden, weight, bias, labels)
    ignore_index, label_smoothing, z_loss, num_items = _check_options(
        ignore_index, label_smoothing, z_loss, reduction, num_items, labels, weight.shape[0])
    chosen = select_backend("fused_linear_cross_entropy", BACKENDS, backend, hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64)
    if chosen.name == "cpu":
        rows, _ = ops.linear_cross_entropy_cpu_fwd(flat_hidden.contiguous(), weight.contiguous(),
                                                   None if bias is None else bias.contiguous(),
                                                   flat_labels.contiguous(), ignore_index, label_smoothing, z_loss)
    else:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logits = torch.nn.functional.linear(flat_hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
        rows = reference.row_losses(logits, flat_labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                    z_loss=z_loss)
    return reference.reduce(rows, labels, ignore_index, reduction, num_items).to(hidden.dtype)
