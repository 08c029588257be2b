"""Suite `e2e`: one masked-LM training step (forward, backward, AdamW step) on the same batches.

* `hf_patched` vs `hf_unpatched`: a Hugging Face BertForMaskedLM (its default attention, SDPA) patched in
  place with `patch_model` (encoder unpadded once, varlen fused attention, fused LM head over labelled rows)
  against the same model unpatched;
* `fused` vs `reference`: the library's BertMLM (unpadded once, varlen attention, fused head) against its
  plain-PyTorch backend (dense mask, full logits), the same weights.
Batches: right padding with lengths uniform in [S/2, S] (25% padding on average), 15% of the real tokens
masked with `mask_tokens`. CPU: L4 / H256 / V30522, B16, S128, fp32 (a BERT-mini-sized step that a
2-core machine times in seconds). CUDA: BERT-base (L12 / H768), B8, S512, bf16 weights. Smoke: L1 / H32 /
V1000, B2, S32, fp32. Dropout off, and for the Hugging Face pair also BERT's own 0.1 (hidden and
attention-probability dropout; case "dropout": 0.1): the patched model applies the attention dropout inside
its fused kernels, the unpatched one in SDPA (its math path on CPU).

* `hf_patched` vs `hf_unpatched` on Hugging Face ModernBertForMaskedLM (model "modernbert-..."): local
  sliding-window layers (local_attention 128) and a global layer every third, RoPE, V 50368; unpatched it
  runs SDPA over the padded batch with the dense banded masks and full logits, patched the windowed varlen
  kernels over real tokens and the fused head over labelled rows. CPU: L4 / H256 / 4 heads / GLU 384, B8,
  S1024, fp32. CUDA: ModernBERT-base (L22 / H768 / 12 heads / GLU 1152), B8, S1024, bf16. Smoke: L3 / H32,
  local 8, B2, S32. Dropout off.
"""
from __future__ import annotations

import copy
import functools
import importlib.util

import torch

from ..harness import Case

DATA_SEED = 4242


def _batch(B: int, S: int, V: int, device: str):
    from masklm_kernels import mask_tokens

    g = torch.Generator().manual_seed(DATA_SEED)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.where(mask == 1, torch.randint(5, V, (B, S), generator=g), 0)
    masked, labels = mask_tokens(ids, mask_token_id=4, vocab_size=V, lengths=lengths, special_token_ids=[0])
    return masked.to(device), labels.to(device), mask.to(device), lengths.to(device)


def _step(model, opt, call):
    loss = call(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def cases(device: str, size: str) -> list[Case]:
    from masklm_kernels.models import BertMLM, from_hf

    V = 30522
    if size == "smoke":
        L, H, heads, inter, B, S, dtype, V = 1, 32, 2, 64, 2, 32, torch.float32, 1000
    elif device == "cuda":
        L, H, heads, inter, B, S, dtype = 12, 768, 12, 3072, 8, 512, torch.bfloat16
    else:
        L, H, heads, inter, B, S, dtype = 4, 256, 4, 1024, 16, 128, torch.float32
    case = {"model": f"L{L}-H{H}", "B": B, "S": S, "V": V, "padding": 0.25, "masked": 0.15, "mode": "train_step"}
    ids, labels, mask, lengths = _batch(B, S, V, device)
    tokens = int(mask.sum())
    out: list[Case] = []
    have_hf = importlib.util.find_spec("transformers") is not None
    reason = None if have_hf else "transformers is not installed (pip install transformers)"
    hf_model = None
    for dropout in (0.0, 0.1):
        hf_case = case if dropout == 0 else {**case, "dropout": dropout}
        if have_hf:
            import transformers

            torch.manual_seed(0)
            cfg = transformers.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=heads,
                                          intermediate_size=inter, max_position_embeddings=max(512, S),
                                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
            model = transformers.BertForMaskedLM(cfg).to(device, dtype).train()
            if hf_model is None:
                hf_model = model  # the dropout-free one: the library's own models below start from its weights
        out += _hf_pair(model if have_hf else None, hf_case, (ids, mask, labels), device, reason)
    if hf_model is not None:
        ref = from_hf(hf_model, implementation="reference")
    else:
        from masklm_kernels.models import model_config

        ref = BertMLM(model_config("base", hidden_size=H, num_hidden_layers=L, num_attention_heads=heads,
                                   intermediate_size=inter, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                      implementation="reference")
        ref = ref.to(device, dtype)
    for name in ("reference", "fused"):
        m = copy.deepcopy(ref)
        m.implementation = name
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
        fn = functools.partial(_step, m, opt, lambda mod: mod(ids, labels, lengths=lengths)["loss"])
        peers = {"reference": ("e2e_train_step", "reference", case)} if name == "fused" else {}
        if name == "fused" and hf_model is not None:
            peers["hf_unpatched"] = ("e2e_train_step", "hf_unpatched", case)
        out.append(Case("e2e_train_step", name, case, fn=fn, device=device, tokens=tokens, peers=peers))
    return out + _modernbert_cases(device, size, have_hf)


def _modernbert_cases(device: str, size: str, have_hf: bool) -> list[Case]:
    V = 50368
    if size == "smoke":
        L, H, heads, inter, local, B, S, dtype, V = 3, 32, 2, 48, 8, 2, 32, torch.float32, 1000
    elif device == "cuda":
        L, H, heads, inter, local, B, S, dtype = 22, 768, 12, 1152, 128, 8, 1024, torch.bfloat16
    else:
        L, H, heads, inter, local, B, S, dtype = 4, 256, 4, 384, 128, 8, 1024, torch.float32
    case = {"model": f"modernbert-L{L}-H{H}", "B": B, "S": S, "V": V, "local": local, "global_every": 3,
            "padding": 0.25, "masked": 0.15, "mode": "train_step"}
    ids, labels, mask, _ = _batch(B, S, V, device)
    reason = None if have_hf else "transformers is not installed (pip install transformers)"
    model = None
    if have_hf:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.ModernBertConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=heads, intermediate_size=inter,
            local_attention=local, global_attn_every_n_layers=3, max_position_embeddings=max(S, 8192),
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            attn_implementation="sdpa")
        model = transformers.ModernBertForMaskedLM(cfg).to(device, dtype).train()
    return _hf_pair(model, case, (ids, mask, labels), device, reason)


def _hf_pair(model, case: dict, batch, device: str, reason: str | None) -> list[Case]:
    """`hf_unpatched` and `hf_patched` (a deep copy through patch_model) training steps of a Hugging Face
    model on batch = (ids, attention_mask, labels); skipped with `reason` when model is None."""
    ids, mask, labels = batch
    out = []
    for name in ("hf_unpatched", "hf_patched"):
        fn = None
        if model is not None:
            from masklm_kernels.integrations.huggingface import patch_model

            m = copy.deepcopy(model)
            if name == "hf_patched":
                patch_model(m)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
            fn = functools.partial(_step, m, opt, lambda mod: mod(input_ids=ids, attention_mask=mask,
                                                                   labels=labels).loss)
        peers = {"hf_unpatched": ("e2e_train_step", "hf_unpatched", case)} if name == "hf_patched" else {}
        out.append(Case("e2e_train_step", name, case, fn=fn, device=device, tokens=int(mask.sum()), skip=reason,
                        peers=peers))
    return out
