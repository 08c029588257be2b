"""Model configurations: one dataclass for the encoder (and the MASS decoder), with named sizes and
styles: BERT (learned absolute positions, every layer global), ModernBERT-style (RoPE, sliding-window
local layers with a global layer every third) and MosaicBERT-style (ALiBi biases, no position table)."""
from __future__ import annotations

import dataclasses

POSITIONS = ("learned", "rope", "alibi")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """BERT's hyper-parameters (names as Hugging Face's BertConfig, so that `from_hf` maps one to one)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_decoder_layers: int = 0  # MASS: decoder layers (0: the encoder's count)
    # how positions enter: "learned" (BERT's table added to the embeddings), "rope" (rotary embedding of
    # q and k in every layer, Su et al. 2021; ModernBERT), "alibi" (a -slope * |i - j| bias per head on
    # the scores, Press et al. 2022; MosaicBERT)
    position_embedding_type: str = "learned"
    rope_theta: float = 10000.0  # RoPE base of the global layers (ModernBERT: 160000)
    local_rope_theta: float | None = None  # RoPE base of the local layers (None: rope_theta; ModernBERT: 10000)
    sliding_window: int = -1  # local layers let token i see keys j with |i - j| <= sliding_window (-1: none)
    global_attn_every_n_layers: int = 1  # layer i is global when i % n == 0, else local (ModernBERT: 3)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        kind = self.position_embedding_type
        if kind not in POSITIONS:
            raise ValueError(f"position_embedding_type must be one of {POSITIONS}, got {kind!r}")
        if kind == "rope" and self.head_dim % 2:
            raise ValueError(f"position_embedding_type 'rope' needs an even head_dim, got {self.head_dim}")
        for name in ("rope_theta", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not value > 1:
                raise ValueError(f"{name} must be > 1, got {value}")
        for name, low in (("sliding_window", -1), ("global_attn_every_n_layers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_window(self, i: int) -> int:
        """Layer i's half-window w (keys |i - j| <= w), -1 when the layer is global."""
        return self.sliding_window if self.sliding_window >= 0 and i % self.global_attn_every_n_layers else -1

    def layer_rope_theta(self, i: int) -> float:
        local = self.layer_window(i) >= 0 and self.local_rope_theta is not None
        return self.local_rope_theta if local else self.rope_theta


# tiny: CPU smoke runs and tests; small: a 2-core CPU trains it in minutes; base: BERT-base.
_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(),
}
# "modern-<size>": ModernBERT's attention pattern (RoPE with its two bases, 128-token local windows, a
# global layer every third); "mosaic-<size>": MosaicBERT's ALiBi. The rest of the layer stays BERT's.
_STYLES = {
    "modern": dict(position_embedding_type="rope", rope_theta=160000.0, local_rope_theta=10000.0, sliding_window=64,
                   global_attn_every_n_layers=3),
    "mosaic": dict(position_embedding_type="alibi"),
}
SIZES = {**_SIZES, **{f"{style}-{size}": {**settings, **_STYLES[style]} for style in _STYLES
                      for size, settings in _SIZES.items()}}
SIZES["modern-tiny"]["sliding_window"] = 8  # tiny runs use short sequences: a window narrower than them


def model_config(size: str = "base", **overrides) -> ModelConfig:
    """The named size ("tiny", "small", "base", or a style's: "modern-small", "mosaic-base", ...) with
    field overrides (e.g. vocab_size=...)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return ModelConfig(**{**SIZES[size], **overrides})
