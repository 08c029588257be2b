"""Masked attention (BRIEF.md, "Attention semantics"): `fused_attention`. Backends so far: `cpu`
(blockwise, forward and backward) and `reference` (the dense specification); Triton is issue 3's next step."""
from .api import BACKENDS, fused_attention

__all__ = ["BACKENDS", "fused_attention"]
