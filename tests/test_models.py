"""Reference models (masklm_kernels.models): the "fused" implementation (the library's kernels: varlen attention,
metadata masks, the fused LM head over labelled rows) computes the same loss, labelled-row logits and
parameter gradients as the "reference" implementation (plain PyTorch, dense masks, full logits), in float64."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import mass_mask
from masklm_kernels.models import BertMLM, MassModel, Seq2SeqModel, model_config

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


# ModernBERT- and MosaicBERT-style encoders: RoPE with a global and a local base, sliding-window local
# layers with a global layer every N, ALiBi
STYLES = {
    "modern": dict(position_embedding_type="rope", rope_theta=160000.0, local_rope_theta=10000.0, sliding_window=3,
                   global_attn_every_n_layers=2, num_hidden_layers=3),
    "mosaic": dict(position_embedding_type="alibi", hidden_size=48, num_attention_heads=3),  # 3 heads: not 2^k
    "mosaic_local": dict(position_embedding_type="alibi", sliding_window=5, global_attn_every_n_layers=3,
                         num_hidden_layers=3),
}


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("style", list(STYLES))
def test_mlm_styles_fused_equals_reference(style, dropout, monkeypatch):
    ref, fused = _pair(BertMLM, 6, attention_probs_dropout_prob=dropout, **STYLES[style])
    assert fused.bert.embeddings.position_embeddings is None  # positions act in attention instead
    import masklm_kernels.attention as attention

    windows, original = [], attention.fused_attention_varlen

    def spy(*a, **k):
        windows.append(k["window_size"])
        return original(*a, **k)

    monkeypatch.setattr(attention, "fused_attention_varlen", spy)
    args, kw = _mlm_batch(6)
    _compare(ref, fused, *args, **kw, dropout_seed=3, sample_ids=torch.arange(4))
    w = STYLES[style].get("sliding_window", -1)
    n = STYLES[style].get("global_attn_every_n_layers", 1)
    assert windows == [(w, w) if w >= 0 and i % n else (-1, -1) for i in range(len(fused.bert.layer))]


def test_windows_rope_and_alibi_change_the_function():
    """Each option is live: the same weights give another loss without it."""
    args, kw = _mlm_batch(7)
    base = dict(position_embedding_type="rope", sliding_window=2, global_attn_every_n_layers=2, num_hidden_layers=2)
    losses = {}
    for name, change in {"modern": {}, "no_window": dict(sliding_window=-1), "other_base": dict(rope_theta=50.0),
                         "alibi": dict(position_embedding_type="alibi")}.items():
        ref, _ = _pair(BertMLM, 7, **{**base, **change})
        losses[name] = float(ref(*args, **kw)["loss"])
    assert len(set(losses.values())) == len(losses), losses


def test_rotary_embedding_is_relative_and_matches_hugging_face():
    from masklm_kernels.models.layers import apply_rotary, rotary_tables

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 16, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, 16, generator=g,
                                                                                   dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 7, 30], [4, 4, 9, 2, 11]])
    scores = {}
    for shift in (0, 100):
        cos, sin = rotary_tables(pos + shift, 16, 10000.0, torch.float64)
        scores[shift] = torch.einsum("bihd,bjhd->bhij", apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))
    assert_close(scores[100], scores[0], atol=1e-9, rtol=1e-9, msg="q.k depends on relative positions only")
    transformers = pytest.importorskip("transformers")
    from transformers.models.modernbert import modeling_modernbert as hf

    cfg = transformers.ModernBertConfig(hidden_size=48, num_attention_heads=3, global_rope_theta=160000.0)
    rope = hf.ModernBertRotaryEmbedding(cfg)
    q32, k32 = q.float(), k.float()
    for layer_type, theta in (("full_attention", 160000.0), ("sliding_attention", 10000.0)):
        hf_cos, hf_sin = rope(q32, pos, layer_type)
        cos, sin = rotary_tables(pos, 16, theta, torch.float32)
        assert_close(cos, hf_cos, atol=2e-6, rtol=0, msg=f"cos {layer_type}")
        want_q, want_k = hf.apply_rotary_pos_emb(q32, k32, hf_cos, hf_sin, unsqueeze_dim=2)
        assert_close(apply_rotary(q32, cos, sin), want_q, atol=1e-5, rtol=0, msg=f"rotated q {layer_type}")
        assert_close(apply_rotary(k32, cos, sin), want_k, atol=1e-5, rtol=0, msg=f"rotated k {layer_type}")


def test_alibi_slopes_are_press_et_al():
    from masklm_kernels.models.layers import alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0 ** -h for h in range(1, 9)]
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence (2^-0.5, 2^-1.5, ...)
    want = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -(h + 0.5) for h in range(4)]
    assert_close(alibi_slopes(12), torch.tensor(want), atol=0, rtol=1e-7, msg="12 heads")
    assert alibi_slopes(1).tolist() == [2.0 ** -8]


def test_style_sizes_and_config_errors():
    cfg = model_config("modern-small")
    assert (cfg.position_embedding_type, cfg.sliding_window, cfg.global_attn_every_n_layers) == ("rope", 64, 3)
    assert [cfg.layer_window(i) for i in range(4)] == [-1, 64, 64, -1]
    assert [cfg.layer_rope_theta(i) for i in range(4)] == [160000.0, 10000.0, 10000.0, 160000.0]
    assert model_config("mosaic-base").position_embedding_type == "alibi"
    for bad, match in ((dict(position_embedding_type="absolute"), "position_embedding_type must be one of"),
                       (dict(sliding_window=-2), "sliding_window must be an int >= -1"),
                       (dict(sliding_window=True), "sliding_window must be an int"),
                       (dict(global_attn_every_n_layers=0), "global_attn_every_n_layers must be an int >= 1"),
                       (dict(rope_theta=1.0), "rope_theta must be > 1"),
                       (dict(position_embedding_type="rope", hidden_size=66, num_attention_heads=2), "even head_dim")):
        with pytest.raises(ValueError, match=match):
            model_config("tiny", **bad)
    with pytest.raises(ValueError, match="MassModel: BERT's learned positions only"):
        MassModel(model_config("modern-tiny"))


def test_token_losses_for_adaptive_masking():
    """return_token_losses: the labelled rows' ids and losses (detached), the same in both implementations,
    whose mean is the loss (with the same gradients as without the option)."""
    ref, fused = _pair(BertMLM, 8)
    args, kw = _mlm_batch(8)
    outs = [m(*args, **kw, return_token_losses=True) for m in (ref, fused)]
    keep = args[1][torch.arange(args[1].shape[1]) < kw["lengths"][:, None]]
    assert torch.equal(outs[0]["labelled"], keep[keep != -100])
    assert torch.equal(outs[1]["labelled"], outs[0]["labelled"])
    assert_close(outs[1]["token_losses"], outs[0]["token_losses"], **F64, msg="token losses")
    assert not outs[1]["token_losses"].requires_grad
    for out in outs:
        assert_close(out["loss"], out["token_losses"].mean(), **F64, msg="mean of the token losses")
    plain = fused(*args, **kw)["loss"]
    assert_close(outs[1]["loss"], plain, **F64, msg="the loss with and without the option")


def _t5_batch(seed, B=5, S=19):
    from masklm_kernels import t5_span_corruption

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V - 20, (B, S), generator=g)
    t5 = t5_span_corruption(ids, vocab_size=V, sentinel_start_id=V - 1, eos_token_id=3,
                            lengths=torch.tensor([19, 12, 2, 1, 0])[:B], noise_density=0.3, seed=seed)
    return (t5.input_ids, t5.decoder_input_ids, t5.labels), dict(input_lengths=t5.input_lengths,
                                                                  label_lengths=t5.label_lengths)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_seq2seq_fused_equals_reference(dropout):
    """T5 span corruption's outputs through the encoder-decoder: padded encoder rows, a causal decoder of
    its own lengths, cross-attention to the encoder's real tokens; fused = reference, with and without
    attention dropout."""
    ref, fused = _pair(Seq2SeqModel, 9, attention_probs_dropout_prob=dropout, num_decoder_layers=1)
    args, kw = _t5_batch(9)
    keys = dict(dropout_seed=4, dropout_step=1, sample_ids=torch.arange(5))
    _compare(ref, fused, *args, **kw, **keys)
    assert float(fused(*args, **kw, **keys)["loss"]) > 0
    with pytest.raises(ValueError, match="Seq2SeqModel: BERT's learned positions only"):
        Seq2SeqModel(model_config("mosaic-tiny"))
