"""The attention specification (masklm_kernels/attention/reference.py) against an element-by-element
model written from docs/SEMANTICS.md's "Attention", and against PyTorch SDPA where SDPA applies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masklm_kernels.attention import masks
from masklm_kernels.attention import reference as ref

from attention_cases import attention_case
from helpers import assert_close


def _model(q, k, v, *, causal=False, kv_lengths=None, q_lengths=None, prefix_lengths=None, spans=None,
           span_mode="inside", window_size=(-1, -1), alibi_slopes=None, attn_mask=None, scale=None):
    """One (b, h, i) at a time, each condition as the brief states it; float64 NumPy."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    sp = None if spans is None else spans.view(B, -1, 2).tolist()
    am = None if attn_mask is None else attn_mask.expand(B, Hq, Sq, Sk).double().numpy() \
        if attn_mask.dtype != torch.bool else attn_mask.expand(B, Hq, Sq, Sk).numpy()

    def in_span(b, p):
        return any(s <= p < e for s, e in sp[b])

    out = np.zeros((B, Hq, Sq, D))
    for b in range(B):
        # the diagonal: bottom-right on the row's real lengths when both are given, else on the sizes
        both = q_lengths is not None and kv_lengths is not None
        off = int(kv_lengths[b]) - int(q_lengths[b]) if both else Sk - Sq
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Sq):
                if q_lengths is not None and i >= int(q_lengths[b]):
                    continue
                if sp is not None and span_mode == "inside" and not in_span(b, i):
                    continue
                cols, scores = [], []
                for j in range(Sk):
                    ok = True
                    if causal:
                        ok = j <= i + off or (prefix_lengths is not None and j < int(prefix_lengths[b]))
                    if kv_lengths is not None and j >= int(kv_lengths[b]):
                        ok = False
                    if sp is not None and (in_span(b, j) != (span_mode == "inside")):
                        ok = False
                    left, right = window_size
                    if (left >= 0 and j < i + off - left) or (right >= 0 and j > i + off + right):
                        ok = False
                    s = float(q[b, h, i] @ k[b, g, j]) * scale
                    if alibi_slopes is not None:
                        slope = alibi_slopes.reshape(-1, Hq)[b if alibi_slopes.dim() == 2 else 0, h]
                        s -= float(slope) * abs(i + off - j)
                    if am is not None:
                        if am.dtype == bool:
                            ok = ok and bool(am[b, h, i, j])
                        else:
                            s += am[b, h, i, j]
                            ok = ok and am[b, h, i, j] != -np.inf
                    if ok:
                        cols.append(j)
                        scores.append(s)
                if cols:
                    w = np.exp(np.array(scores) - max(scores))
                    out[b, h, i] = (w / w.sum()) @ v[b, g, cols]
    return torch.from_numpy(out)


@pytest.mark.parametrize("seed", range(40))
def test_reference_matches_elementwise_model(seed):
    q, k, v, kw = attention_case(seed, positions=True)
    got = ref.attention(q, k, v, **kw)
    assert not torch.isnan(got).any()
    assert_close(got, _model(q, k, v, **kw), atol=1e-12, rtol=1e-10, msg=f"case {seed}: {sorted(kw)}")


def test_reference_matches_sdpa_where_sdpa_applies():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 17, 40, generator=g, dtype=torch.float64) for _ in range(3))
    assert_close(ref.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-10)
    assert_close(ref.attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                 atol=1e-12, rtol=1e-10)
    kv_len = torch.tensor([17, 5])
    vis = masks.visibility(2, 17, 17, causal=True, kv_lengths=kv_len)
    assert_close(ref.attention(q, k, v, causal=True, kv_lengths=kv_len),
                 F.scaled_dot_product_attention(q, k, v, attn_mask=vis), atol=1e-12, rtol=1e-10)


def test_rows_without_visible_keys_are_zero_with_zero_gradients():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kw = dict(causal=True, kv_lengths=torch.tensor([0, 9]), q_lengths=torch.tensor([9, 4]),
              spans=torch.tensor([[2, 6], [0, 9]]), span_mode="inside")
    out = ref.attention(q, k, v, **kw)
    dead = ~masks.visibility(2, 9, 9, **kw).any(-1)  # (B, 1, Sq)
    assert bool(dead[0].all()) and bool(dead[1, 0, 4:].all()) and not bool(dead[1, 0, :4].any())
    assert (out.masked_select(dead[..., None]) == 0).all()
    out.backward(torch.randn_like(out))
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"d{name} not finite"
    assert (q.grad.masked_select(dead[..., None]) == 0).all(), "dq of a row with no visible key"
    assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all(), "kv_lengths 0: keys get no gradient"


def test_padding_rows_contribute_no_gradient():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ref.attention(q, k, v, q_lengths=torch.tensor([5]))
    grad = torch.randn_like(out)
    (dk1, dv1) = torch.autograd.grad(out, (k, v), grad, retain_graph=True)
    grad2 = grad.clone()
    grad2[:, :, 5:] = torch.randn_like(grad2[:, :, 5:]) * 100
    (dk2, dv2) = torch.autograd.grad(out, (k, v), grad2)
    assert torch.equal(dk1, dk2) and torch.equal(dv1, dv2)


def test_tiles_needed_counts_tiles_with_a_visible_pair():
    vis = masks.visibility(1, 8, 8, causal=True)  # lower triangle, 4x4 tiles: 3 of 4 hold a visible pair
    assert ref.tiles_needed(vis, 4, 4) == 3
    assert ref.tiles_needed(vis, 8, 8) == 1 and ref.visible_pairs(vis) == 36
    vis = masks.visibility(2, 5, 7, kv_lengths=torch.tensor([0, 3]))  # ragged edges are padded
    assert ref.tiles_needed(vis, 4, 4) == 2  # row 1: key tile 0 for both query tiles
    assert ref.tiles_needed(masks.visibility(2, 9, 9, spans=torch.tensor([[4, 4], [0, 1]])), 4, 4) == 1


def test_bad_metadata_is_refused():
    with pytest.raises(ValueError, match="span_mode"):
        masks.visibility(1, 4, 4, spans=torch.tensor([[0, 2]]), span_mode="middle")
    with pytest.raises(ValueError, match="prefix_lengths"):
        masks.visibility(1, 4, 4, prefix_lengths=torch.tensor([2]))
