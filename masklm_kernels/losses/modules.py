"""`nn.Module` wrappers of the losses, configured once like `nn.CrossEntropyLoss`."""
from __future__ import annotations

import torch

from .api import fused_linear_cross_entropy, masked_cross_entropy


class MaskedCrossEntropyLoss(torch.nn.Module):
    """`masked_cross_entropy` as a module: `loss = MaskedCrossEntropyLoss(label_smoothing=0.1)(logits, labels)`."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                            reduction=reduction, backend=backend)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
        return masked_cross_entropy(logits, labels, num_items=num_items, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearCrossEntropyLoss(MaskedCrossEntropyLoss):
    """`fused_linear_cross_entropy` as a module; the LM head's parameters are passed at call time (tied
    embeddings stay owned by the model): `loss = FusedLinearCrossEntropyLoss()(hidden, head.weight, labels,
    bias=head.bias)`."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias=None,
                num_items=None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, num_items=num_items, **self.options)
