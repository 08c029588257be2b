"""Dynamic token masking: `mask_tokens` (MLM) and `mass_mask` (MASS), and `AdaptiveMaskRates` (per-token
rates driven by the model's loss). See docs/MASKING.md."""
from .adaptive import AdaptiveMaskRates
from .api import BACKENDS, mask_tokens, mass_mask

__all__ = ["BACKENDS", "AdaptiveMaskRates", "mask_tokens", "mass_mask"]
