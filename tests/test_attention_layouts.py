"""The padded and packed layouts mean the same attention: `fused_attention(q_lengths=, kv_lengths=)` on
right-padded (B, H, S, D) tensors equals `fused_attention_varlen` on the same tokens packed, output and
gradients, on every backend, for every option both accept (causal or not, a scale, GQA). With both
lengths given the causal diagonal is aligned on each row's real lengths (off_b = kv_len_b - q_len_b,
FlashAttention's varlen rule); with `kv_lengths` alone it stays on the padded sizes (Sk - Sq)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from masklm_kernels import fused_attention, fused_attention_varlen
from masklm_kernels.attention import masks

from helpers import assert_close

BACKENDS = ["reference", "cpu"] + (["triton", "triton-small-tiles"] if importlib.util.find_spec("triton") else [])


def _backend(name: str, monkeypatch) -> str:
    """The backend to name; "triton-small-tiles" is Triton with 16-wide tiles: many tiles per side, so the
    tile skipping and the full / partial classification are exercised along the shifted diagonal."""
    if name == "triton-small-tiles":
        from masklm_kernels.attention import triton_bwd, triton_fwd, triton_host

        small = lambda kernel, *a, **kw: triton_host.BlockConfig(16, 16, 4, 1)  # noqa: E731
        monkeypatch.setattr(triton_fwd, "block_config", small)
        monkeypatch.setattr(triton_bwd, "block_config", small)
        return "triton"
    return name


def test_both_lengths_align_the_diagonal_on_each_rows_real_lengths():
    # q length 5, key length 8, rows of 8: query 0 sees keys 0-3 (as FlashAttention's varlen does)
    vis = masks.visibility(1, 8, 8, causal=True, q_lengths=torch.tensor([5]), kv_lengths=torch.tensor([8]))[0, 0]
    assert vis[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert vis[4].all() and not vis[5:].any()
    # kv_lengths alone: the padded sizes (Sq = Sk: the top-left diagonal of self-attention)
    vis = masks.visibility(1, 8, 8, causal=True, kv_lengths=torch.tensor([5]))[0, 0]
    assert vis[0].nonzero().flatten().tolist() == [0]
    assert vis[7].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    # q longer than its keys: the first rows see nothing (bottom-right, as in the packed layout)
    vis = masks.visibility(1, 6, 6, causal=True, q_lengths=torch.tensor([6]), kv_lengths=torch.tensor([2]))[0, 0]
    assert vis.any(dim=1).tolist() == [False] * 4 + [True] * 2


def _pack(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) right-padded -> (sum(lengths), H, D)."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths.tolist())])


def _unpack_into(packed: torch.Tensor, lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for b, (a, n) in enumerate(zip(torch.cumsum(lengths, 0).sub(lengths).tolist(), lengths.tolist())):
        out[b, :, :n] = packed[a:a + n].transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_padded_with_both_lengths_equals_packed(backend, seed, monkeypatch):
    name, backend = backend, _backend(backend, monkeypatch)
    g = torch.Generator().manual_seed(seed)
    B, Sq, Sk = 4, (7, 19, 33)[seed % 3], (5, 19, 40)[seed // 2 % 3]
    Hkv, group, D = (1, 2)[seed % 2], (1, 3)[seed // 3 % 2], (16, 40)[seed % 2]
    causal, scale = seed % 3 != 2, (None, 0.3)[seed % 2]
    q_len = torch.randint(0, Sq + 1, (B,), generator=g)
    kv_len = torch.randint(0, Sk + 1, (B,), generator=g)
    q_len[0], kv_len[0] = Sq, Sk  # one full row; others shorter, longer or empty on either side
    q = torch.randn(B, Hkv * group, Sq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(B, Hkv * group, Sq, D, generator=g, dtype=torch.float64)
    # padding holds NaN: neither layout may read it
    pad_q = torch.arange(Sq)[None, None, :, None] >= q_len[:, None, None, None]
    pad_k = torch.arange(Sk)[None, None, :, None] >= kv_len[:, None, None, None]
    q, k, v = q.masked_fill(pad_q, float("nan")), k.masked_fill(pad_k, float("nan")), v.masked_fill(pad_k, float("nan"))

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return out, torch.autograd.grad(out, xs, out_grads(out))

    out_grads = lambda out: do.masked_fill(pad_q, 0.0)  # noqa: E731
    padded, (dq, dk, dv) = grads(lambda q, k, v: fused_attention(
        q, k, v, causal=causal, q_lengths=q_len, kv_lengths=kv_len, scale=scale, backend=backend), q, k, v)

    cu_q = torch.nn.functional.pad(q_len.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(kv_len.cumsum(0), (1, 0)).to(torch.int32)
    out_grads = lambda out: _pack(do, q_len)  # noqa: E731
    packed, (pq, pk, pv) = grads(lambda q, k, v: fused_attention_varlen(
        q, k, v, cu_q, cu_k, Sq, Sk, causal=causal, scale=scale, backend=backend),
        _pack(q, q_len), _pack(k, kv_len), _pack(v, kv_len))

    tol = dict(atol=1e-10, rtol=1e-9)
    assert_close(padded, _unpack_into(packed, q_len, padded), **tol, msg=f"{name} output")
    assert_close(dq, _unpack_into(pq, q_len, dq), **tol, msg=f"{name} dq")
    assert_close(dk, _unpack_into(pk, kv_len, dk), **tol, msg=f"{name} dk")
    assert_close(dv, _unpack_into(pv, kv_len, dv), **tol, msg=f"{name} dv")
