"""`patch_model` / `patch_modernbert` on Hugging Face ModernBERT: the patched `ModernBertForMaskedLM` gives
the unpatched model's loss and gradients (float64: against a float64 cross-entropy over Hugging Face's own
logits, and within float32 of Hugging Face's loss, which it computes in float32), local layers on the
windowed varlen kernel and global ones unbounded, under gradient checkpointing (reentrant and not) and
with Trainer's `num_items_in_batch` (honoured, as by ModernBERT's loss); a patched `ModernBertModel`;
the output contract (hidden states, attention probabilities, sparse-prediction logits, return_dict=False);
attention dropout in train() only; autocast; refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from masklm_kernels.integrations.huggingface import patch_model, patch_modernbert, unpatch  # noqa: E402

from test_integrations_hf import (  # noqa: E402
    assert_bf16_autocast_follows_the_unpatched_model,
    enable_counted_checkpointing,
)

V, B, S, H, LAYERS = 101, 4, 16, 64, 4
WINDOW = 4  # local_attention 8: |i - j| <= 4 on local layers, narrower than the rows
WINDOWS = [(-1, -1), (WINDOW, WINDOW)] * (LAYERS // 2)  # layer 0 global, then every other
F64 = dict(atol=1e-12, rtol=1e-8)


def make_config(**kw):
    cfg = dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=96,
               local_attention=2 * WINDOW, global_attn_every_n_layers=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
               attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0)
    return transformers.ModernBertConfig(**{**cfg, **kw})


def make_model(*, cls=None, seed: int = 11, **kw):
    """A tiny ModernBERT (4 layers, H 64, local window 8 on every other layer) in float64 on SDPA (eager
    attention gives NaN in float64 with padding)."""
    torch.manual_seed(seed)
    model = (cls or transformers.ModernBertForMaskedLM)(make_config(**kw))
    model.config._attn_implementation = "sdpa"
    return model.double().train()


def make_batch(seed: int, lengths=(16, 11, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.where(mask == 1, torch.randint(5, V, (B, S), generator=g), 0)
    labels = torch.where((torch.rand(B, S, generator=g) < 0.3) & (mask == 1), ids, -100)
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, ids, mask, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    return out, _grads(model)


def _oracle(model, ids, mask, labels, num_items=None):
    """Hugging Face's forward without labels (its logits), then the masked-LM loss in float64."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = labels != -100
    loss = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    loss = loss / (keep.sum() if num_items is None else num_items)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same_grads(grads, ref, what: str, tol=F64):
    assert grads.keys() == ref.keys(), what
    for name, g in grads.items():
        assert_close(g, ref[name], **tol, msg=f"{what}: grad {name}")


@pytest.fixture
def windows(monkeypatch):
    """The window_size of every padded / packed attention call of the patched model, in order."""
    import masklm_kernels.attention as attention

    calls = {"padded": [], "packed": []}
    for name, key in (("fused_attention", "padded"), ("fused_attention_varlen", "packed")):
        def spy(*a, _f=getattr(attention, name), _k=key, **k):
            calls[_k].append(tuple(k.get("window_size", (-1, -1))))
            return _f(*a, **k)
        monkeypatch.setattr(attention, name, spy)
    return calls


