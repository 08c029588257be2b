"""Reference models (masklm_kernels.models): the "fused" implementation (the library's kernels: varlen attention,
metadata masks, the fused LM head over labelled rows) computes the same loss, labelled-row logits and
parameter gradients as the "reference" implementation (plain PyTorch, dense masks, full logits), in float64."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import mass_mask
from masklm_kernels.models import BertMLM, MassModel, model_config

from helpers import assert_close

F64 = dict(atol=1e-10, rtol=1e-9)
V = 97


def _pair(cls, seed, **overrides):
    torch.manual_seed(seed)
    cfg = model_config("tiny", vocab_size=V, **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                                **overrides})
    ref = cls(cfg, implementation="reference").double()
    fused = cls(cfg, implementation="fused").double()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _compare(ref, fused, *args, **kwargs):
    outs = []
    for model in (ref, fused):
        out = model(*args, return_logits=True, **kwargs)
        out["loss"].backward()
        outs.append(out)
    assert_close(outs[1]["loss"], outs[0]["loss"], **F64, msg="loss")
    assert outs[1]["logits"].shape == outs[0]["logits"].shape
    assert_close(outs[1]["logits"], outs[0]["logits"], **F64, msg="labelled-row logits")
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        g_ref = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad
        g_fused = torch.zeros_like(p_fused) if p_fused.grad is None else p_fused.grad
        assert_close(g_fused, g_ref, **F64, msg=f"grad {name}")
    return outs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlm_fused_equals_reference(seed):
    ref, fused = _pair(BertMLM, seed)
    g = torch.Generator().manual_seed(seed)
    B, S = 4, 17
    ids = torch.randint(5, V, (B, S), generator=g)
    lengths = torch.tensor([17, 9, 1, 0])  # full, padded, one token, empty
    labels = torch.where(torch.rand(B, S, generator=g) < 0.3, ids, -100)
    _compare(ref, fused, ids, labels, lengths=lengths)


def test_mlm_attention_mask_and_no_labels():
    ref, fused = _pair(BertMLM, 3)
    ids = torch.randint(5, V, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = torch.full((2, 8), -100)
    labels[1, 6] = 7  # on padding: ignored by both
    outs = _compare(ref, fused, ids, labels, attention_mask=mask)
    assert outs[1]["loss"] == 0 and outs[1]["logits"].shape == (0, V)
    with pytest.raises(ValueError, match="lengths or attention_mask, not both"):
        fused(ids, labels, lengths=torch.tensor([8, 5]), attention_mask=mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_mass_fused_equals_reference(seed):
    ref, fused = _pair(MassModel, seed, num_decoder_layers=1)
    g = torch.Generator().manual_seed(seed)
    B, S = 5, 15
    ids = torch.randint(5, V, (B, S), generator=g)
    lengths = torch.tensor([15, 11, 4, 1, 0])
    enc, dec, labels, spans = mass_mask(ids, lengths=lengths, mask_token_id=4, vocab_size=V, seed=seed)
    _compare(ref, fused, enc, dec, labels, spans, lengths=lengths)


def test_bad_implementation_and_config():
    with pytest.raises(ValueError, match="implementation must be one of"):
        BertMLM(model_config("tiny"), implementation="flash")
    with pytest.raises(ValueError, match="size must be one of"):
        model_config("huge")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        model_config("tiny", hidden_size=65)


def test_from_hf_equals_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    from masklm_kernels.models import from_hf
    from masklm_kernels.models.hf import hf_name_to_ours

    torch.manual_seed(5)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = transformers.BertForMaskedLM(cfg).double().eval()
    hf.config._attn_implementation = "eager"
    ours = from_hf(hf, implementation="fused").eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, V, (3, 12), generator=g)
    lengths = torch.tensor([12, 7, 3])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    labels = torch.where((torch.rand(3, 12, generator=g) < 0.4) & (mask == 1), ids, -100)
    out_hf = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out_hf.loss.backward()
    out = ours(ids, labels, attention_mask=mask, return_logits=True)
    out["loss"].backward()
    assert_close(out["loss"], out_hf.loss, **F64, msg="loss")
    assert_close(out["logits"], out_hf.logits[labels != -100], **F64, msg="labelled-row logits")
    mine = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        target = hf_name_to_ours(name)
        if target is not None and p.grad is not None:
            assert_close(mine[target].grad, p.grad, **F64, msg=f"grad {name}")


def _mass_batch(seed, B=5, S=15):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, S), generator=g)
    lengths = torch.tensor([15, 11, 4, 1, 0])[:B]
    return (*mass_mask(ids, lengths=lengths, mask_token_id=4, vocab_size=V, seed=seed),), dict(lengths=lengths)


def _mlm_batch(seed, B=4, S=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, S), generator=g)
    labels = torch.where(torch.rand(B, S, generator=g) < 0.3, ids, -100)
    return (ids, labels), dict(lengths=torch.tensor([17, 9, 1, 0])[:B])


@pytest.mark.parametrize("kind", ["mlm", "mass"])
def test_attention_dropout_fused_equals_reference(kind):
    """With attention dropout on (train mode) the two implementations still compute the same function: the
    fused kernels and the plain-PyTorch attention draw the same keep masks from (seed, step, sample ids).
    A new step draws new masks; eval() turns dropout off."""
    cls, batch = (BertMLM, _mlm_batch) if kind == "mlm" else (MassModel, _mass_batch)
    extra = {} if kind == "mlm" else dict(num_decoder_layers=1)
    ref, fused = _pair(cls, 4, attention_probs_dropout_prob=0.3, **extra)
    args, kw = batch(4)
    keys = dict(dropout_seed=11, dropout_step=2, sample_ids=torch.tensor([40, 41, 42, 43, 44])[:args[0].shape[0]])
    outs = _compare(ref, fused, *args, **kw, **keys)
    other_step = fused(*args, **kw, **{**keys, "dropout_step": 3})["loss"]
    assert abs(float(other_step.detach()) - float(outs[1]["loss"].detach())) > 1e-6, "a new step draws new masks"
    ref_off, fused_off = _pair(cls, 4, attention_probs_dropout_prob=0.0, **extra)
    fused.eval()
    fused_off.load_state_dict(fused.state_dict())
    assert_close(fused(*args, **kw, **keys)["loss"], fused_off.eval()(*args, **kw)["loss"], **F64, msg="eval: off")


def test_attention_dropout_follows_torch_manual_seed_without_a_seed():
    ref, fused = _pair(BertMLM, 5, attention_probs_dropout_prob=0.3)
    args, kw = _mlm_batch(5)
    torch.manual_seed(9)
    a = fused(*args, **kw)["loss"]
    torch.manual_seed(9)
    b = fused(*args, **kw)["loss"]
    c = fused(*args, **kw)["loss"]
    assert float(a) == float(b) and float(a) != float(c)


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_bert_mlm_inference_without_labels_and_label_shape_errors(implementation):
    """Without labels the model returns (B, S, V) logits (fill-mask); the implementations agree on them, and the
    labelled rows' logits equal what a labelled call returns. Labels of the wrong shape are refused."""
    from masklm_kernels.models import BertMLM, model_config

    torch.manual_seed(0)
    model = BertMLM(model_config("tiny", vocab_size=60), implementation=implementation).double().eval()
    ids = torch.randint(5, 60, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    logits = model(ids, lengths=lengths)["logits"]
    assert logits.shape == (3, 9, 60) and not logits[1, 4:].any() and not logits[2, 1:].any()
    labels = torch.where(torch.arange(9) < lengths[:, None], ids, -100)
    out = model(ids, labels, lengths=lengths, return_logits=True)
    assert_close(out["logits"], logits[labels != -100], **F64, msg="labelled rows vs inference logits")
    other = BertMLM(model_config("tiny", vocab_size=60), implementation="reference").double().eval()
    other.load_state_dict(model.state_dict())
    assert_close(other(ids, lengths=lengths)["logits"], logits, **F64, msg="implementations agree")
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(3, 9\), got \(3, 8\)"):
        model(ids, labels[:, :8], lengths=lengths)


def test_bert_mlm_with_fewer_real_tokens_than_the_padded_length():
    """One row of 4 real tokens padded to 16: the packed layout's max_seqlen (16) exceeds the token count."""
    from masklm_kernels.models import BertMLM, model_config

    torch.manual_seed(1)
    cfg = model_config("tiny", vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fused = BertMLM(cfg).double()
    ref = BertMLM(cfg, implementation="reference").double()
    ref.load_state_dict(fused.state_dict())
    ids = torch.randint(5, 50, (1, 16))
    mask = (torch.arange(16) < 4).long()[None]
    labels = torch.where(mask == 1, ids, -100)
    assert_close(fused(ids, labels, attention_mask=mask)["loss"], ref(ids, labels, attention_mask=mask)["loss"],
                 **F64, msg="loss")
    assert fused(ids, attention_mask=mask)["logits"].shape == (1, 16, 50)
