"""BERT-style masked-LM encoder with two implementations that compute the same function:

* "fused": the batch is unpadded once for all layers (packed tokens, FlashAttention's varlen layout, so
  no layer touches a padding token), attention is `fused_attention_varlen`, and only the labelled rows
  reach the LM head, through `fused_linear_cross_entropy` (no (tokens, vocab) logits).
* "reference": plain PyTorch on the padded batch, a dense key-padding mask, full logits, F.cross_entropy.

Positions and attention pattern come from the config: BERT's learned table, or ModernBERT-style RoPE
(rotary q / k, one base for global and one for local layers) with sliding-window local layers and a global
layer every N, or MosaicBERT-style ALiBi; both implementations apply them (fused: `window_size` and
`alibi_slopes` of the kernels, which skip the tiles outside a window; reference: the dense band and bias).

Unpadding and selecting the labelled rows count tokens on the host (`nonzero`): one synchronisation each
per step on a GPU, as Hugging Face's and FlashAttention's unpad helpers do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._common import IGNORE_INDEX
from .._validation import check_range
from ..padding import cu_seqlens, lengths_from_mask, pad, token_indices
from .config import ModelConfig
from .layers import (
    AttentionDropout,
    Embeddings,
    Layer,
    LMHead,
    alibi_slopes,
    dense_attend,
    init_weights,
    rotary_tables,
    varlen_fused_attend,
)

IMPLEMENTATIONS = ("fused", "reference")


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def lengths_from(input_ids: torch.Tensor, lengths, attention_mask) -> torch.Tensor:
    """(B,) int64 lengths of right-padded rows, from `lengths` or a (B, S) 0/1 `attention_mask`."""
    if lengths is not None and attention_mask is not None:
        raise ValueError("pass lengths or attention_mask, not both")
    if lengths is None and attention_mask is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[1], dtype=torch.int64, device=input_ids.device)
    if lengths is None:
        return lengths_from_mask(attention_mask)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != input_ids.shape[:1] or lengths.is_floating_point():
        got = getattr(lengths, "dtype", type(lengths).__name__)
        raise ValueError(f"lengths must be a ({input_ids.shape[0]},) integer tensor, got {got} of shape "
                         f"{tuple(getattr(lengths, 'shape', ()))}")
    lengths = lengths.to(device=input_ids.device, dtype=torch.int64)
    check_range("lengths", lengths, 0, input_ids.shape[1])  # CPU tensors: a clear error naming `lengths`
    # on a GPU (no check without a synchronisation) lengths are clamped, so that the packed layout never
    # addresses tokens outside input_ids
    return lengths.clamp(0, input_ids.shape[1])


def model_dropout(model: nn.Module, calls: int, seed, step, sample_ids) -> AttentionDropout:
    """The attention dropout of one forward of `model` (its config's rate in train(), off in eval())."""
    p = model.config.attention_probs_dropout_prob if model.training else 0.0
    return AttentionDropout(p, calls, seed, step, sample_ids)


class Encoder(nn.Module):
    """Embeddings and the layers, for packed tokens (fused) or a padded batch (reference). Layer i attends
    with the config's window for it (`layer_window`) and, with RoPE, rotates q and k by the tables of its
    base (`layer_rope_theta`), computed once per base for the forward."""

    def __init__(self, cfg: ModelConfig, num_layers: int | None = None):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(num_layers or cfg.num_hidden_layers))

    def forward(self, ids, positions, attend):
        cfg = self.config
        x = self.embeddings(ids, positions)
        tables = {}
        for i, layer in enumerate(self.layer):
            rotary = None
            if cfg.position_embedding_type == "rope":
                theta = cfg.layer_rope_theta(i)
                if theta not in tables:
                    tables[theta] = rotary_tables(positions, cfg.head_dim, theta, x.dtype)
                rotary = tables[theta]
            x = layer(x, attend, rotary=rotary, window=cfg.layer_window(i))
        return x