def test_patched_equals_unpatched(windows):
    model = make_model()
    ids, mask, labels = make_batch(1)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    want, grads_ref = _oracle(model, ids, mask, labels)
    assert patch_modernbert(model) is model
    out, grads = _loss_and_grads(model, ids, mask, labels)
    assert windows == {"padded": [], "packed": WINDOWS}  # unpadded; local layers windowed, global ones not
    assert out.logits is None  # training: no (tokens, vocab) logits are made
    assert_close(out.loss, want, atol=0, rtol=1e-10, msg="loss against the float64 oracle")
    assert_close(out.loss, ref.loss, atol=0, rtol=1e-6, msg="loss against Hugging Face's (float32) loss")
    _assert_same_grads(grads, grads_ref, "ModernBERT")
    # without labels the model's own head runs, over the fused attention
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert_close(logits[mask == 1], ref.logits[mask == 1], atol=1e-10, rtol=1e-9, msg="logits without labels")
    # Trainer's num_items_in_batch: ModernBERT's loss divides the labelled sum by it, and so does the patch
    n = torch.tensor(37)
    unpatch(model)
    ref_n = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    want_n, grads_n_ref = _oracle(model, ids, mask, labels, num_items=n)
    assert_close(ref_n, want_n, atol=0, rtol=1e-6, msg="the oracle divides as Hugging Face does")
    patch_model(model)
    out_n, grads_n = _loss_and_grads(model, ids, mask, labels, num_items_in_batch=n)
    assert_close(out_n.loss, want_n, atol=0, rtol=1e-10, msg="loss with num_items_in_batch")
    _assert_same_grads(grads_n, grads_n_ref, "ModernBERT, num_items_in_batch")
    assert unpatch(model) is model
    leftover = [k for m in model.modules() for k in vars(m) if k.startswith("_masklm_") or k == "forward"]
    assert leftover == ["_masklm_kernels_patch"] and model._masklm_kernels_patch is None, leftover
    again = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert again.logits is not None
    assert_close(again.loss, ref.loss, atol=0, rtol=0, msg="unpatched again")


def test_the_window_is_the_models_own():
    """A wider window (local_attention 12) and global attention every third layer reach the kernels as
    the model's config says; inputs_embeds and explicit position_ids (shifted) are unpadded alike."""
    model = make_model(local_attention=12, global_attn_every_n_layers=3)
    ids, mask, labels = make_batch(2, lengths=(9, 16, 3, 12))
    embeds = model.model.embeddings.tok_embeddings(ids).detach()
    pos = torch.arange(S)[None].expand(B, S) + 3
    ref = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits
    patch_model(model)
    from masklm_kernels import attention

    seen = []
    original = attention.fused_attention_varlen

    def spy(*a, **k):
        seen.append(k["window_size"])
        return original(*a, **k)

    attention.fused_attention_varlen = spy
    try:
        out = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits
    finally:
        attention.fused_attention_varlen = original
    assert seen == [(-1, -1), (6, 6), (6, 6), (-1, -1)]
    assert_close(out[mask == 1], ref[mask == 1], atol=1e-10, rtol=1e-9, msg="logits (embeds, position ids)")


def test_a_patched_encoder_alone():
    """`ModernBertModel` (no head): the forward unpads, runs the layers packed and pads back (zeros at
    padding), equal to the unpatched encoder at real tokens; without an attention mask it runs padded."""
    model = make_model(cls=transformers.ModernBertModel)
    ids, mask, _ = make_batch(3)
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref_full = model(input_ids=ids).last_hidden_state
    patch_model(model)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (B, S, H)
    assert_close(out.last_hidden_state[mask == 1], ref[mask == 1], atol=1e-10, rtol=1e-9, msg="encoder output")
    assert not out.last_hidden_state[mask == 0].any()
    hidden, = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert_close(hidden, out.last_hidden_state, atol=0, rtol=0, msg="return_dict=False")
    assert_close(model(input_ids=ids).last_hidden_state, ref_full, atol=1e-10, rtol=1e-9, msg="no mask")
    unpatch(model)
    assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref, atol=0, rtol=0, msg="unpatched")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_unpatched_gradients(reentrant):
    model = make_model()
    ids, mask, labels = make_batch(4)
    want, grads_ref = _oracle(model, ids, mask, labels)
    checkpointed = enable_counted_checkpointing(model, reentrant)
    patch_model(model)
    out, grads = _loss_and_grads(model, ids, mask, labels)
    assert checkpointed == [LAYERS], "the layers did not run checkpointed"
    assert_close(out.loss, want, atol=0, rtol=1e-10, msg="loss")
    _assert_same_grads(grads, grads_ref, f"checkpointed ({'reentrant' if reentrant else 'non-reentrant'})")


