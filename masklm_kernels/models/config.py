"""Model configurations: one dataclass for the encoder (and the MASS decoder), with named sizes."""
from __future__ import annotations

import dataclasses


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

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# tiny: CPU smoke runs and tests; small: a 2-core CPU trains it in minutes; base: BERT-base.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(),
}


def model_config(size: str = "base", **overrides) -> ModelConfig:
    """The named size ("tiny", "small", "base") with field overrides (e.g. vocab_size=...)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return ModelConfig(**{**SIZES[size], **overrides})
