"""The mask of a padded-layout attention call, described once.

`Mask` holds the O(B) metadata and the dense escape hatch (docs/SEMANTICS.md, "Attention"). `api.py`
validates the user's arguments into one; every layer below derives what it needs from it:

* the custom ops' schema (ops.py): q, k, v, then `Mask`'s fields in their order, then the scale
  (`OP_PARAMETERS`), and the conversion both ways (`Mask.op_args`, `Mask.from_op_args`);
* the backends (cpu.py, triton_host.py) read its fields, and `visibility_kwargs()` is what masks.py's
  `visibility` and the reference take.

Adding a mask option is adding a field here (with its validation in api.py and its use in the kernels);
the schema, the fakes, the autograd wiring and the argument order follow.
"""
from __future__ import annotations

import dataclasses
import inspect
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

    def op_args(self) -> tuple:
        """The fields in schema order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_op_args(cls, args) -> "Mask":
        return cls(*args)

    def visibility_kwargs(self) -> dict:
        """The O(B) metadata as masks.visibility and reference.attention take it (attn_mask aside)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "attn_mask"}

    @property
    def has_metadata(self) -> bool:
        """Any length, prefix or span given (the ATen whole-batch shortcut then does not apply)."""
        return any(t is not None for t in (self.kv_lengths, self.q_lengths, self.prefix_lengths, self.spans))


_TYPES = {"kv_lengths": Optional[torch.Tensor], "q_lengths": Optional[torch.Tensor],
          "prefix_lengths": Optional[torch.Tensor], "spans": Optional[torch.Tensor],
          "attn_mask": Optional[torch.Tensor], "causal": bool, "span_mode": str}
assert tuple(_TYPES) == tuple(f.name for f in dataclasses.fields(Mask)), "one type per Mask field, in order"


def _parameters(leading: tuple[tuple[str, object], ...]) -> list[inspect.Parameter]:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(n, kind, annotation=t) for n, t in leading] + \
        [inspect.Parameter(n, kind, annotation=t) for n, t in _TYPES.items()] + \
        [inspect.Parameter("scale", kind, annotation=float)]


def op_signature(leading: tuple[tuple[str, object], ...], returns) -> inspect.Signature:
    """The custom-op signature `leading..., <Mask's fields>, scale` -> `returns` (torch.library infers the
    schema from it)."""
    return inspect.Signature(_parameters(leading), return_annotation=returns)


N_MASK_ARGS = len(_TYPES)