def test_output_contract(windows):
    model = make_model()
    ids, mask, labels = make_batch(5)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    model.eval()
    ref_eval = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.train()
    patch_model(model)
    # per-layer outputs: the encoder runs padded, Hugging Face's shapes
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert windows == {"padded": WINDOWS, "packed": []}
    assert_close(out.loss, ref.loss, atol=0, rtol=1e-6, msg="loss, padded encoder")
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for got, want in zip(out.hidden_states, ref.hidden_states):
        assert got.shape == want.shape == (B, S, H)
        assert_close(got[mask == 1], want[mask == 1], atol=1e-10, rtol=1e-9, msg="hidden states")
    loss, logits, hidden = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False,
                                 output_hidden_states=True)
    assert logits is None and len(hidden) == LAYERS + 1
    # eval mode: (B, S, V) logits as unpatched
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref_eval.loss, atol=0, rtol=1e-6, msg="eval loss")
    assert out.logits.shape == (B, S, V)
    assert_close(out.logits[mask == 1], ref_eval.logits[mask == 1], atol=1e-10, rtol=1e-9, msg="eval logits")
    # sparse_prediction: Hugging Face returns the labelled rows' logits only, and so does the patch in eval
    unpatch(model)
    model.config.sparse_prediction = model.sparse_prediction = True
    sparse = model(input_ids=ids, attention_mask=mask, labels=labels)
    patch_model(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == sparse.logits.shape == (int((labels != -100).sum()), V)
    assert_close(out.logits, sparse.logits, atol=1e-10, rtol=1e-9, msg="sparse logits")


def test_attention_probabilities_match_eager_attention():
    """output_attentions: the library's specification (0 on padding keys and outside local windows),
    Hugging Face's eager attention in float32 (which computes its softmax in float32 anyway)."""
    model = make_model().float()
    model.config._attn_implementation = "eager"
    ids, mask, labels = make_batch(6)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    patch_model(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == LAYERS
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    for layer, (got, want) in enumerate(zip(out.attentions, ref.attentions)):
        assert got.shape == want.shape == (B, 4, S, S)
        real = (mask[:, None, :, None] * mask[:, None, None, :]).expand_as(got) == 1
        assert_close(got[real], want[real], atol=2e-6, rtol=1e-4, msg=f"attention probabilities, layer {layer}")
        visible = (mask[:, None, None, :] == 1) & ((i - j).abs() <= (WINDOW if layer % 2 else S))
        assert not got[~visible.expand_as(got)].any(), f"probability outside the window / on padding, layer {layer}"


def test_attention_dropout_is_applied_in_training_only():
    unpatched = make_model(attention_dropout=0.1)
    model = patch_model(copy.deepcopy(unpatched))
    ids, mask, labels = make_batch(7)
    torch.manual_seed(3)
    first = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    torch.manual_seed(3)
    with torch.no_grad():
        assert float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) == float(first)
        assert float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) != float(first)
    model.eval()
    unpatched.eval()
    assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                 unpatched(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=0, rtol=1e-6, msg="eval loss")


def test_autocast_bf16_follows_the_unpatched_model():
    assert_bf16_autocast_follows_the_unpatched_model(make_model().float(), *make_batch(8))


def test_refusals():
    model = patch_model(make_model())
    ids, mask, labels = make_batch(9)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=mask.flip(1), labels=labels)
    with pytest.raises(ValueError, match="mapping of prepared masks"):
        model.model(input_ids=ids, attention_mask={"full_attention": None, "sliding_attention": None})
    cu = torch.tensor([0, 16, 27], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed inputs .*cu_seq_lens_q.* are not supported"):
        model(input_ids=ids, labels=labels, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(4, 16\), got \(4, 15\)"):
        model(input_ids=ids, attention_mask=mask, labels=labels[:, :-1])
