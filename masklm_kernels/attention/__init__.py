"""Masked attention (docs/SEMANTICS.md, "Attention"): `fused_attention` (padded (B, H, S, D) with masks from
O(B) metadata) and `fused_attention_varlen` (packed sequences). Backends: `triton` (GPU; CPU tensors under
Triton's interpreter), `cpu` (blockwise PyTorch) and `reference` (the dense specification). Attention
dropout: `dropout_p`; `dropout_mask` returns the keep mask a call draws."""
from .api import BACKENDS, fused_attention, fused_attention_varlen
from .dropout import dropout_mask

__all__ = ["BACKENDS", "dropout_mask", "fused_attention", "fused_attention_varlen", "record_tiles"]


def __getattr__(name):
    # `record_tiles` lives with the Triton kernels; importing it loads triton, so only on demand.
    if name == "record_tiles":
        from .triton_host import record_tiles

        return record_tiles
    raise AttributeError(name)
