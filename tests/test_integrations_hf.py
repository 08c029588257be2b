"""`masklm_kernels.integrations.huggingface.patch_model`: every supported Hugging Face masked LM, patched,
gives the unpatched model's loss and gradients (dropout off, float64), also under gradient checkpointing
(reentrant and not) and with Trainer's `num_items_in_batch` (ignored, as unpatched); Hugging Face's output contract
(`return_dict=False`, hidden states, attention probabilities, logits for evaluation); unpatch restores
the model; bad inputs and unsupported models are refused. Trainer runs end to end: test_integrations_trainer.py."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from masklm_kernels.integrations.huggingface import SUPPORTED, patch_bert, patch_model, unpatch  # noqa: E402

V, B, S = 101, 4, 16
KINDS = ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"]
F64 = dict(atol=1e-12, rtol=1e-8)


def make_model(kind: str, *, dropout: float = 0.0, seed: int = 11):
    """A tiny masked LM of `kind` (2 layers, H 64, 4 heads), eager attention, dropout `dropout`."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, max_position_embeddings=64)
    bert = dict(common, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    t = transformers
    model = {
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(**bert)),
        "roberta": lambda: t.RobertaForMaskedLM(t.RobertaConfig(pad_token_id=1, **bert)),
        "xlm-roberta": lambda: t.XLMRobertaForMaskedLM(t.XLMRobertaConfig(pad_token_id=1, **bert)),
        "camembert": lambda: t.CamembertForMaskedLM(t.CamembertConfig(pad_token_id=1, **bert)),
        # embedding_size != hidden_size: the embeddings_project layer runs before the encoder
        "electra": lambda: t.ElectraForMaskedLM(t.ElectraConfig(embedding_size=32, **bert)),
        "distilbert": lambda: t.DistilBertForMaskedLM(t.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, dropout=dropout, attention_dropout=dropout, **common)),
    }[kind]()
    model.config._attn_implementation = "eager"
    return model.double().train()


