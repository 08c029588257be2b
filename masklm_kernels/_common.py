"""Policy shared by every op, stated once.

* `FLOAT_DTYPES`: the floating dtypes the ops take (float64 for the references and the CPU paths).
* `acc_dtype`: accumulation dtype of a computation on a dtype: fp32 for fp16 / bf16 / fp32 (softmax sums,
  log-sum-exp, d weight), fp64 for fp64 (the oracles' precision).
* `IGNORE_INDEX`: the label of positions that carry no loss (-100, PyTorch's and Hugging Face's).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IGNORE_INDEX = -100


def acc_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """fp64 for fp64 (a tensor or a dtype), else fp32."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32
