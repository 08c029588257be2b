"""Loading Hugging Face BERT weights into the library's models: `from_hf(BertForMaskedLM)`."""
from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .mlm import BertMLM

# Hugging Face parameter name (regex) -> ours; every other name is the same in both.
_RENAMES = (
    (r"^bert\.encoder\.layer\.(\d+)\.attention\.self\.", r"bert.layer.\1.attention."),
    (r"^bert\.encoder\.layer\.(\d+)\.attention\.output\.", r"bert.layer.\1.attention."),
    (r"^bert\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"bert.layer.\1.ffn.intermediate."),
    (r"^bert\.encoder\.layer\.(\d+)\.output\.dense\.", r"bert.layer.\1.ffn.output."),
    (r"^bert\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"bert.layer.\1.ffn.LayerNorm."),
    (r"^cls\.predictions\.transform\.", r"cls."),
    (r"^cls\.predictions\.bias$", r"cls.bias"),
)


def hf_name_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face BertForMaskedLM one (None: the tied decoder weight, which is
    our word embedding)."""
    if name.startswith("cls.predictions.decoder."):
        return None
    for pattern, repl in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def config_from_hf(hf_config) -> ModelConfig:
    kind = getattr(hf_config, "model_type", None)
    if kind != "bert":
        raise TypeError(f"from_hf expects a BERT model (model_type 'bert'), got {kind!r}")
    if hf_config.hidden_act != "gelu":
        raise ValueError(f"hidden_act must be 'gelu' (exact GELU, as the models use), got {hf_config.hidden_act!r}")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
              "layer_norm_eps", "pad_token_id")
    return ModelConfig(**{f: getattr(hf_config, f) for f in fields})


def from_hf(hf_model, implementation: str = "fused") -> BertMLM:
    """A BertMLM with the weights of a Hugging Face `BertForMaskedLM` (copied; dtype and device kept)."""
    cfg = config_from_hf(hf_model.config)
    tied = hf_model.cls.predictions.decoder.weight.data_ptr() == \
        hf_model.bert.embeddings.word_embeddings.weight.data_ptr()
    if not tied:
        raise ValueError("from_hf needs the decoder tied to the word embeddings (tie_word_embeddings=True)")
    ref = next(hf_model.parameters())
    model = BertMLM(cfg, implementation=implementation).to(device=ref.device, dtype=ref.dtype)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        ours = hf_name_to_ours(name)
        if ours is not None and "position_ids" not in ours and "token_type_ids" not in ours:
            state[ours] = tensor
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
