"""Suite `denoising`: `masklm_kernels.t5_span_corruption` against T5's span corruption as Hugging Face's
`run_t5_mlm_flax.py` runs it in its data collator (NumPy, per row), and `masklm_kernels.bart_infill`
against BART's text infilling as fairseq's `DenoisingDataset` runs it (torch, per sample).

* ours: `t5_span_corruption(ids, ...)` per backend: "cpu" (C++ extension), "cuda" (in a CUDA run), the
  NumPy "reference" on the smallest shape only (the executable spec, not a fast path); inputs, labels,
  decoder inputs and lengths.
* `hf_t5_numpy`: `DataCollatorForT5MLM`'s core re-implemented from the published script (transformers'
  examples/flax/language-modeling/run_t5_mlm_flax.py): `random_spans_noise_mask` per row
  (`np.random.shuffle` segmentations), `create_sentinel_ids`, `filter_input_ids` for inputs and labels,
  then `shift_tokens_right` for the decoder inputs, on the same (B, S) NumPy ids. No tokenizer, no
  padding: what the collator computes per batch.

* `bart_infill` (BART's settings: mask ratio 0.3, Poisson(3) spans, replace_length 1): ours per backend
  against `fairseq_infill`, `DenoisingDataset.add_whole_word_mask` with mask_length "span-poisson" and
  `add_insertion_noise` re-implemented from fairseq (token-level word starts, first and last token
  kept), one call per sample as its `__getitem__` does, on the same rows.

Inputs: B x S in {32x512, 64x1024} (quick: 32x512; smoke: 2x32; 2048-token rows would need more than T5's 100
sentinels), full rows (the script packs text into
rows of one length), T5's settings (noise density 0.15, mean span 3, 100 sentinels from 32099, EOS 1).
tokens/s counts all B*S input positions.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..harness import Case

OP = "t5_span_corruption"
VOCAB, SENTINEL, EOS, PAD = 32128, 32099, 1, 0
DENSITY, MEAN_SPAN = 0.15, 3.0
SHAPES = {"smoke": [(2, 32)], "quick": [(32, 512)], "full": [(32, 512), (64, 1024)]}


# ------------------------------------------------------------------------------------------------
# The peer: run_t5_mlm_flax.py's DataCollatorForT5MLM, its NumPy core
# ------------------------------------------------------------------------------------------------

def _random_spans_noise_mask(length: int) -> np.ndarray:
    num_noise_tokens = int(np.round(length * DENSITY))
    num_nonnoise_tokens = length - num_noise_tokens
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(min(num_noise_tokens, num_nonnoise_tokens) / MEAN_SPAN))
    num_noise_spans = max(num_noise_spans, 1)

    def _random_segmentation(num_items, num_segments):
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        np.random.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2])
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    return np.equal(span_num % 2, 1)[:length]


def _create_sentinel_ids(mask_indices: np.ndarray) -> np.ndarray:
    start_indices = mask_indices - np.roll(mask_indices, 1, axis=-1) * mask_indices
    start_indices[:, 0] = mask_indices[:, 0]
    sentinel_ids = np.where(start_indices != 0, np.cumsum(start_indices, axis=-1), start_indices)
    sentinel_ids = np.where(sentinel_ids != 0, (SENTINEL + 1 - sentinel_ids), 0)
    sentinel_ids -= mask_indices - start_indices
    return sentinel_ids


def _filter_input_ids(input_ids: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    batch_size = input_ids.shape[0]
    input_ids_full = np.where(sentinel_ids != 0, sentinel_ids, input_ids)
    input_ids = input_ids_full[input_ids_full >= 0].reshape((batch_size, -1))
    return np.concatenate([input_ids, np.full((batch_size, 1), EOS, dtype=np.int32)], axis=-1)


def hf_t5_collate(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch_size, length = ids.shape
    mask_indices = np.asarray([_random_spans_noise_mask(length) for _ in range(batch_size)])
    labels_mask = ~mask_indices
    input_ids = _filter_input_ids(ids, _create_sentinel_ids(mask_indices.astype(np.int8)))
    labels = _filter_input_ids(ids, _create_sentinel_ids(labels_mask.astype(np.int8)))
    decoder_input_ids = np.zeros_like(labels)  # shift_tokens_right, decoder start = pad = 0
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return input_ids, labels, decoder_input_ids


# ------------------------------------------------------------------------------------------------

def _fairseq_infill(source: torch.Tensor, p: float = 0.3, lam: float = 3.0, mask_idx: int = 4,
                    vocab: int = VOCAB) -> torch.Tensor:
    """fairseq's DenoisingDataset.add_whole_word_mask (span-poisson, replace_length 1, random_ratio 0), then
    add_insertion_noise, for one sample (token-level word starts: every token but the first and last)."""
    lambda_to_the_k, e_to_the_minus_lambda, k_factorial, ps = 1, math.exp(-lam), 1, []
    for k in range(0, 128):
        ps.append(e_to_the_minus_lambda * lambda_to_the_k / k_factorial)
        lambda_to_the_k *= lam
        k_factorial *= k + 1
        if ps[-1] < 0.0000001:
            break
    dist = torch.distributions.Categorical(torch.FloatTensor(ps))
    is_word_start = torch.ones(source.size(0), dtype=torch.long)
    is_word_start[0] = is_word_start[-1] = 0
    num_to_mask = int(math.ceil(is_word_start.float().sum() * p))
    num_inserts = 0
    if num_to_mask == 0:
        return source
    lengths = dist.sample(sample_shape=(num_to_mask,))
    cum_length = torch.cumsum(lengths, 0)
    while cum_length[-1] < num_to_mask:
        lengths = torch.cat([lengths, dist.sample(sample_shape=(num_to_mask,))], dim=0)
        cum_length = torch.cumsum(lengths, 0)
    i = 0
    while cum_length[i] < num_to_mask:
        i += 1
    lengths[i] = num_to_mask - (0 if i == 0 else cum_length[i - 1])
    num_to_mask = i + 1
    lengths = lengths[:num_to_mask]
    lengths = lengths[lengths > 0]
    num_inserts = num_to_mask - lengths.size(0)
    num_to_mask -= num_inserts
    source = source.clone()
    if num_to_mask > 0:
        word_starts = is_word_start.nonzero(as_tuple=False)
        indices = word_starts[torch.randperm(word_starts.size(0))[:num_to_mask]].squeeze(1)
        to_keep = torch.ones(source.size(0), dtype=torch.bool)
        is_word_start[-1] = 255
        source[indices] = mask_idx
        lengths -= 1
        while indices.size(0) > 0:
            lengths -= is_word_start[indices + 1].long()
            uncompleted = lengths >= 0
            indices = indices[uncompleted] + 1
            lengths = lengths[uncompleted]
            to_keep[indices] = 0
        source = source[to_keep]
    if num_inserts > 0:  # add_insertion_noise(source, num_inserts / source.size(0)), random_ratio 0
        num_tokens = len(source)
        n = int(math.ceil(num_tokens * num_inserts / source.size(0)))
        noise_indices = torch.randperm(num_tokens + n - 2)[:n] + 1
        noise_mask = torch.zeros(size=(num_tokens + n,), dtype=torch.bool)
        noise_mask[noise_indices] = 1
        result = torch.LongTensor(n + len(source)).fill_(-1)
        result[noise_indices] = mask_idx
        result[~noise_mask] = source
        source = result
    return source


def fairseq_batch(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_fairseq_infill(r) for r in rows]


def _backends(device: str) -> list[tuple[str, str]]:
    out = [("cpu", "cpu"), ("reference", "cpu")]
    if device == "cuda":
        out.insert(0, ("cuda", "cuda"))
    return out


def cases(device: str, size: str) -> list[Case]:
    from masklm_kernels import bart_infill, t5_span_corruption
    from masklm_kernels.masking.api import BACKENDS

    out: list[Case] = []
    for i, (B, S) in enumerate(SHAPES[size]):
        shape = {"B": B, "S": S}
        ids = torch.from_numpy(np.random.default_rng(7).integers(100, SENTINEL - 100, size=(B, S)))
        out.append(Case(OP, "hf_t5_numpy", shape, fn=functools.partial(hf_t5_collate, ids.numpy().astype(np.int32)),
                        device="cpu", tokens=B * S))
        for name, tdev in _backends(device):
            if name == "reference" and i:
                continue  # the slow spec: the smallest shape only
            backend = next(b for b in BACKENDS if b.name == name)
            reasons = backend.not_supported_reasons(tdev)
            reason = f"backend {name!r} unavailable: {'; '.join(reasons)}" if reasons else None
            fn = None if reason else functools.partial(
                t5_span_corruption, ids.to(tdev), vocab_size=VOCAB, sentinel_start_id=SENTINEL, eos_token_id=EOS,
                noise_density=DENSITY, mean_noise_span_length=MEAN_SPAN, seed=0, step=0, backend=name)
            out.append(Case(OP, name, shape, fn=fn, device=tdev, tokens=B * S, skip=reason,
                            peers={"hf_t5_numpy": (OP, "hf_t5_numpy", shape)}))
            bart = None if reason else functools.partial(
                bart_infill, ids.to(tdev), vocab_size=VOCAB, mask_token_id=4, decoder_start_token_id=EOS, seed=0,
                step=0, backend=name)
            out.append(Case("bart_infill", name, shape, fn=bart, device=tdev, tokens=B * S, skip=reason,
                            peers={"fairseq_infill": ("bart_infill", "fairseq_infill", shape)}))
        out.append(Case("bart_infill", "fairseq_infill", shape, fn=functools.partial(fairseq_batch, list(ids)),
                        device="cpu", tokens=B * S))
    return out
