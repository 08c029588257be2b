"""Losses (BRIEF.md, "Cross-entropy semantics"): `masked_cross_entropy` and `fused_linear_cross_entropy` (the
LM head fused with it), computed over labelled rows only. Backends: `cpu` (chunked, labelled rows only) and
`reference` (dense). The Triton kernels are issue 4's next step."""
from .api import BACKENDS, fused_linear_cross_entropy, masked_cross_entropy
from .modules import FusedLinearCrossEntropyLoss, MaskedCrossEntropyLoss

__all__ = ["BACKENDS", "FusedLinearCrossEntropyLoss", "MaskedCrossEntropyLoss", "fused_linear_cross_entropy",
           "masked_cross_entropy"]