def make_batch(seed: int, pad_id: int, lengths=(16, 11, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.where(mask == 1, torch.randint(5, V, (B, S), generator=g), pad_id)
    labels = torch.where((torch.rand(B, S, generator=g) < 0.3) & (mask == 1), ids, -100)
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(grads, ref, what: str, tol=F64):
    assert grads.keys() == ref.keys(), what
    for name, g in grads.items():
        assert_close(g, ref[name], **tol, msg=f"{what}: grad {name}")


def enable_counted_checkpointing(model, reentrant: bool) -> list[int]:
    """Turns on Hugging Face's gradient checkpointing; returns [number of checkpointed layer calls so far]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    count = [0]
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False):
            def counting(*a, _f=layer._gradient_checkpointing_func, **k):
                count[0] += 1
                return _f(*a, **k)
            layer._gradient_checkpointing_func = counting
    return count


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


@pytest.mark.parametrize("kind", KINDS)
def test_patched_equals_unpatched(kind, attention_calls):
    model = make_model(kind)
    ids, mask, labels = make_batch(1, model.config.pad_token_id)
    ref, grads_ref = _loss_and_grads(model, ids, mask, labels)
    assert patch_model(model) is model and type(model).__name__ in SUPPORTED
    out, grads = _loss_and_grads(model, ids, mask, labels)
    assert attention_calls == {"padded": 0, "packed": 2}  # the encoder ran unpadded, one call per layer
    assert out.logits is None  # training: no (tokens, vocab) logits are made
    assert_close(out.loss, ref.loss, atol=0, rtol=1e-10, msg="loss")
    _assert_same_grads(grads, grads_ref, kind)
    # without labels the model's own head runs, over the fused attention
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert_close(logits[mask == 1], ref.logits[mask == 1], atol=1e-10, rtol=1e-9, msg="logits without labels")
    # Trainer's num_items_in_batch: ignored, as by these models' own loss (gradient accumulation as unpatched)
    unpatch(model)
    n = torch.tensor(37)
    ref_n, grads_ref_n = _loss_and_grads(model, ids, mask, labels, num_items_in_batch=n)
    patch_model(model)
    out_n, grads_n = _loss_and_grads(model, ids, mask, labels, num_items_in_batch=n)
    assert_close(out_n.loss, ref_n.loss, atol=0, rtol=1e-10, msg="loss with num_items_in_batch")
    _assert_same_grads(grads_n, grads_ref_n, f"{kind}, num_items_in_batch")
    assert unpatch(model) is model
    again, _ = _loss_and_grads(model, ids, mask, labels)
    assert again.logits is not None
    assert_close(again.loss, ref.loss, atol=0, rtol=0, msg="unpatched again")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_gradient_checkpointing_gives_the_unpatched_gradients(kind, reentrant):
    """The recomputation in the backward must attend per sequence as the forward did (the layout is an
    argument of every layer call, so checkpointing saves and replays it)."""
    model = make_model(kind)
    ids, mask, labels = make_batch(2, model.config.pad_token_id)
    ref, grads_ref = _loss_and_grads(model, ids, mask, labels)
    checkpointed = enable_counted_checkpointing(model, reentrant)
    patch_model(model)
    out, grads = _loss_and_grads(model, ids, mask, labels)
    assert checkpointed == [2], "the layers did not run checkpointed"
    assert_close(out.loss, ref.loss, atol=0, rtol=1e-10, msg="loss")
    _assert_same_grads(grads, grads_ref, f"{kind} checkpointed ({'reentrant' if reentrant else 'non-reentrant'})")


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_output_contract(kind, attention_calls):
    model = make_model(kind)
    ids, mask, labels = make_batch(3, model.config.pad_token_id)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True,
                output_attentions=True)
    model.eval()
    ref_eval = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.train()
    patch_model(model)
    # per-layer outputs: the encoder runs padded (HF's shapes); attention probabilities from the specification
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
    assert attention_calls == {"padded": 2, "packed": 0}
    assert_close(out.loss, ref.loss, atol=0, rtol=1e-10, msg="loss, padded encoder")
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for got, want in zip(out.hidden_states, ref.hidden_states):
        assert got.shape == want.shape == (B, S, 64)
        assert_close(got[mask == 1], want[mask == 1], atol=1e-10, rtol=1e-9, msg="hidden states")
    assert len(out.attentions) == 2, "attention probabilities missing"
    for got, want in zip(out.attentions, ref.attentions):
        assert got.shape == want.shape == (B, 4, S, S)
        keys = mask[:, None, None, :].expand_as(got) == 1
        assert_close(got[keys], want[keys], atol=1e-12, rtol=1e-9, msg="attention probabilities")
        assert not got[~keys].any(), "probability on a padding key"
    # return_dict=False: (loss, logits, ...) in Hugging Face's positions, logits None in training
    loss, logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert logits is None and loss.dim() == 0
    loss, logits, hidden = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False,
                                 output_hidden_states=True)
    assert len(hidden) == 3
    # eval mode (Trainer.evaluate): (B, S, V) logits as unpatched, for compute_metrics
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref_eval.loss, atol=0, rtol=1e-10, msg="eval loss")
    assert_close(out.logits[mask == 1], ref_eval.logits[mask == 1], atol=1e-10, rtol=1e-9, msg="eval logits")
    loss, logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert logits.shape == (B, S, V)
    # logits="labelled": the labelled positions only, in the order of labels[labels != -100]
    unpatch(model)
    patch_model(model, logits="labelled")
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (int((labels != -100).sum()), V) and not out.logits.requires_grad
    assert_close(out.logits, ref_eval.logits[labels != -100], atol=1e-10, rtol=1e-9, msg="labelled logits")
    unpatch(model)
    assert patch_model(model, logits="never")(input_ids=ids, attention_mask=mask, labels=labels).logits is None


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_attention_dropout_is_applied_in_training_only(kind, monkeypatch):
    """The config's attention dropout reaches the fused kernels in train() (each layer a seed of its own
    from torch's generator: torch.manual_seed reproduces a step) and is off in eval(), where the patched
    model equals the unpatched one."""
    from masklm_kernels import attention

    unpatched = make_model(kind, dropout=0.1)
    model = patch_model(copy.deepcopy(unpatched))
    ids, mask, labels = make_batch(4, 0)
    seen = []
    original = attention.api.fused_attention_varlen

    def spy(*a, **kw):
        seen.append(kw.get("dropout_p"))
        return original(*a, **kw)

    monkeypatch.setattr(attention.api, "fused_attention_varlen", spy)
    monkeypatch.setattr(attention, "fused_attention_varlen", spy)
    torch.manual_seed(3)
    first = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert seen == [0.1, 0.1], f"dropout_p per layer in train(): {seen}"
    torch.manual_seed(3)
    assert float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) == float(first)
    assert float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) != float(first)
    seen.clear()
    model.eval()
    unpatched.eval()
    out = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert seen == [0.0, 0.0]
    assert_close(out, unpatched(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=1e-10, rtol=1e-9,
                 msg="eval loss")


def test_patch_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="supports BertForMaskedLM, .*DistilBertForMaskedLM, .*ModernBertModel; "
                                        "got Linear"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got BertModel"):
        patch_model(transformers.BertModel(transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=1,
                                                                   num_attention_heads=4, intermediate_size=64)))
    with pytest.raises(ValueError, match="logits must be one of"):
        patch_model(make_model("bert"), logits="all")
    decoder = make_model("bert")
    decoder.config.is_decoder = True
    with pytest.raises(ValueError, match="decoder"):
        patch_model(decoder)
    model = patch_bert(make_model("bert"))  # the first name of patch_model
    ids, mask, labels = make_batch(2, 0)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=mask.flip(1), labels=labels)
    with pytest.raises(ValueError, match="2-D|padding mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :], labels=labels)


def test_autocast_bf16_follows_the_unpatched_model():
    assert_bf16_autocast_follows_the_unpatched_model(make_model("roberta").float(), *make_batch(5, 1))


def assert_bf16_autocast_follows_the_unpatched_model(model, ids, mask, labels) -> None:
    """Under bf16 autocast the patched model's loss is fp32 and within 2% of the unpatched one's, and its
    gradients are fp32, pointing the way the unpatched model's do (cosine > 0.97)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, grads_ref = _loss_and_grads(model, ids, mask, labels)
        patch_model(model)
        out, grads = _loss_and_grads(model, ids, mask, labels)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, atol=0, rtol=2e-2, msg="bf16 loss")
    for name, g in grads.items():
        if grads_ref[name].norm() < 1e-5:  # e.g. a key bias: zero in exact arithmetic (softmax is shift-invariant)
            assert g.norm() < 1e-5
            continue
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads_ref[name].flatten(), dim=0)
        assert g.dtype == torch.float32 and cos > 0.97, f"grad {name}: cosine {float(cos):.3f}"


