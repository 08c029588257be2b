"""The mask of a padded-layout attention call, described once.

`Mask` holds the O(B) metadata and the dense escape hatch (docs/SEMANTICS.md, "Attention"). `api.py`
validates the user's arguments into one; every layer below derives what it needs from it:

* the custom ops' schema (ops.py): q, k, v, then `Mask`'s fields in their order, then the scale, then
  `Dropout`'s fields (`op_signature`), and the conversion both ways (`op_args`, `from_op_args`);
* the backends (cpu.py, triton_host.py) read its fields, and `visibility_kwargs()` is what masks.py's
  `visibility` and the reference take.

`Dropout` describes attention-probability dropout the same way, for both layouts (padded and packed).

Adding a mask option is adding a field here (with its validation in api.py and its use in the kernels);
the schema, the fakes, the autograd wiring and the argument order follow.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which (query, key) pairs are visible (validated; tensors on q's device, int64 metadata)."""

    kv_lengths: Optional[torch.Tensor] = None      # (B,) keys j >= kv_lengths[b] are padding
    q_lengths: Optional[torch.Tensor] = None       # (B,) rows i >= q_lengths[b] are padding
    prefix_lengths: Optional[torch.Tensor] = None  # (B,) with causal: keys j < prefix[b] also visible
    spans: Optional[torch.Tensor] = None           # (B, 2) or (B, K, 2) [start, end)
    attn_mask: Optional[torch.Tensor] = None       # 4-D, broadcastable to (B, Hq, Sq, Sk); bool or float
    causal: bool = False
    span_mode: str = "inside"                      # "inside" | "outside"
    window_left: int = -1                          # sliding window: j >= i + off - left (-1: unbounded)
    window_right: int = -1                         # j <= i + off + right (-1: unbounded)
    alibi_slopes: Optional[torch.Tensor] = None    # (B, Hq) fp32: score bias -slope * |i + off - j|

    def op_args(self) -> tuple:
        """The fields in schema order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_op_args(cls, args) -> "Mask":
        return cls(*args)

    def visibility_kwargs(self) -> dict:
        """The O(B) metadata as masks.visibility and reference.attention take it (attn_mask aside)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("attn_mask", "alibi_slopes", "window_left", "window_right")}
        return {**out, "window_size": (self.window_left, self.window_right)}

    @property
    def has_metadata(self) -> bool:
        """Any length, prefix, span, window side or ALiBi slope given (the ATen whole-batch shortcut then does
        not apply)."""
        return (any(t is not None for t in (self.kv_lengths, self.q_lengths, self.prefix_lengths, self.spans,
                                            self.alibi_slopes))
                or self.window_left >= 0 or self.window_right >= 0)

    @property
    def same_for_every_row(self) -> bool:
        """Every batch row sees the same (query, key) pairs: no per-row length, prefix or span, and a dense
        mask (if any) broadcast over the batch. (A window, causal and ALiBi slopes are positional.)"""
        return (all(t is None for t in (self.kv_lengths, self.q_lengths, self.prefix_lengths, self.spans))
                and (self.attn_mask is None or self.attn_mask.shape[0] == 1))


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Attention-probability dropout (validated; docs/SEMANTICS.md, "Attention dropout").

    Pair (b, h, i, j) is kept when word j mod 4 of Philox4x32-10 at counter (j div 4, i, 0, 0) under the key
    of (b, h) is >= `threshold`, the key being words 0 and 1 of Philox4x32-10 at counter (h | DOMAIN << 24,
    offset mod 2^32, sample lo, sample hi) under the key (seed lo, seed hi); `sample` is sample_ids[b] (the
    batch row, or the packed sequence, when None). Integer arithmetic only: every backend keeps the same
    pairs, bit for bit. Kept probabilities are scaled by 1 / (1 - p)."""

    p: float = 0.0
    seed: Optional[torch.Tensor] = None        # 0-dim int64
    offset: Optional[torch.Tensor] = None      # 0-dim int64: which draw of this seed (e.g. step x layers + layer)
    sample_ids: Optional[torch.Tensor] = None  # (B,) int64 sample keys, or None (the batch row index)

    @property
    def active(self) -> bool:
        return self.p > 0.0

    @property
    def threshold(self) -> int:
        """floor(p * 2^32): a random 32-bit word below it drops the pair."""
        return keep_threshold(self.p)

    @property
    def rescale(self) -> float:
        return 1.0 / (1.0 - self.p)

    def op_args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_op_args(cls, args) -> "Dropout":
        return cls(*args)


# Philox counter domain of attention dropout: the masking ops use domains 0-4 with the same scheme
# (position | domain << 24 in the counter's first word), so the streams never meet.
DROPOUT_DOMAIN = 16
NO_DROPOUT = Dropout()


def keep_threshold(p: float) -> int:
    return min(math.floor(p * 4294967296.0), 4294967295)


_DROPOUT_TYPES = {"dropout_p": float, "dropout_seed": Optional[torch.Tensor],
                  "dropout_offset": Optional[torch.Tensor], "sample_ids": Optional[torch.Tensor]}
assert len(_DROPOUT_TYPES) == len(dataclasses.fields(Dropout)), "one type per Dropout field, in order"
N_DROPOUT_ARGS = len(_DROPOUT_TYPES)

_TYPES = {"kv_lengths": Optional[torch.Tensor], "q_lengths": Optional[torch.Tensor],
          "prefix_lengths": Optional[torch.Tensor], "spans": Optional[torch.Tensor],
          "attn_mask": Optional[torch.Tensor], "causal": bool, "span_mode": str, "window_left": int,
          "window_right": int, "alibi_slopes": Optional[torch.Tensor]}
assert tuple(_TYPES) == tuple(f.name for f in dataclasses.fields(Mask)), "one type per Mask field, in order"


def op_signature(leading: tuple[tuple[str, object], ...], returns, middle: Optional[dict] = None) -> inspect.Signature:
    """The custom-op signature `leading..., <middle>, <Dropout's fields>` -> `returns`, `middle` being by default
    the padded layout's `<Mask's fields>, scale` (torch.library infers the schema from it)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    middle = {**_TYPES, "scale": float} if middle is None else middle
    params = [inspect.Parameter(n, kind, annotation=t) for n, t in (*leading, *middle.items())]
    # the dropout arguments default to "off": a call written without them means what it always meant
    params += [inspect.Parameter(n, kind, annotation=t, default=d)
               for (n, t), d in zip(_DROPOUT_TYPES.items(), NO_DROPOUT.op_args())]
    return inspect.Signature(params, return_annotation=returns)


N_MASK_ARGS = len(_TYPES)