class BertMLM(nn.Module):
    """forward(input_ids (B, S), labels (B, S) = None, *, lengths (B,) or attention_mask (B, S)) ->

    * with labels: dict(loss (0-dim: mean over labelled rows, 0 when none), and with return_logits the
      logits (n_labelled, V) in row-major order of the labelled positions). Labels at padding positions
      are ignored.
    * without labels (inference, e.g. fill-mask): dict(logits (B, S, V)), zeros at padding positions.

    Attention-probability dropout (the config's, in train() only): `dropout_seed` (None: drawn from torch's
    generator), `dropout_step` (the training step) and `sample_ids` ((B,) global sample ids; default the row)
    key its masks, so that a data-parallel run drops what a single-process run would.
    """

    def __init__(self, cfg: ModelConfig, implementation: str = "fused"):
        super().__init__()
        self.config, self.implementation = cfg, check_implementation(implementation)
        self.bert = Encoder(cfg)
        self.cls = LMHead(cfg)
        self.apply(init_weights)
        # ALiBi's fixed slopes: a function of the head count, not a parameter nor saved state
        self.alibi_slopes = alibi_slopes(cfg.num_attention_heads) if cfg.position_embedding_type == "alibi" else None

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight  # tied, as BERT's

    def forward(self, input_ids, labels=None, *, lengths=None, attention_mask=None, return_logits=False,
                return_token_losses=False, sample_ids=None, dropout_seed=None, dropout_step=0):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        B, S = input_ids.shape
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
        lengths = lengths_from(input_ids, lengths, attention_mask)
        positions = torch.arange(S, device=input_ids.device).expand(B, S)
        drop = model_dropout(self, len(self.bert.layer), dropout_seed, dropout_step, sample_ids)
        slopes = self.alibi_slopes.to(input_ids.device) if self.alibi_slopes is not None else None
        if self.implementation == "fused":
            idx = token_indices(lengths, S)  # unpad once (host sync: the token count)
            cu = cu_seqlens(lengths)
            x = self.bert(input_ids.flatten()[idx], positions.flatten()[idx],
                          varlen_fused_attend(cu, cu, S, S, dropout=drop, alibi_slopes=slopes))
            if labels is None:
                return {"logits": pad(self._logits(x), idx, B, S)}
            rows = labels.flatten()[idx]
        else:
            valid = positions < lengths[:, None]
            x = self.bert(input_ids, positions, dense_attend(valid[:, None, None, :], drop, slopes))
            if labels is None:
                return {"logits": self._logits(x).masked_fill(~valid[..., None], 0.0)}
            rows = labels.masked_fill(~valid, IGNORE_INDEX)
        return lm_loss(self.cls, self.decoder_weight, x, rows, self.implementation, return_logits,
                       return_token_losses)

    def _logits(self, x):
        return F.linear(self.cls.transform(x), self.decoder_weight, self.cls.bias)


def lm_loss(head: LMHead, weight: torch.Tensor, x: torch.Tensor, labels, implementation: str,
            return_logits: bool, return_token_losses: bool = False) -> dict:
    """The LM head and the loss over x (..., H) and labels (...): dict(loss, logits of the labelled rows,
    and with return_token_losses `labelled` (n,) the labelled rows' ids and `token_losses` (n,) their
    losses, detached, in the same order: what AdaptiveMaskRates.update takes).
    fused: only labelled rows are transformed and reach fused_linear_cross_entropy; reference: full logits."""
    if labels is None:
        return {}
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    out = {}
    if implementation == "fused":
        from ..losses import fused_linear_cross_entropy

        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # host sync: the labelled-row count
        h = head.transform(x.index_select(0, keep))
        y = labels.index_select(0, keep)
        if return_token_losses:  # per row, then their mean: the same loss and gradients as "mean"
            per_row = fused_linear_cross_entropy(h, weight, y, bias=head.bias, reduction="none")
            out["loss"] = per_row.sum() / max(int(keep.numel()), 1)
            out["labelled"], out["token_losses"] = y, per_row.detach()
        else:
            out["loss"] = fused_linear_cross_entropy(h, weight, y, bias=head.bias)
        if return_logits:
            out["logits"] = F.linear(h, weight, head.bias)
        return out
    logits = F.linear(head.transform(x), weight, head.bias)
    keep = labels != IGNORE_INDEX
    per_row = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    out["loss"] = per_row.sum() / keep.sum().clamp_min(1)
    if return_token_losses:
        out["labelled"], out["token_losses"] = labels[keep], per_row[keep].detach()
    if return_logits:
        out["logits"] = logits[keep]
    return out
