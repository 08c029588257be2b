"""Dynamic token masking: `mask_tokens` (MLM) and `mass_mask` (MASS). See docs/MASKING.md."""
from .api import BACKENDS, mask_tokens, mass_mask

__all__ = ["BACKENDS", "mask_tokens", "mass_mask"]
