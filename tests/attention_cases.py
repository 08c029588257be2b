"""Random masked-attention cases shared by the attention tests (reference, backends).

`attention_case(seed)` with its defaults is the generator that test_attention_reference.py has always
used (same draws, same cases); the keyword options widen it for the backends' tests: other sequence
lengths and head dims, spans kept within [0, Sk] (what `fused_attention` accepts), attn_mask of every
broadcast shape, forced zero-length rows.
"""
from __future__ import annotations

import numpy as np
import torch

from helpers import rng_for

#: attn_mask shapes broadcastable to (B, Hq, Sq, Sk), as templates over the case's sizes.
MASK_SHAPES = (
    ("Sq", "Sk"),
    (1, 1, "Sq", "Sk"),
    ("B", 1, 1, "Sk"),
    (1, "Hq", "Sq", "Sk"),
    ("B", 1, "Sq", "Sk"),
    ("B", "Hq", "Sq", "Sk"),
    ("Sk",),
    (1, 1, "Sk"),
)


def mask_shape(template, **sizes) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in template)


def attention_case(seed: int, *, label: str = "attention reference", seqs=(1, 7, 17), head_dims=(8, 40),
                   spans_within_keys: bool = False, mask_shapes=None, zero_rows: bool = False):
    """(q, k, v, kwargs) float64 with random mask metadata: causal, kv_lengths, q_lengths, prefix_lengths,
    spans ((B, 2) or (B, K, 2), either span_mode), a bool or float (-inf entries) attn_mask, scale.

    `mask_shapes`: templates (see MASK_SHAPES) to draw the attn_mask's shape from; default the original
    (1, Hq, Sq, Sk) for bool and (B, 1, Sq, Sk) for float masks. `zero_rows`: lengths get a zero-length
    batch row half of the time (B >= 2)."""
    rng = rng_for(label, seed)
    B = int(rng.integers(1, 4))
    Hkv = int(rng.choice([1, 2]))
    Hq = Hkv * int(rng.choice([1, 2, 3]))
    Sq, Sk = (int(x) for x in rng.choice(list(seqs), size=2))
    D = int(rng.choice(list(head_dims)))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    kw = {}
    causal = bool(rng.integers(2))
    kw["causal"] = causal
    if rng.integers(2):
        kw["kv_lengths"] = torch.from_numpy(rng.integers(0, Sk + 1, B))
    if rng.integers(2):
        kw["q_lengths"] = torch.from_numpy(rng.integers(0, Sq + 1, B))
    if causal and rng.integers(2):
        kw["prefix_lengths"] = torch.from_numpy(rng.integers(0, Sk + 1, B))
    if zero_rows and B >= 2:
        for name in ("kv_lengths", "q_lengths"):
            if name in kw and rng.integers(2):
                kw[name][int(rng.integers(B))] = 0
    if rng.integers(2):
        K = int(rng.choice([1, 2]))
        a = rng.integers(0, (Sk if spans_within_keys else max(Sq, Sk)) + 1, (B, K, 2))
        spans = torch.from_numpy(np.sort(a, axis=-1))
        kw["spans"] = spans[:, 0] if K == 1 and rng.integers(2) else spans
        kw["span_mode"] = str(rng.choice(["inside", "outside"]))
    r = rng.integers(3)
    sizes = dict(B=B, Hq=Hq, Sq=Sq, Sk=Sk)
    if r == 1:
        shape = (1, Hq, Sq, Sk) if mask_shapes is None else \
            mask_shape(mask_shapes[int(rng.integers(len(mask_shapes)))], **sizes)
        kw["attn_mask"] = torch.from_numpy(rng.uniform(size=shape) < 0.8)
    elif r == 2:
        shape = (B, 1, Sq, Sk) if mask_shapes is None else \
            mask_shape(mask_shapes[int(rng.integers(len(mask_shapes)))], **sizes)
        m = rng.normal(size=shape)
        m[rng.uniform(size=m.shape) < 0.2] = -np.inf
        kw["attn_mask"] = torch.from_numpy(m)
    if rng.integers(2):
        kw["scale"] = float(rng.uniform(0.05, 0.5))
    return q, k, v, kw
