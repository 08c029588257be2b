"""Suite `masking`: `masklm_kernels.mask_tokens` against Hugging Face's MLM collator.

What is compared, on the same rows:
* ours: `mask_tokens(input_ids, lengths=..., special_token_ids=[CLS, SEP], ...)` per backend — "cpu"
  (C++ extension), "cuda" (in a CUDA run), and the NumPy "reference" on the smallest shape only
  (it is the executable spec, not a fast path) — in five modes: `token` (Bernoulli 0.15), `exact`
  (`exact=True`), `whole_word` (`word_ids`), `span` (`span_lengths=True`) and `ngram` (MacBERT's
  whole-word n-grams: `span_lengths=(0.4, 0.3, 0.2, 0.1)` with `word_ids`; also against token mode);
* `hf_torch_mask_tokens`: `DataCollatorForLanguageModeling.torch_mask_tokens(inputs,
  special_tokens_mask)` on the same padded tensor (given a fresh copy per call, untimed, because it
  overwrites its input), and with `whole_word_mask=True` + `offset_mapping` for the `whole_word` mode
  (transformers 5.x; HF then forces mask_replace_prob=1 and builds a (B, S, S) tensor);
* `hf_collator`: the whole collator on the same rows given as unpadded lists of ids with their
  `special_tokens_mask` (HF's recommended input), padding included — what a data loader pays.

HF peers always run on CPU tensors, as in a data loader: in a CUDA run they are the CPU baseline the
GPU kernel replaces. Every mode's `speedup_over_peer["hf_tensor"]` is against HF token-mode
`torch_mask_tokens` of the same shape (exact and span masking have no HF equivalent); token mode is
also compared with the collator, whole-word mode with HF whole-word masking.

Inputs: B x S in {8x128, 32x512, 64x512, 64x2048} (quick: the first two; smoke: 2x32); ids uniform in [5, 30522),
[CLS] at 0, [SEP] at length - 1, lengths uniform in [S/2, S] (about 25% padding), word ids from word
lengths uniform in {1, 2, 3}. tokens/s counts all B*S positions. `bytes_moved` is the compulsory
traffic (ids read, masked ids and labels written, lengths / word ids / special ids read), so GB/s
and % of copy bandwidth say how close the kernel is to the memory roofline.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from .. import hf_peers
from ..harness import Case

OP = "mask_tokens"
SHAPES = ((8, 128), (32, 512), (64, 512), (64, 2048))
QUICK_SHAPES = SHAPES[:2]
SMOKE_SHAPES = ((2, 32),)
MODES = ("token", "exact", "whole_word", "span", "ngram")
VOCAB_SIZE = hf_peers.BERT_VOCAB_SIZE
SPECIAL_IDS = (hf_peers.CLS_ID, hf_peers.SEP_ID)
DATA_SEED = 1234
NO_HF_EQUIVALENT = "no HF equivalent; hf_tensor speedup is against HF token-mode masking"


@dataclasses.dataclass
class Batch:
    """One padded batch and its metadata (CPU tensors), as in the module docstring."""

    input_ids: torch.Tensor  # (B, S) int64, [PAD] after the row's length
    lengths: torch.Tensor  # (B,) int64
    special_tokens_mask: torch.Tensor  # (B, S) int64: 1 on [CLS], [SEP] and padding
    word_ids: torch.Tensor  # (B, S) int64, -1 on special tokens and padding


def make_batch(batch: int, seq: int, seed: int = DATA_SEED) -> Batch:
    g = torch.Generator().manual_seed(seed + 7919 * batch + seq)
    ids = torch.randint(hf_peers.FIRST_WORD_ID, VOCAB_SIZE, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g).clamp_(min=min(2, seq))
    pos = torch.arange(seq).expand(batch, seq)
    pad = pos >= lengths[:, None]
    special = pad | (pos == 0) | (pos == lengths[:, None] - 1)
    ids[pad] = hf_peers.PAD_ID
    ids[:, 0] = hf_peers.CLS_ID
    ids[torch.arange(batch), lengths - 1] = hf_peers.SEP_ID
    # word k of a row spans content positions [ends[k-1], ends[k]); content position = s - 1
    ends = torch.cumsum(torch.randint(1, 4, (batch, seq), generator=g), dim=1)
    word = torch.searchsorted(ends, (pos - 1).clamp(min=0).contiguous(), right=True)
    word_ids = word.masked_fill(special, -1)
    return Batch(ids, lengths, special.to(torch.int64), word_ids)


MACBERT_NGRAMS = (0.4, 0.3, 0.2, 0.1)  # MacBERT's whole-word 1- to 4-gram law (Cui et al., 2020)


def mode_kwargs(mode: str, word_ids: torch.Tensor) -> dict[str, Any]:
    return {"token": {}, "exact": {"exact": True}, "whole_word": {"word_ids": word_ids},
            "span": {"span_lengths": True},
            "ngram": {"span_lengths": MACBERT_NGRAMS, "word_ids": word_ids}}[mode]


def _load_api() -> tuple[Any, str | None]:
    try:
        from masklm_kernels import mask_tokens
    except Exception as exc:  # noqa: BLE001 - recorded as the skip reason of every case
        return None, f"masklm_kernels.mask_tokens not importable: {type(exc).__name__}: {exc}"
    return mask_tokens, None


def _backend_reason(mask_tokens, backend: str, device: str) -> str | None:
    """Why `backend` cannot run here (from the library's own error), or None."""
    ids = torch.tensor([[hf_peers.CLS_ID, 10, 11, hf_peers.SEP_ID]], device=device)
    try:
        mask_tokens(ids, mask_token_id=hf_peers.MASK_ID, vocab_size=VOCAB_SIZE,
                    special_token_ids=list(SPECIAL_IDS), backend=backend)
    except Exception as exc:  # noqa: BLE001
        return f"backend {backend!r} unavailable: {type(exc).__name__}: {exc}"
    return None


def _our_backends(device: str) -> list[tuple[str, str]]:
    """(backend, tensor device) pairs worth timing in a run on `device`."""
    return ([("cuda", "cuda")] if device.startswith("cuda") else []) + [("cpu", "cpu"), ("reference", "cpu")]


def _hf_collators() -> tuple[Any, Any] | str:
    """(token collator, whole-word collator) over the synthetic tokenizer, or why they cannot be built."""
    reason = hf_peers.unavailable_reason()
    if reason:
        return reason
    tokenizer = hf_peers.build_bert_tokenizer(VOCAB_SIZE)
    return (hf_peers.make_mlm_collator(tokenizer),
            hf_peers.make_mlm_collator(tokenizer, whole_word_mask=True))


def _hf_peer_cases(collators: tuple[Any, Any] | str, shape: dict[str, int], batch: Batch,
                   tokens: int) -> list[Case]:
    token, wwm = {**shape, "mode": "token"}, {**shape, "mode": "whole_word"}
    if isinstance(collators, str):
        return [Case(OP, "hf_torch_mask_tokens", token, skip=collators),
                Case(OP, "hf_torch_mask_tokens", wwm, skip=collators),
                Case(OP, "hf_collator", token, skip=collators)]
    collator, wwm_collator = collators
    ids, stm = batch.input_ids, batch.special_tokens_mask
    offsets = hf_peers.offsets_from_word_ids(batch.word_ids)
    examples = hf_peers.collator_examples(ids, batch.lengths, stm)
    wwm_reason = hf_peers.whole_word_mask_unavailable_reason(wwm_collator)
    return [
        Case(OP, "hf_torch_mask_tokens", token, fn=collator.torch_mask_tokens,
             setup=lambda: (ids.clone(), stm), tokens=tokens,
             notes="special_tokens_mask given; input copied per call, untimed"),
        Case(OP, "hf_torch_mask_tokens", wwm, fn=wwm_collator.torch_mask_tokens,
             setup=lambda: (ids.clone(), stm, offsets), tokens=tokens, skip=wwm_reason,
             notes="whole_word_mask=True via offset_mapping: HF forces mask_replace_prob=1 and "
                   "builds (B,S,S) temporaries; NumPy allocations not in peak_mem"),
        Case(OP, "hf_collator", token, fn=collator, setup=lambda: (examples,), tokens=tokens,
             notes="collator(list of dicts: input_ids + special_tokens_mask), padding included; "
                   "Python lists not in peak_mem"),
    ]


def _our_case(mask_tokens, backend: str, tensor_device: str, reason: str | None, shape: dict[str, int],
              batch: Batch, mode: str, tokens: int) -> Case:
    case = {**shape, "mode": mode}
    token_peer = {**shape, "mode": "token"}
    peers = {"hf_tensor": (OP, "hf_torch_mask_tokens", token_peer)}
    if mode == "token":
        peers["hf_collator"] = (OP, "hf_collator", token_peer)
    if mode == "whole_word":
        peers["hf_wwm"] = (OP, "hf_torch_mask_tokens", case)
    if mode == "ngram":  # the price of the n-gram law over plain token masking, same backend
        peers["token_mode"] = (OP, backend, token_peer)
    if reason:
        return Case(OP, backend, case, device=tensor_device, skip=reason, peers=peers)
    ids = batch.input_ids.to(tensor_device)
    lengths = batch.lengths.to(tensor_device)
    special = torch.tensor(SPECIAL_IDS, dtype=torch.int64, device=tensor_device)
    extra = mode_kwargs(mode, batch.word_ids.to(tensor_device))
    metadata = [lengths, special, *(v for v in extra.values() if isinstance(v, torch.Tensor))]
    bytes_moved = 3 * ids.numel() * ids.element_size() + sum(t.numel() * t.element_size() for t in metadata)
    fn = functools.partial(mask_tokens, ids, mask_token_id=hf_peers.MASK_ID, vocab_size=VOCAB_SIZE,
                           lengths=lengths, special_token_ids=special, seed=0, step=0, backend=backend,
                           **extra)
    return Case(OP, backend, case, fn=fn, device=tensor_device, tokens=tokens, bytes_moved=bytes_moved,
                peers=peers, notes=NO_HF_EQUIVALENT if mode in ("exact", "span", "ngram") else None)


def cases(device: str, size: str) -> list[Case]:
    """The suite's cases for a run on `device` ("cpu" or "cuda"); see the module docstring."""
    shapes = {"smoke": SMOKE_SHAPES, "quick": QUICK_SHAPES}.get(size, SHAPES)
    mask_tokens, api_reason = _load_api()
    backends = [(name, tdev, api_reason or _backend_reason(mask_tokens, name, tdev))
                for name, tdev in _our_backends(device)]
    collators = _hf_collators()
    out: list[Case] = []
    for b, s in shapes:
        shape, batch, tokens = {"B": b, "S": s}, make_batch(b, s), b * s
        out += _hf_peer_cases(collators, shape, batch, tokens)
        for name, tdev, reason in backends:
            if name == "reference" and (b, s) != shapes[0]:
                continue  # slow NumPy spec: timed on the smallest shape only
            out += [_our_case(mask_tokens, name, tdev, reason, shape, batch, mode, tokens) for mode in MODES]
    return out
