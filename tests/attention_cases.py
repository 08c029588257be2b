"""Random masked-attention cases shared by the attention tests (reference, backends).

Also the helpers every backend's tests share: `fwd_bwd` (output and input gradients), `ref64` (the fp64
specification), `dead_rows` and `dead_row_case` (rows with no visible key, one reason per batch row).

`attention_case(seed)` with its defaults is the generator that test_attention_reference.py has always
used (same draws, same cases); the keyword options widen it for the backends' tests: other sequence
lengths and head dims, spans kept within [0, Sk] (what `fused_attention` accepts), attn_mask of every
broadcast shape, forced zero-length rows, sliding windows and ALiBi slopes.
"""
from __future__ import annotations

import numpy as np
import torch

from masklm_kernels.attention import masks
from masklm_kernels.attention import reference as ref

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
                   spans_within_keys: bool = False, mask_shapes=None, zero_rows: bool = False,
                   positions: bool = False):
    """(q, k, v, kwargs) float64 with random mask metadata: causal, kv_lengths, q_lengths, prefix_lengths,
    spans ((B, 2) or (B, K, 2), either span_mode), a bool or float (-inf entries) attn_mask, scale.

    `mask_shapes`: templates (see MASK_SHAPES) to draw the attn_mask's shape from; default the original
    (1, Hq, Sq, Sk) for bool and (B, 1, Sq, Sk) for float masks. `zero_rows`: lengths get a zero-length
    batch row half of the time (B >= 2). `positions`: half of the cases get a sliding window (each side
    unbounded a third of the time, else 0 to the sequence length), half ALiBi slopes ((Hq,) or (B, Hq));
    drawn after everything else, so the other draws stay those of `positions=False`."""
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
    if positions:
        if rng.integers(2):
            kw["window_size"] = tuple(-1 if rng.integers(3) == 0 else int(rng.integers(0, max(Sq, Sk) + 1))
                                      for _ in range(2))
        if rng.integers(2):
            shape = (Hq,) if rng.integers(2) else (B, Hq)
            kw["alibi_slopes"] = torch.from_numpy(rng.uniform(0.0, 1.0, size=shape)).float()
    return q, k, v, kw


#: the mask arguments of `masks.visibility` (what decides the visible pairs)
VISIBILITY_ARGS = ("causal", "kv_lengths", "q_lengths", "prefix_lengths", "spans", "span_mode", "window_size")


def visibility_of(q, k, kw) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: the pairs the O(B) metadata of `kw` shows (attn_mask aside)."""
    return masks.visibility(q.shape[0], q.shape[2], k.shape[2], **{n: kw[n] for n in VISIBILITY_ARGS if n in kw})


def fwd_bwd(fn, q, k, v, dout, **kw):
    """Output and (dq, dk, dv) of `fn(q, k, v, **kw)` for the upstream gradient `dout`."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), grads


def ref64(q, k, v, **kw):
    return ref.attention(q, k, v, compute_dtype=torch.float64, **kw)


def dead_rows(q, k, kw) -> torch.Tensor:
    """(B, Hq, Sq) bool: query rows with no visible key under `kw`, attn_mask included."""
    B, Hq, Sq, _ = q.shape
    vis = visibility_of(q, k, kw)
    m = kw.get("attn_mask")
    if m is not None:
        vis = vis & (m if m.dtype == torch.bool else m != float("-inf"))
    return ~vis.expand(B, Hq, Sq, k.shape[2]).any(-1)


def dead_row_case(mask_kind: str, dtype: torch.dtype):
    """B = 5, one reason per batch row: kv_lengths 0; q_lengths padding; rows outside every inside-span;
    all-False bool / all -inf float attn_mask rows (rows 2, 5 and 17..40: whole 16-row blocks of that row);
    row 4: everything visible."""
    B, Hq, Hkv, S, D = 5, 4, 2, 41, 40
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    dead_rows = [2, 5, *range(17, 41)]
    if mask_kind == "bool":
        mask = torch.ones(B, 1, S, S, dtype=torch.bool)
        mask[3, :, dead_rows] = False
    else:
        mask = torch.randn(B, 1, S, S, generator=g)
        mask[3, :, dead_rows] = float("-inf")
    kw = dict(kv_lengths=torch.tensor([0, S, S, S, S]), q_lengths=torch.tensor([S, 7, S, S, S]),
              spans=torch.tensor([[0, S], [0, S], [3, 9], [0, S], [0, S]]), span_mode="inside", attn_mask=mask)
    dead = torch.zeros(B, Hq, S, dtype=torch.bool)
    dead[0], dead[1, :, 7:], dead[2] = True, True, True
    dead[2, :, 3:9] = False
    dead[3, :, dead_rows] = True
    return q, k, v, kw, dead


def op_args(kind: str, dtype=torch.float32, requires_grad=False):
    """Positional arguments of the padded forward custom ops (attention_<backend>_fwd) for `kind` in OP_CASES."""
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 19, 23, 16
    q, k, v = (torch.randn(B, h, s, D, generator=g).to(dtype).requires_grad_(requires_grad)
               for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    none4 = (None, None, None, None)
    no_window = (-1, -1, None)  # window_left, window_right, alibi_slopes
    if kind == "plain":
        return (q, k, v, *none4, None, False, "inside", *no_window, 0.25)
    if kind == "lengths":
        return (q, k, v, torch.tensor([23, 0]), torch.tensor([5, 19]), torch.tensor([3, 9]), None, None,
                True, "inside", *no_window, 0.3)
    if kind == "spans":
        return (q, k, v, None, None, None, torch.tensor([[[1, 6], [9, 15]], [[0, 0], [2, 23]]]), None,
                False, "inside", *no_window, 0.25)
    if kind == "spans_outside_bool_mask":
        return (q, k, v, torch.tensor([20, 23]), None, None, torch.tensor([[4, 8], [0, 3]]),
                torch.rand(Sq, Sk, generator=g) < 0.7, True, "outside", *no_window, 0.2)
    if kind == "float_mask":
        m = torch.randn(B, 1, Sq, Sk, generator=g)
        m[0, 0, 3] = float("-inf")
        return (q, k, v, None, torch.tensor([19, 11]), None, None, m, False, "inside", *no_window, 0.25)
    if kind == "window_alibi":
        return (q, k, v, torch.tensor([23, 9]), None, None, None, None, False, "inside", 5, 2,
                torch.rand(B, Hq, generator=g), 0.25)
    raise KeyError(kind)


OP_CASES = ["plain", "lengths", "spans", "spans_outside_bool_mask", "float_mask", "window_alibi"]


def compile_inputs(seed: int):
    """((q, k, v, kv_lengths, spans, float mask), upstream gradient) for the torch.compile tests."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, 37, 40, generator=g) for h in (4, 2, 2))
    kv_lengths = torch.randint(0, 38, (2,), generator=g)
    spans = torch.sort(torch.randint(0, 38, (2, 2, 2), generator=g), dim=-1).values
    mask = torch.randn(1, 1, 37, 37, generator=g)
    return (q, k, v, kv_lengths, spans, mask), torch.randn(2, 4, 37, 40, generator=g)
