"""Dynamic token masking: `mask_tokens` (MLM), `mass_mask` (MASS), `t5_span_corruption` (T5), `bart_infill` (BART), and
`AdaptiveMaskRates` (per-token rates driven by the model's loss). See docs/MASKING.md."""
from .adaptive import AdaptiveMaskRates
from .api import BACKENDS, mask_tokens, mass_mask
from .denoising import T5Batch, bart_infill, t5_span_corruption

__all__ = ["BACKENDS", "AdaptiveMaskRates", "T5Batch", "bart_infill", "mask_tokens", "mass_mask",
           "t5_span_corruption"]
