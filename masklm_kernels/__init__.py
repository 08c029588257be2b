"""masklm_kernels: fast kernels for masked-language-model training.

Masked attention, on-device dynamic token masking and fused masked cross-entropy. Every op is a
torch.library custom op; `python -m masklm_kernels.info` prints which backends run here and why not.
"""
from ._backends import BackendUnavailableError
from .attention import fused_attention, fused_attention_varlen
from .losses import fused_linear_cross_entropy, masked_cross_entropy
from .masking import AdaptiveMaskRates, bart_infill, mask_tokens, mass_mask, t5_span_corruption

__version__ = "0.1.0"
__all__ = ["AdaptiveMaskRates", "BackendUnavailableError", "bart_infill", "fused_attention", "fused_attention_varlen",
           "fused_linear_cross_entropy", "mask_tokens", "masked_cross_entropy", "mass_mask", "t5_span_corruption",
           "__version__"]
