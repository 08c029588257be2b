"""Test-session set-up.

* Without a CUDA device, Triton kernels run under Triton's interpreter on CPU tensors
  (docs/TESTING.md, "Verification without a GPU"): TRITON_INTERPRET=1 must be set before triton is imported,
  so it is set here, before any test module imports the package. With a GPU the real kernels run.
* `tests/helpers.py` and `tests/masking_model.py` are importable by name whatever pytest's import mode.
"""
import os
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


WORDS = ("mask token attention kernel fused loss label vocabulary tensor batch padding span decoder encoder "
         "gradient softmax layer model train step sequence python module function class return value").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file for the training command: keeps the corpus and its tokenizer fast (the default
    corpus is the standard library's docstrings)."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(400)))
    return str(path)


@pytest.fixture
def tokenizer_cache(tmp_path, monkeypatch):
    """The training command's tokenizer cache in the test's own folder."""
    from masklm_kernels.training import data

    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
