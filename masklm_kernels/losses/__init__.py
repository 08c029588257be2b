"""Losses (BRIEF.md, "Cross-entropy semantics"): `masked_cross_entropy`, computed over labelled rows only.
Backends: `cpu` (chunked, labelled rows only) and `reference` (dense). Triton kernels and the fused LM-head
loss (`fused_linear_cross_entropy`) are issue 4's next steps."""
from .api import BACKENDS, masked_cross_entropy

__all__ = ["BACKENDS", "masked_cross_entropy"]
