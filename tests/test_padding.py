"""`masklm_kernels.padding`: the padded <-> packed layouts (token indices, unpad, pad, cu_seqlens) against
a per-row loop, and the padding-mask checks shared by the models and the Hugging Face integration."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import padding
from masklm_kernels.models import BertMLM, model_config

from helpers import assert_equal


def test_unpad_pad_round_trip_against_a_loop():
    g = torch.Generator().manual_seed(0)
    B, S, H = 5, 7, 3
    lengths = torch.tensor([7, 0, 3, 1, 6])
    x = torch.randn(B, S, H, generator=g)
    idx = padding.token_indices(lengths, S)
    packed = padding.unpad(x, idx)
    assert_equal(packed, torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())]), msg="unpad")
    back = padding.pad(packed, idx, B, S)
    want = torch.where(torch.arange(S)[None, :, None] < lengths[:, None, None], x, 0.0)
    assert_equal(back, want, msg="pad: the real tokens back in place, zeros at padding")
    assert_equal(padding.cu_seqlens(lengths), torch.tensor([0, 7, 7, 10, 11, 17], dtype=torch.int32),
                 msg="cu_seqlens")
    assert padding.unpad(x[:, :, 0], idx).shape == (17,)  # (B, S) inputs too: token ids, labels


def test_lengths_from_mask_requires_right_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert padding.lengths_from_mask(mask).tolist() == [2, 3, 0]
    assert padding.lengths_from_mask(mask.bool()).tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="attention_mask must be right-padded"):
        padding.lengths_from_mask(mask.flip(1))
    with pytest.raises(ValueError, match=r"must be the \(batch, seq\) 0/1 padding mask, got \(3, 1, 1, 3\)"):
        padding.lengths_from_mask(mask[:, None, None, :])


def test_bert_mlm_refuses_a_left_padded_mask():
    """Summing a left-padded mask would give the right lengths of the wrong tokens: a silent wrong loss."""
    model = BertMLM(model_config("tiny", vocab_size=50))
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    model(ids, ids, attention_mask=mask)
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, ids, attention_mask=mask.flip(1))