def test_deepcopy_save_load_and_compile_keep_the_patch(tmp_path, attention_calls):
    """A deepcopy of a patched model is patched (its own forward, bound to the copy); save_pretrained /
    from_pretrained round-trips the weights (the patch is not saved: a loaded model is patched again);
    torch.compile(model) gives the eager loss."""
    import copy

    model = patch_model(make_model("bert"))
    ids, mask, labels = make_batch(6, 0)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    attention_calls["packed"] = 0
    assert_close(twin(input_ids=ids, attention_mask=mask, labels=labels).loss, want, atol=0, rtol=0, msg="deepcopy")
    assert attention_calls["packed"] == 2
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").double().train()
    assert_close(patch_model(loaded)(input_ids=ids, attention_mask=mask, labels=labels).loss, want, atol=0,
                 rtol=1e-12, msg="saved and loaded")
    compiled = torch.compile(model, backend="aot_eager")
    assert_close(compiled(input_ids=ids, attention_mask=mask, labels=labels).loss, want, atol=0, rtol=1e-12,
                 msg="compiled")


def test_fewer_real_tokens_than_the_padded_length(attention_calls):
    """Padding to a fixed length (or one short row) leaves fewer real tokens than S: still packed, still
    the unpatched model's loss."""
    model = make_model("bert")
    ids, mask, labels = make_batch(7, 0, lengths=(5, 3, 2, 1))  # 11 real tokens, S = 16
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = patch_model(model)(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert attention_calls["packed"] == 2
    assert_close(out, ref, atol=0, rtol=1e-10, msg="loss with 11 real tokens in rows of 16")
    one = model(input_ids=ids[3:], attention_mask=mask[3:], labels=torch.where(mask[3:] == 1, ids[3:], -100))
    assert torch.isfinite(one.loss)


def test_patched_model_refuses_mismatched_labels_and_packed_batches():
    model = patch_model(make_model("bert"))
    ids, mask, labels = make_batch(8, 0)
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(4, 16\), got \(4, 15\)"):
        model(input_ids=ids, attention_mask=mask, labels=labels[:, :-1])
    cu = torch.tensor([0, 16, 27], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed inputs .*cu_seq_lens_q.* are not supported"):
        model(input_ids=ids, labels=labels, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
