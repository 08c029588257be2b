"""Hugging Face peers, built offline.

The peer a user would otherwise reach for is `transformers.DataCollatorForLanguageModeling`, which
needs a tokenizer. There is no network on the benchmark machines, so the tokenizer is a
`BertTokenizerFast` loaded from a synthetic `vocab.txt` (`[PAD] [UNK] [CLS] [SEP] [MASK]` then
`w5 ... w{V-1}`, so ids 0-4 are the special tokens and `len(tokenizer) == V`, as for
bert-base-uncased's V = 30522). Masking only looks at ids, the special-tokens mask and the vocabulary
size, so a synthetic vocabulary costs the peer nothing.

Nothing here imports transformers at import time: `unavailable_reason()` says why the peers cannot be
built (so the suites can record them as skipped, with the reason), and the builders import lazily.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from typing import Any

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
FIRST_WORD_ID = len(SPECIAL_TOKENS)
BERT_VOCAB_SIZE = 30522


def unavailable_reason() -> str | None:
    """None when the HF peers can be built, else why not (e.g. transformers not installed)."""
    for module in ("transformers", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'masklm_kernels[hf]')"
    try:
        from transformers import BertTokenizerFast, DataCollatorForLanguageModeling  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
        return f"transformers import failed: {type(exc).__name__}: {exc}"
    return None


def build_bert_tokenizer(vocab_size: int = BERT_VOCAB_SIZE):
    """A BertTokenizerFast over the synthetic vocabulary, built from files in a temporary directory.

    `from_pretrained(dir)` is used rather than the constructor because the constructor's file
    argument changed between transformers 4 (`vocab_file`) and 5 (`vocab`), and 5 ignores the old
    name silently; the size is checked so a silently wrong vocabulary cannot slip through.
    """
    from transformers import BertTokenizerFast

    if vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"vocab_size must be > {FIRST_WORD_ID}, got {vocab_size}")
    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(FIRST_WORD_ID, vocab_size))]
    with tempfile.TemporaryDirectory(prefix="masklm_bench_vocab_") as tmp:
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(words) + "\n")
        tokenizer = BertTokenizerFast.from_pretrained(tmp, local_files_only=True)
    if len(tokenizer) != vocab_size or tokenizer.mask_token_id != MASK_ID or tokenizer.pad_token_id != PAD_ID:
        raise RuntimeError(f"synthetic tokenizer is wrong: len={len(tokenizer)} mask={tokenizer.mask_token_id} "
                           f"pad={tokenizer.pad_token_id}")
    return tokenizer


def make_mlm_collator(tokenizer, *, whole_word_mask: bool = False, mlm_probability: float = 0.15,
                      seed: int = 0):
    """DataCollatorForLanguageModeling with HF's defaults (80/10/10) and its own seeded generator.

    The generator is created up front so that `torch_mask_tokens` called directly (not through
    `__call__`) also leaves the global RNG alone. With `whole_word_mask=True` HF forces
    `mask_replace_prob=1` (its random replacement is not supported with whole words) and warns; the
    warning is expected and silenced here, and the suites note the difference.
    """
    from transformers import DataCollatorForLanguageModeling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        collator = DataCollatorForLanguageModeling(
            tokenizer, mlm=True, whole_word_mask=whole_word_mask, mlm_probability=mlm_probability,
            seed=seed, return_tensors="pt")
    collator.generator = collator.get_generator(seed)
    return collator


def whole_word_mask_unavailable_reason(collator) -> str | None:
    """Why HF whole-word masking cannot be driven from tensors here, or None when it can.

    transformers 5.x masks whole words from the tokenizer's `offset_mapping`
    (`torch_mask_tokens(inputs, special_tokens_mask, offset_mapping)`); 4.x had a separate
    `DataCollatorForWholeWordMask` working on token strings, which we do not drive.
    """
    import inspect

    params = inspect.signature(collator.torch_mask_tokens).parameters
    if "offset_mapping" not in params:
        return ("this transformers version has no offset_mapping-based whole-word masking "
                "(DataCollatorForLanguageModeling.torch_mask_tokens takes no offset_mapping)")
    return None


def offsets_from_word_ids(word_ids: torch.Tensor) -> torch.Tensor:
    """Character offsets (B, S, 2) under which HF groups tokens exactly as `word_ids` does.

    HF starts a new word at a non-special token whose start differs from the previous token's end
    (or that follows a special token). Token `s` gets `[s + c_s, s + c_s + 1)`, `c_s` the number of
    word starts up to `s`: consecutive tokens of one word touch, a new word leaves a gap. Tokens
    with word id -1 (special, padding) get (0, 0), as a tokenizer gives special tokens.
    """
    valid = word_ids >= 0
    prev = torch.nn.functional.pad(word_ids[:, :-1], (1, 0), value=-1)
    starts = valid & (word_ids != prev)
    pos = torch.arange(word_ids.shape[1], device=word_ids.device).expand_as(word_ids)
    begin = pos + torch.cumsum(starts.to(torch.int64), dim=1)
    offsets = torch.stack([begin, begin + 1], dim=-1)
    return offsets.masked_fill(~valid.unsqueeze(-1), 0)


def collator_examples(input_ids: torch.Tensor, lengths: torch.Tensor,
                      special_tokens_mask: torch.Tensor) -> list[dict[str, Any]]:
    """The rows as a tokenizer hands them to a collator: unpadded lists of ids with their
    `special_tokens_mask` (HF's recommended fast path, `return_special_tokens_mask=True`)."""
    ids, stm = input_ids.tolist(), special_tokens_mask.tolist()
    return [{"input_ids": ids[b][:n], "special_tokens_mask": stm[b][:n]}
            for b, n in enumerate(lengths.tolist())]
