"""MASS encoder-decoder (Song et al., 2019) over `mass_mask`'s outputs, with the two implementations of mlm.py:

* encoder: bidirectional self-attention over each row's valid tokens;
* decoder (its inputs: the fragment's tokens shifted right, at their own positions): self-attention
  causal and restricted to the fragment (`spans`, span_mode "inside": keys and rows in the fragment),
  cross-attention to the encoder's tokens outside the fragment (span_mode "outside", encoder lengths);
* loss on the fragment's positions (mass_mask's labels), through the tied LM head.

"fused" passes this metadata to `fused_attention` (no dense mask is built; decoder rows outside the
fragment are not computed) and the labelled rows to `fused_linear_cross_entropy`; "reference" builds the
same masks densely in plain PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Layer, LMHead, dense_attend, init_weights, padded_fused_attend
from .mlm import Encoder, check_implementation, lm_loss, model_dropout


class EncoderDecoder(nn.Module):
    """The encoder (mlm.Encoder), `num_decoder_layers` decoder layers with cross-attention, and the LM head
    tied to the shared word embeddings: MassModel's and Seq2SeqModel's modules (their parameter names)."""

    def __init__(self, cfg: ModelConfig, implementation: str = "fused"):
        super().__init__()
        if cfg.position_embedding_type != "learned" or cfg.sliding_window >= 0:
            # the decoder attends across two position ranges (its own and the encoder's), which the
            # relative schemes and windows of the encoder-only styles do not define
            raise ValueError(f"{type(self).__name__}: BERT's learned positions only (position_embedding_type "
                             f"'learned', sliding_window -1), got {cfg.position_embedding_type!r}, "
                             f"{cfg.sliding_window}; RoPE, ALiBi and local windows are BertMLM's")
        self.config, self.implementation = cfg, check_implementation(implementation)
        self.encoder = Encoder(cfg)
        self.decoder = nn.ModuleList(Layer(cfg, cross=True)
                                     for _ in range(cfg.num_decoder_layers or cfg.num_hidden_layers))
        self.cls = LMHead(cfg)
        self.apply(init_weights)

    def decode(self, memory, decoder_input_ids, self_attend, cross_attend, labels, return_logits: bool) -> dict:
        """The decoder over `memory` (the encoder's output), then the head and the loss (mlm.lm_loss)."""
        B, Sd = decoder_input_ids.shape
        positions = torch.arange(Sd, device=decoder_input_ids.device).expand(B, Sd)
        x = self.encoder.embeddings(decoder_input_ids, positions)  # embeddings shared with the encoder
        for layer in self.decoder:
            x = layer(x, self_attend, memory, cross_attend)
        weight = self.encoder.embeddings.word_embeddings.weight
        return lm_loss(self.cls, weight, x, labels, self.implementation, return_logits)

    def attention_dropout(self, seed, step, sample_ids):
        """The forward's attention dropout: calls are the encoder's layers, then each decoder layer's self-
        and cross-attention."""
        return model_dropout(self, len(self.encoder.layer) + 2 * len(self.decoder), seed, step, sample_ids)


class MassModel(EncoderDecoder):
    """forward(encoder_input_ids, decoder_input_ids, labels, spans, *, lengths) -> dict(loss, logits of the
    labelled rows when return_logits). All (B, S) except spans (B, 2) and lengths (B,): mass_mask's outputs.
    Attention dropout: `sample_ids`, `dropout_seed`, `dropout_step` as BertMLM's (calls in order: the
    encoder's layers, then each decoder layer's self- and cross-attention)."""

    def forward(self, encoder_input_ids, decoder_input_ids, labels, spans, *, lengths, return_logits=False,
                sample_ids=None, dropout_seed=None, dropout_step=0):
        B, S = encoder_input_ids.shape
        dev = encoder_input_ids.device
        lengths = lengths.to(device=dev, dtype=torch.int64)
        positions = torch.arange(S, device=dev).expand(B, S)
        drop = self.attention_dropout(dropout_seed, dropout_step, sample_ids)
        if self.implementation == "fused":
            enc_attend = padded_fused_attend(drop, kv_lengths=lengths)
            self_attend = padded_fused_attend(drop, causal=True, spans=spans, span_mode="inside")
            cross_attend = padded_fused_attend(drop, kv_lengths=lengths, spans=spans, span_mode="outside")
        else:
            i, j = positions[:, :, None], positions[:, None, :]
            start, end = spans[:, 0, None, None], spans[:, 1, None, None]
            in_span_j = (j >= start) & (j < end)
            enc_attend = dense_attend((j < lengths[:, None, None])[:, None], drop)
            self_attend = dense_attend((in_span_j & (i >= start) & (i < end) & (j <= i))[:, None], drop)
            cross_attend = dense_attend(((j < lengths[:, None, None]) & ~in_span_j)[:, None], drop)
        memory = self.encoder(encoder_input_ids, positions, enc_attend)
        return self.decode(memory, decoder_input_ids, self_attend, cross_attend, labels, return_logits)
