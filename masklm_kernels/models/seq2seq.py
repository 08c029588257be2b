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

from .layers import dense_attend, padded_fused_attend
from .mass import EncoderDecoder


class Seq2SeqModel(EncoderDecoder):
    """forward(input_ids (B, Se), decoder_input_ids (B, Sd), labels (B, Sd), *, input_lengths (B,),
    label_lengths (B,)) -> dict(loss: mean over labelled positions, and with return_logits the labelled
    rows' logits) — `t5_span_corruption`'s / `bart_infill`'s outputs, in order. Attention dropout:
    `sample_ids`, `dropout_seed`, `dropout_step` as BertMLM's (calls: the encoder's layers, then each
    decoder layer's self- and cross-attention)."""

    def forward(self, input_ids, decoder_input_ids, labels, *, input_lengths, label_lengths, return_logits=False,
                sample_ids=None, dropout_seed=None, dropout_step=0):
        (B, Se), Sd = input_ids.shape, decoder_input_ids.shape[1]
        dev = input_ids.device
        enc_len = input_lengths.to(device=dev, dtype=torch.int64)
        dec_len = label_lengths.to(device=dev, dtype=torch.int64)
        drop = self.attention_dropout(dropout_seed, dropout_step, sample_ids)
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
        return self.decode(memory, decoder_input_ids, self_attend, cross_attend, labels, return_logits)
