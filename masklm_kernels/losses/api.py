"""Public loss API: `masked_cross_entropy` and `fused_linear_cross_entropy` (docs/SEMANTICS.md, "Cross-entropy")."""
from __future__ import annotations

import math
import numbers

import torch

from .._autocast import cast_inputs, loss_dtype, no_autocast
from .._backends import Backend, select_backend, triton_cpu_reason, triton_requirement
from .._common import acc_dtype
from .._validation import INT_DTYPES, check_int, values_checkable
from . import ops, reference
from .inputs import LossOptions


def _no_inplace(facts: dict) -> list[str]:
    return ["inplace_grad=True: only the triton backend writes the gradient over the logits"] \
        if facts.get("inplace_grad") else []


def _triton_inputs(facts: dict) -> list[str]:
    return triton_cpu_reason(facts["device"])


BACKENDS = (
    Backend("cpu", ("cpu",), input_check=_no_inplace,
            description="labelled rows only, chunked fp32 PyTorch (O(chunk x V) extra memory)"),
    Backend("triton", ("cuda", "cpu"), requirement=triton_requirement, input_check=_triton_inputs,
            description="one fused pass per row (online log-sum-exp, gradient in the same launch); fused head: "
                        "labelled rows only, chunked cuBLAS matmuls (CPU: interpreter only)"),
    Backend("reference", ("cpu", "cuda"), input_check=_no_inplace,
            description="dense PyTorch specification (every row, autograd)"),
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
        if num_items.dim() != 0 or num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise TypeError(f"num_items must be a number or a 0-dim tensor of a real dtype, got {num_items.dtype} "
                            f"of shape {tuple(num_items.shape)}")
        if values_checkable(num_items) and not 0 < float(num_items) < math.inf:  # CUDA: would synchronise
            raise ValueError(f"num_items must be > 0 and finite (a count), got {float(num_items)}")
        return num_items.to(device)
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a positive number or a 0-dim tensor, got {type(num_items).__name__}")
    if not 0 < num_items < math.inf:
        raise ValueError(f"num_items must be > 0 and finite (a count), got {num_items}")
    return num_items


def _check_options(ignore_index, label_smoothing, z_loss, reduction, num_items, labels,
                   V: int) -> tuple[LossOptions, object]:
    """(the per-row options, num_items) both losses share, validated; labels range-checked against the V
    classes."""
    ignore_index = check_int("ignore_index", ignore_index, lo=-(2**63), hi=2**63)
    label_smoothing = _check_float("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_float("z_loss", z_loss, 0.0, 1e4)  # a coefficient (PaLM: 1e-4); inf would make every loss inf
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_items = _num_items(num_items, labels.device)
    _check_labels_in_range(labels, V, ignore_index)
    return LossOptions(ignore_index, label_smoothing, z_loss), num_items


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _scale(reduction: str, labels: torch.Tensor, ignore_index: int, num_items, dtype: torch.dtype) -> torch.Tensor:
    """The factor of the summed row losses (0-dim, on labels' device): 1 for "sum"; for "mean" one over the
    labelled-row count (or num_items), at least 1, exactly as reference.reduce divides (no host sync)."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=labels.device)
    count = (labels != ignore_index).sum() if num_items is None else num_items
    if isinstance(count, torch.Tensor):
        return 1.0 / count.to(dtype).clamp_min(1)
    return torch.full((), 1.0 / max(count, 1), dtype=dtype, device=labels.device)


def masked_cross_entropy(logits, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                         num_items=None, inplace_grad=False, backend="auto"):
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
        inplace_grad: opt-in, triton backend, "mean"/"sum": the forward writes d loss / d logits over the
            logits buffer (no second N x V buffer, as Liger does); the logits' values are lost after the
            call, and anything else that saved them for its backward raises when that backward runs.
        backend: "auto" (cpu on CPU tensors, triton on CUDA), "cpu", "triton" or "reference".

    Returns the loss in the logits' dtype (fp32 under autocast, whose rule for losses that is; the
    logits are not cast: the accumulation is fp32 anyway). With no labelled row the mean is 0 and
    gradients are 0 (not NaN).
    On the triton backend "mean"/"sum" compute the gradient in the forward's launch (the backward only
    scales it); "none" recomputes it in the backward.

    Labels outside [0, V) that are not ignore_index: CPU tensors raise ValueError. CUDA tensors are not
    checked (that would synchronise the host): the kernel never reads out of bounds, and such a row's loss
    and gradient row are NaN, so a "mean"/"sum" loss is NaN.

    Equivalent PyTorch (labelled rows present)::

        F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                        label_smoothing=label_smoothing, reduction="sum") / n_labelled
        + z_loss * (torch.logsumexp(logits.float(), -1)[labels != ignore_index] ** 2).sum() / n_labelled
    """
    logits, labels = _check_logits_labels(logits, labels)
    V = logits.shape[-1]
    opts, num_items = _check_options(ignore_index, label_smoothing, z_loss, reduction, num_items, labels, V)
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")
    chosen = select_backend("masked_cross_entropy", BACKENDS, backend, logits.device,
                            dict(device=logits.device, inplace_grad=inplace_grad))
    flat_logits = logits.reshape(-1, V)
    flat_labels = labels.reshape(-1).to(torch.int64)
    out_dtype = loss_dtype(logits)
    acc = acc_dtype(logits)
    if chosen.name == "cpu":
        rows, _ = ops.cross_entropy_cpu_fwd(flat_logits.contiguous(), flat_labels.contiguous(), opts)
    elif chosen.name == "triton":
        x = flat_logits if flat_logits.stride(-1) == 1 else flat_logits.contiguous()
        y = flat_labels.contiguous()
        if reduction != "none" and _wants_grad(logits):
            scale = _scale(reduction, y, opts.ignore_index, num_items, acc)
            if inplace_grad:
                total = ops.InplaceGradCrossEntropy.apply(x, y, scale, opts)
            else:
                total, _ = ops.cross_entropy_triton_reduced(x, y, scale, opts)
            return total.to(out_dtype)
        rows = ops.cross_entropy_triton_fwd(x, y, opts)
    else:
        with no_autocast(logits.device):  # the specification computes in `acc` whatever autocast says
            rows = reference.row_losses(flat_logits, flat_labels, **opts._asdict(), compute_dtype=acc)
    return reference.reduce(rows, labels, opts.ignore_index, reduction, num_items).to(out_dtype)


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
                               z_loss=0.0, reduction="mean", num_items=None, max_labelled_rows=None,
                               backend="auto"):
    """The LM head fused with `masked_cross_entropy`: logits = hidden @ weight.T + bias are computed only for
    labelled rows, a chunk of rows at a time, and never materialised for all N rows.

    Args:
        hidden: (N, H) or (B, S, H) final hidden states, fp16 / bf16 / fp32 / fp64.
        weight: (V, H) output embedding (tied or not), hidden's dtype and device.
        labels: (N,) or (B, S) class indices in [0, V), or `ignore_index`.
        bias: optional (V,).
        ignore_index, label_smoothing, z_loss, reduction, num_items: as `masked_cross_entropy`.
        max_labelled_rows: optional int >= 0, an upper bound on the number of labelled rows (exact-count
            masking provides it). Without it the labelled rows are counted on the host, a synchronisation
            with a CUDA device; with it nothing synchronises, the work is that of max_labelled_rows rows,
            and if more rows are labelled the loss and the gradients are NaN (never silently partial).
        backend: "auto" (cpu on CPU tensors, triton on CUDA), "cpu", "triton" or "reference".

    Under autocast, hidden, weight and bias are first cast to its dtype (as F.linear is: fp32 master
    weights are fine and get fp32 gradients) and the loss is fp32.

    Returns the loss in hidden's dtype; gradients for hidden, weight and bias. Work and memory: per chunk of
    labelled rows, one c x V logits buffer (the loss and its gradient are computed in it, in place), then
    d hidden, d weight and d bias; d weight and d bias accumulate in fp32 (fp64 for fp64 inputs). Peak
    extra memory is one chunk (cpu: 256 rows in fp32; triton: 64 MiB of logits) plus d weight's fp32
    accumulator (and, on the cpu backend, an fp32 copy of a low-precision weight). "mean"/"sum" compute the
    gradients in the forward (one matmul fewer than recomputing the logits; the backward scales them);
    "none" recomputes the chunks in the backward, for its per-row upstream gradient.

    Equivalent PyTorch::

        masked_cross_entropy(F.linear(hidden, weight, bias), labels, ...)   # materialises (N, V) logits
    """
    out_dtype = loss_dtype(hidden) if isinstance(hidden, torch.Tensor) else None
    hidden, weight, bias = cast_inputs(hidden, weight, bias)
    _check_linear(hidden, weight, bias, labels)
    opts, num_items = _check_options(ignore_index, label_smoothing, z_loss, reduction, num_items, labels,
                                     weight.shape[0])
    max_rows = -1 if max_labelled_rows is None else check_int("max_labelled_rows", max_labelled_rows, lo=0,
                                                               hi=2**62)
    chosen = select_backend("fused_linear_cross_entropy", BACKENDS, backend, hidden.device,
                            dict(device=hidden.device))
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64)
    acc = acc_dtype(hidden)
    if chosen.name != "reference":
        fwd, _, reduced = ops.LINEAR[chosen.name]
        args = (flat_hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                flat_labels.contiguous())
        if reduction != "none" and _wants_grad(hidden, weight, bias):
            scale = _scale(reduction, flat_labels, opts.ignore_index, num_items, acc)
            return reduced(*args, scale, opts, max_rows)[0].to(out_dtype)
        rows = fwd(*args, opts, max_rows)
    else:
        with no_autocast(hidden.device):  # the specification computes in `acc` whatever autocast says
            logits = torch.nn.functional.linear(flat_hidden.to(acc), weight.to(acc),
                                                None if bias is None else bias.to(acc))
            rows = reference.row_losses(logits, flat_labels, **opts._asdict())
        if max_rows >= 0:  # the bound's contract: NaN when exceeded
            rows = torch.where((flat_labels != opts.ignore_index).sum() > max_rows, float("nan"), rows)
    return reference.reduce(rows, labels, opts.ignore_index, reduction, num_items).to(out_dtype)
