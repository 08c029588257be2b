"""Test-session set-up.

* Without a CUDA device, Triton kernels run under Triton's interpreter on CPU tensors
  (BRIEF.md, "Verification without a GPU"): TRITON_INTERPRET=1 must be set before triton is imported,
  so it is set here, before any test module imports the package. With a GPU the real kernels run.
* `tests/helpers.py` and `tests/masking_model.py` are importable by name whatever pytest's import mode.
"""
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
