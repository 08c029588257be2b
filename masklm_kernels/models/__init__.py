"""Reference PyTorch models that use the library's kernels: a BERT-style MLM encoder and a MASS
encoder-decoder, each with a "fused" implementation (the library's ops) and a "reference" one (plain PyTorch),
built from shared modules (layers.py)."""
from .config import SIZES, ModelConfig, model_config
from .hf import from_hf
from .mass import MassModel
from .mlm import BertMLM

__all__ = ["SIZES", "BertMLM", "MassModel", "ModelConfig", "from_hf", "model_config"]
