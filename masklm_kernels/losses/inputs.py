"""The options of a cross-entropy call, described once.

`LossOptions` is what the loss computes per labelled row (docs/SEMANTICS.md, "Cross-entropy"); `api.py`
validates the user's arguments into one, and every layer below takes it whole:

* the custom ops' schemas (ops.py): their leading tensors, then `LossOptions`' fields in order, then any
  trailing scalars (`op_signature`); ops.py turns the flat arguments back into a `LossOptions`;
* the backends (cpu.py, triton_ce.py, linear.py) read its fields; the reference takes them as keywords
  (`_asdict()`).

Adding a per-row option is adding a field here (with its validation in api.py, its formula in
reference.py and the backends); the schemas, fakes and autograd wiring follow.
"""
from __future__ import annotations

import inspect
import typing
from typing import NamedTuple


class LossOptions(NamedTuple):
    ignore_index: int  # label of rows that carry no loss
    label_smoothing: float  # eps in [0, 1]: 1 - eps on the label, eps / V on every class
    z_loss: float  # coefficient of lse^2 per labelled row (PaLM)


def op_signature(leading: tuple[tuple[str, object], ...], returns,
                 trailing: tuple[tuple[str, object], ...] = ()) -> inspect.Signature:
    """The custom-op signature `leading..., <LossOptions' fields>, trailing...` -> `returns` (torch.library
    infers the schema from it)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    options = tuple(typing.get_type_hints(LossOptions).items())  # evaluated: annotations are strings here
    return inspect.Signature([inspect.Parameter(n, kind, annotation=t) for n, t in (*leading, *options, *trailing)],
                             return_annotation=returns)
