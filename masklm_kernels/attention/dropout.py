"""Attention-probability dropout: the arguments as the API takes them (`dropout_args`), the C++ op that
draws the CPU backend's keep masks (`masklm_kernels::attention_dropout_keep`, csrc/attention/), and
`dropout_mask`, the keep mask itself from any backend (a debug and test path, as FlashAttention's
`return_attn_probs`).

The keep rule (inputs.Dropout, docs/SEMANTICS.md "Attention dropout") is counter-based: a pure function
of (seed, offset, sample key, head, query, key), so the backward regenerates the forward's mask instead of
storing it, and the Triton kernels, the CPU backend and the NumPy reference keep the same pairs bit for bit.
"""
from __future__ import annotations

import numbers

import torch

from .. import _ext
from .._backends import select_backend
from .._validation import check_int, check_tensor, scalar_tensor
from .inputs import NO_DROPOUT, Dropout, keep_threshold

_LIB = torch.library.Library("masklm_kernels", "FRAGMENT")  # kept alive: it owns the definition below
# keep[s, h, r, c] (S, heads, row_end - row_start, C): sample sample_ids[s], head h, row row_start + r,
# column cols[c]; dtype bool (True: kept) or floating (`value` where kept, else 0: a probability's
# multiplier, 1 / (1 - p), in one pass). CPU kernel: csrc/attention/dropout_ops.cpp.
_LIB.define("attention_dropout_keep(Tensor seed, Tensor offset, Tensor sample_ids, int heads, int row_start, "
            "int row_end, Tensor cols, int threshold, ScalarType dtype=bool, float value=1.) -> Tensor")
_LIB.impl("attention_dropout_keep", _ext.loading_kernel("attention_dropout_keep"), "CompositeExplicitAutograd")


@torch.library.register_fake("masklm_kernels::attention_dropout_keep", lib=_LIB)
def _(seed, offset, sample_ids, heads, row_start, row_end, cols, threshold, dtype=torch.bool, value=1.0):
    return cols.new_empty((sample_ids.shape[0], heads, row_end - row_start, cols.shape[0]), dtype=dtype)


def keep_op():
    """The C++ op (its kernels loaded)."""
    _ext.available()
    return torch.ops.masklm_kernels.attention_dropout_keep.default


def dropout_args(dropout_p, seed, offset, sample_ids, generator, batch: int, device: torch.device) -> Dropout:
    """The validated `inputs.Dropout` of an attention call over `batch` rows (or packed sequences).

    seed None: drawn from `generator` (default: torch's default CPU generator), as nn.Dropout draws from
    torch's RNG, so that torch.manual_seed makes a run reproducible; seed and offset as Python ints or 0-dim
    integer tensors (on the CPU or q's device: a device tensor can advance inside a compiled or captured
    step without a recompilation or a synchronisation)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if dropout_p == 0.0 or keep_threshold(float(dropout_p)) == 0:
        return NO_DROPOUT  # nothing is dropped: today's kernels, unchanged
    if seed is None:
        where = generator.device if generator is not None else "cpu"
        seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=where)
    elif generator is not None:
        raise ValueError("give dropout_seed or generator, not both")
    seed = _device_scalar("dropout_seed", seed, device)
    offset = _device_scalar("dropout_offset", offset, device)
    if sample_ids is not None:
        check_tensor("sample_ids", sample_ids, device=device, shape=(batch,), integer=True, like="q")
        sample_ids = sample_ids.to(torch.int64).contiguous()
    return Dropout(float(dropout_p), seed, offset, sample_ids)


def _device_scalar(name: str, value, device: torch.device) -> torch.Tensor:
    """A validated 0-dim int64 tensor on `device`. A host value (an int, a CPU tensor: reading it syncs
    nothing) is written there by a fill kernel: a copy from pageable host memory would wait for the stream."""
    t = scalar_tensor(name, value, device)
    if t.device == device:
        return t
    return torch.full((), int(t), dtype=torch.int64, device=device)


def cpu_reasons(x: dict) -> list[str]:
    """Why the cpu backend cannot run dropout (its keep masks come from the C++ extension)."""
    if not x.get("dropout"):
        return []
    if not _ext.available():
        return [f"attention dropout on the cpu backend needs masklm_kernels._C: {_ext.load_error()}"]
    if not _ext.has_kernel("attention_dropout_keep", "CPU"):
        return ["attention dropout on the cpu backend: masklm_kernels._C predates it (rebuild with "
                "`pip install --no-build-isolation -e .`)"]
    return []


def dropout_mask(batch: int, heads: int, seq_q: int, seq_k: int, *, dropout_p: float, dropout_seed,
                 dropout_offset=0, sample_ids=None, device=None, backend: str = "auto") -> torch.Tensor:
    """The keep mask of attention dropout, (batch, heads, seq_q, seq_k) bool (True: kept), as `backend`
    draws it inside `fused_attention` / `fused_attention_varlen` (a packed sequence is a batch row of its
    own). For tests and debugging: it is (B, H, Sq, Sk); the attention kernels never build it.

    Args:
        dropout_p: in [0, 1); dropout_seed, dropout_offset: ints or 0-dim integer tensors;
        sample_ids: (batch,) int sample keys (default: the batch row);
        backend: "auto", "triton", "cpu" or "reference" (the NumPy specification).
    """
    from .api import BACKENDS  # noqa: PLC0415 - api imports this module

    for name, n in (("batch", batch), ("heads", heads), ("seq_q", seq_q), ("seq_k", seq_k)):
        check_int(name, n, lo=0)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dropout_seed is None:
        raise ValueError("dropout_mask needs dropout_seed (the mask of a call that drew its seed is not recoverable)")
    drop = dropout_args(dropout_p, dropout_seed, dropout_offset, sample_ids, None, batch, dev)
    if not drop.active:
        return torch.ones(batch, heads, seq_q, seq_k, dtype=torch.bool, device=dev)
    chosen = select_backend("dropout_mask", BACKENDS, backend, dev, dict(device=dev, dtype=torch.float32, head_dim=64,
                                                                         batch=batch, heads=heads, dropout=True))
    samples = drop.sample_ids if drop.sample_ids is not None else torch.arange(batch, device=dev)
    if chosen.name == "reference":
        from . import reference  # noqa: PLC0415 - the specification, for this debug path only

        return reference.dropout_keep(batch, heads, seq_q, seq_k, p=drop.p, seed=int(drop.seed),
                                      offset=int(drop.offset), sample_ids=samples.tolist()).to(dev)
    if chosen.name == "cpu":
        return keep_op()(drop.seed.cpu(), drop.offset.cpu(), samples.cpu(), heads, 0, seq_q,
                         torch.arange(seq_k), drop.threshold)
    from .triton_fwd import keep_mask  # noqa: PLC0415 - triton is optional

    return keep_mask(drop, batch, heads, seq_q, seq_k, dev)
