"""Encoder-decoder for the denoising objectives whose targets are sequences of their own (T5 span
corruption, BART infilling), with the two implementations of mlm.py:

* encoder: bidirectional self-attention over each row's `input_lengths[b]` tokens;
* decoder: causal self-attention over its `label_lengths[b]` tokens, cross-attention to the encoder's;
* loss on `labels` (ignore_index beyond each row's length), through the tied LM head.

"fused" passes lengths and causality to `fused_attention` as O(B) metadata (rows beyond a length are not
computed); "reference" builds the same masks densely in plain PyTorch. Layers, weights and names are
MassModel's (BERT's post-LayerNorm layers; the decoder's embeddings shared with the encoder).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Layer, LMHead, dense_attend, init_weights, padded_fused_attend
from .mlm import Encoder, check_implementation, lm_loss, model_dropout


class Seq2SeqModel(nn.Module):
    """forward(input_ids (B, Se), decoder_input_ids (B, Sd), labels (B, Sd), *, input_lengths (B,),
    label_lengths (B,)) -> dict(loss: mean over labelled positions, and with return_logits the labelled
    rows' logits) — `t5_span_corruption`'s outputs, in order. Attention dropout: `sample_ids`,
    `dropout_seed`, `dropout_step` as BertMLM's (calls: the encoder's layers, then each decoder layer's
    self- and cross-attention)."""

    def __init__(self, cfg: ModelConfig, implementation: str = "fused"):
        super().__init__()
        if cfg.position_embedding_type != "learned" or cfg.sliding_window >= 0:
            raise ValueError("Seq2SeqModel: BERT's learned positions only (position_embedding_type 'learned', "
                             f"sliding_window -1), got {cfg.position_embedding_type!r}, {cfg.sliding_window}")
        self.config, self.implementation = cfg, check_implementation(implementation)
        self.encoder = Encoder(cfg)
        self.decoder = nn.ModuleList(Layer(cfg, cross=True)
                                     for _ in range(cfg.num_decoder_layers or cfg.num_hidden_layers))
        self.cls = LMHead(cfg)
        self.apply(init_weights)

    def forward(self, input_ids, decoder_input_ids, labels, *, input_lengths, label_lengths, return_logits=False,
                sample_ids=None, dropout_seed=None, dropout_step=0):
        (B, Se), Sd = input_ids.shape, decoder_input_ids.shape[1]
        dev = input_ids.device
        enc_len = input_lengths.to(device=dev, dtype=torch.int64)
        dec_len = label_lengths.to(device=dev, dtype=torch.int64)
        drop = model_dropout(self, len(self.encoder.layer) + 2 * len(self.decoder), dropout_seed, dropout_step,
                             sample_ids)
        if self.implementation == "fused":
            enc_attend = padded_fused_attend(drop, kv_lengths=enc_len, q_lengths=enc_len)
            self_attend = padded_fused_attend(drop, causal=True, kv_lengths=dec_len, q_lengths=dec_len)
            cross_attend = padded_fused_attend(drop, kv_lengths=enc_len, q_lengths=dec_len)
        else:
            ie, je = torch.arange(Se, device=dev)[:, None], torch.arange(Se, device=dev)[None]
            idd, jd = torch.arange(Sd, device=dev)[:, None], torch.arange(Sd, device=dev)[None]
            e, d = enc_len[:, None, None], dec_len[:, None, None]
            enc_attend = dense_attend(((je < e) & (ie < e))[:, None], drop)
            self_attend = dense_attend(((jd <= idd) & (jd < d) & (idd < d))[:, None], drop)
            cross_attend = dense_attend(((je < e) & (idd < d))[:, None], drop)
        memory = self.encoder(input_ids, torch.arange(Se, device=dev).expand(B, Se), enc_attend)
        x = self.encoder.embeddings(decoder_input_ids, torch.arange(Sd, device=dev).expand(B, Sd))
        for layer in self.decoder:
            x = layer(x, self_attend, memory, cross_attend)
        weight = self.encoder.embeddings.word_embeddings.weight
        return lm_loss(self.cls, weight, x, labels, self.implementation, return_logits)
