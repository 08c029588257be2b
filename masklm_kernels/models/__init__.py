"""Reference PyTorch models that use the library's kernels: a BERT-style MLM encoder, a MASS
encoder-decoder and a sequence-to-sequence model for T5-style targets, each with a "fused" implementation
(the library's ops) and a "reference" one (plain PyTorch), built from shared modules (layers.py)."""
from .config import SIZES, ModelConfig, model_config
from .hf import from_hf
from .mass import MassModel
from .mlm import BertMLM
from .seq2seq import Seq2SeqModel

__all__ = ["SIZES", "BertMLM", "MassModel", "ModelConfig", "Seq2SeqModel", "from_hf", "model_config"]
