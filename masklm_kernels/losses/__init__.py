"""Losses (docs/SEMANTICS.md, "Cross-entropy"): `masked_cross_entropy` and `fused_linear_cross_entropy` (the
LM head fused with it), computed over labelled rows only. Backends: `cpu` (chunked, labelled rows only),
`triton` (one fused pass per row; the fused head chunked over labelled rows) and `reference` (dense)."""
from .api import BACKENDS, fused_linear_cross_entropy, masked_cross_entropy
from .modules import FusedLinearCrossEntropyLoss, MaskedCrossEntropyLoss

__all__ = ["BACKENDS", "FusedLinearCrossEntropyLoss", "MaskedCrossEntropyLoss", "fused_linear_cross_entropy",
           "masked_cross_entropy"]
