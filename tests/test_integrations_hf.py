"""`masklm_kernels.integrations.huggingface.patch_bert`: a patched Hugging Face BertForMaskedLM /
RobertaForMaskedLM gives the unpatched model's loss and gradients (dropout off), in float64; unpatch
restores it; bad inputs are refused."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from masklm_kernels.integrations.huggingface import patch_bert, unpatch  # noqa: E402

V = 101


def _model(kind: str):
    torch.manual_seed(11)
    common = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**common))
    else:
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(pad_token_id=1, **common))
    model.config._attn_implementation = "eager"
    return model.double().train()


def _batch(seed: int, pad_id: int):
    g = torch.Generator().manual_seed(seed)
    B, S = 4, 16
    lengths = torch.tensor([16, 11, 5, 1])
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.where(mask == 1, torch.randint(5, V, (B, S), generator=g), pad_id)
    labels = torch.where((torch.rand(B, S, generator=g) < 0.3) & (mask == 1), ids, -100)
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls of the library's padded and packed (varlen) attention by the patched model."""
    import masklm_kernels.attention as attention

    calls = {"padded": 0, "packed": 0}
    for name, key in (("fused_attention", "padded"), ("fused_attention_varlen", "packed")):
        def spy(*a, _f=getattr(attention, name), _k=key, **k):
            calls[_k] += 1
            return _f(*a, **k)
        monkeypatch.setattr(attention, name, spy)
    return calls


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_patched_equals_unpatched(kind, attention_calls):
    model = _model(kind)
    ids, mask, labels = _batch(1, model.config.pad_token_id)
    ref, grads_ref = _loss_and_grads(model, ids, mask, labels)
    assert patch_bert(model) is model
    out, grads = _loss_and_grads(model, ids, mask, labels)
    assert attention_calls == {"padded": 0, "packed": 2}  # the encoder ran unpadded, one call per layer
    assert out.logits is None  # labelled rows only: no (tokens, vocab) logits
    assert_close(out.loss, ref.loss, atol=0, rtol=1e-10, msg="loss")
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert_close(g, grads_ref[name], atol=1e-12, rtol=1e-8, msg=f"grad {name}")
    # without labels the head runs as usual, over the fused attention
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert_close(logits[mask == 1], ref.logits[mask == 1], atol=1e-10, rtol=1e-9, msg="logits without labels")
    # per-layer outputs asked for: the encoder runs padded (HF's shapes), over fused_attention(kv_lengths)
    states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert attention_calls["padded"] == 2 and all(h.shape == (*ids.shape, 64) for h in states)
    ref_states = unpatch(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert_close(states[-1][mask == 1], ref_states[-1][mask == 1], atol=1e-10, rtol=1e-9, msg="hidden states")
    patch_bert(model)
    assert unpatch(model) is model
    again, _ = _loss_and_grads(model, ids, mask, labels)
    assert again.logits is not None
    assert_close(again.loss, ref.loss, atol=0, rtol=0, msg="unpatched again")


def test_patch_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="BertForMaskedLM or RobertaForMaskedLM"):
        patch_bert(torch.nn.Linear(2, 2))
    model = patch_bert(_model("bert"))
    ids, mask, labels = _batch(2, 0)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=left, labels=labels)
