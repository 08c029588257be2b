"""Bad input to `fused_attention` gets a ValueError / TypeError whose message names the argument
(docs/TESTING.md). Each case runs on every backend: validation happens
before the backend is chosen, so all refuse the same inputs. Also `fused_attention_varlen`'s arguments."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import fused_attention, fused_attention_varlen

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 8, 6, 16
BACKENDS = ("cpu", "triton", "reference")  # triton: CPU tensors under the interpreter (conftest.py)


def _qkv(*, q_shape=(B, HQ, SQ, D), k_shape=(B, HKV, SK, D), v_shape=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    v_shape = k_shape if v_shape is None else v_shape
    return tuple(torch.randn(s, generator=g).to(dtype) for s in (q_shape, k_shape, v_shape))


def _t(*values, **kw):
    return torch.tensor(values, **kw)


DEFAULT = object()  # q / k / v not given: the valid tensors below


def case(id_, exc, match, *, q=DEFAULT, k=DEFAULT, v=DEFAULT, xfail=None, **kwargs):
    """One bad call: q, k, v default to valid (B, HQ, SQ, D) / (B, HKV, SK, D) float32 tensors."""
    marks = [pytest.mark.xfail(strict=True, reason=f"library bug: {xfail}")] if xfail else []
    return pytest.param(q, k, v, kwargs, exc, match, id=id_, marks=marks)


_Q, _K, _V = _qkv()
META = torch.device("meta")

CASES = [
    # q / k / v tensors
    case("q-not-tensor", TypeError, r"\bq\b.*torch\.Tensor", q=[[1.0]]),
    case("q-none", TypeError, r"\bq\b.*torch\.Tensor", q=None),
    case("k-numpy", TypeError, r"\bk\b.*torch\.Tensor", k=_K.numpy()),
    case("q-rank3", ValueError, r"\bq\b must be 4-D", q=_Q[0]),
    case("q-rank5", ValueError, r"\bq\b must be 4-D", q=_Q[None]),
    case("k-rank3", ValueError, r"\bk\b must be 4-D", k=_K[0]),
    case("v-rank2", ValueError, r"\bv\b must be 4-D", v=_V[0, 0]),
    case("k-head-dim", ValueError, r"\bk\b.*head_dim", k=_qkv(k_shape=(B, HKV, SK, 24))[1],
         v=_qkv(k_shape=(B, HKV, SK, 24))[2]),
    case("v-head-dim", ValueError, r"\bv\b", v=_qkv(k_shape=(B, HKV, SK, 24))[2]),
    case("k-batch", ValueError, r"\bk\b.*batch", k=_qkv(k_shape=(3, HKV, SK, D))[1],
         v=_qkv(k_shape=(3, HKV, SK, D))[2]),
    case("v-seq", ValueError, r"\bv\b.*shape", v=_qkv(k_shape=(B, HKV, SK + 1, D))[2]),
    case("k-dtype", TypeError, r"\bk\b.*dtype", k=_K.double()),
    case("v-dtype", TypeError, r"\bv\b.*dtype", v=_V.half()),
    case("q-int-dtype", TypeError, r"\bq\b.*float16, bfloat16, float32", q=_Q.int(), k=_K.int(), v=_V.int()),
    case("k-device", ValueError, r"\bk\b.*device", k=_K.to(META)),
    case("v-device", ValueError, r"\bv\b.*device", v=_V.to(META)),
    case("heads-not-multiple", ValueError, r"heads.*multiple", q=_qkv(q_shape=(B, 3, SQ, D))[0]),
    *(case(f"head-dim-{d}", ValueError, r"head_dim %d is not supported; supported: multiples of 8 from 16 to 256" % d,
           q=_qkv(q_shape=(B, HQ, SQ, d))[0], k=_qkv(k_shape=(B, HKV, SK, d))[1], v=_qkv(k_shape=(B, HKV, SK, d))[2])
      for d in (8, 12, 20, 260, 264)),
    # lengths
    case("kv_lengths-negative", ValueError, r"kv_lengths.*\[0, %d\]" % SK, kv_lengths=_t(-1, 3)),
    case("kv_lengths-above-Sk", ValueError, r"kv_lengths.*\[0, %d\]" % SK, kv_lengths=_t(SK + 1, 3)),
    case("q_lengths-above-Sq", ValueError, r"q_lengths.*\[0, %d\]" % SQ, q_lengths=_t(2, SQ + 1)),
    case("q_lengths-negative", ValueError, r"q_lengths", q_lengths=_t(-2, 1)),
    case("prefix_lengths-above-Sk", ValueError, r"prefix_lengths.*\[0, %d\]" % SK, causal=True,
         prefix_lengths=_t(SK + 1, 0)),
    case("prefix_lengths-negative", ValueError, r"prefix_lengths", causal=True, prefix_lengths=_t(0, -1)),
    case("kv_lengths-size", ValueError, r"kv_lengths.*shape \(2,\)", kv_lengths=_t(1, 2, 3)),
    case("kv_lengths-2d", ValueError, r"kv_lengths.*shape", kv_lengths=_t([1, 2])),
    case("q_lengths-size", ValueError, r"q_lengths.*shape", q_lengths=_t(1)),
    case("prefix_lengths-size", ValueError, r"prefix_lengths.*shape", causal=True, prefix_lengths=_t(1, 2, 3)),
    case("kv_lengths-float", TypeError, r"kv_lengths.*integer", kv_lengths=_t(1.0, 2.0)),
    case("q_lengths-float", TypeError, r"q_lengths.*integer", q_lengths=_t(1.0, 2.0)),
    case("prefix_lengths-float", TypeError, r"prefix_lengths.*integer", causal=True, prefix_lengths=_t(1.0, 2.0)),
    case("kv_lengths-bool", TypeError, r"kv_lengths.*integer", kv_lengths=_t(True, False)),
    case("kv_lengths-list", TypeError, r"kv_lengths.*torch\.Tensor", kv_lengths=[1, 2]),
    case("kv_lengths-device", ValueError, r"kv_lengths.*device", kv_lengths=_t(1, 2, device=META)),
    case("prefix_lengths-without-causal", ValueError, r"prefix_lengths.*causal=True", prefix_lengths=_t(1, 2)),
    # spans
    case("spans-start-after-end", ValueError, r"spans.*start <= end", spans=_t([3, 1], [0, 2])),
    case("spans-3d-start-after-end", ValueError, r"spans.*start <= end",
         spans=_t([[0, 1], [4, 2]], [[0, 2], [2, 2]])),
    case("spans-above-Sk", ValueError, r"spans.*\[0, %d\]" % SK, spans=_t([0, SK + 1], [0, 2])),
    case("spans-negative", ValueError, r"spans.*\[0, %d\]" % SK, spans=_t([-1, 2], [0, 2])),
    case("spans-shape-B3", ValueError, r"spans must have shape", spans=_t([0, 1, 2], [0, 1, 2])),
    case("spans-shape-1d", ValueError, r"spans must have shape", spans=_t(1, 2)),
    case("spans-wrong-batch", ValueError, r"spans must have shape", spans=_t([0, 2])),
    case("spans-4d", ValueError, r"spans must have shape", spans=torch.zeros(B, 1, 1, 2, dtype=torch.int64)),
    case("spans-float", TypeError, r"spans.*integer", spans=_t([0.0, 2.0], [0.0, 1.0])),
    case("span_mode-unknown", ValueError, r"span_mode.*inside.*outside", spans=_t([0, 2], [0, 1]), span_mode="middle"),
    case("span_mode-none", ValueError, r"span_mode", span_mode=None),
    # attn_mask
    case("attn_mask-not-broadcastable", ValueError, r"attn_mask.*broadcastable",
         attn_mask=torch.ones(3, SK, dtype=torch.bool)),
    case("attn_mask-heads", ValueError, r"attn_mask.*broadcastable",
         attn_mask=torch.ones(B, HKV, SQ, SK, dtype=torch.bool)),
    case("attn_mask-transposed", ValueError, r"attn_mask.*broadcastable", attn_mask=torch.zeros(SK, SQ)),
    case("attn_mask-5d", ValueError, r"attn_mask.*broadcastable",
         attn_mask=torch.ones(1, B, HQ, SQ, SK, dtype=torch.bool)),
    case("attn_mask-int64", TypeError, r"attn_mask.*bool.*floating", attn_mask=torch.ones(SQ, SK, dtype=torch.int64)),
    case("attn_mask-uint8", TypeError, r"attn_mask.*bool.*floating", attn_mask=torch.ones(SQ, SK, dtype=torch.uint8)),
    case("attn_mask-list", TypeError, r"attn_mask.*torch\.Tensor", attn_mask=[[True]]),
    case("attn_mask-device", ValueError, r"attn_mask.*device", attn_mask=torch.ones(SQ, SK, device=META)),
    # scalars
    case("scale-zero", ValueError, r"scale.*positive", scale=0.0),
    case("scale-negative", ValueError, r"scale.*positive", scale=-0.5),
    case("scale-int-zero", ValueError, r"scale.*positive", scale=0),
    case("scale-nan", ValueError, r"scale", scale=float("nan")),
    case("scale-inf", ValueError, r"scale", scale=float("inf")),
    case("scale-str", (TypeError, ValueError), r"scale", scale="0.1"),
    case("scale-bool", (TypeError, ValueError), r"scale", scale=True),
    case("scale-complex", (TypeError, ValueError), r"scale", scale=1 + 1j),
    case("causal-int", TypeError, r"causal must be a bool", causal=1),
    case("causal-none", TypeError, r"causal must be a bool", causal=None),
    case("causal-str", TypeError, r"causal must be a bool", causal="yes"),
    case("causal-tensor", TypeError, r"causal must be a bool", causal=torch.tensor(True)),
    # sliding window, ALiBi
    case("window-int", TypeError, r"window_size must be a \(left, right\) pair", window_size=4),
    case("window-triple", TypeError, r"window_size must be a \(left, right\) pair", window_size=(1, 2, 3)),
    case("window-below-minus-one", ValueError, r"window_size\[0\]", window_size=(-2, 3)),
    case("window-float", TypeError, r"window_size\[1\] must be an int", window_size=(3, 1.5)),
    case("window-bool", TypeError, r"window_size\[0\] must be an int", window_size=(True, 1)),
    case("alibi-shape", ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)", alibi_slopes=torch.ones(HKV)),
    case("alibi-dtype", TypeError, r"alibi_slopes must be float32", alibi_slopes=torch.ones(HQ, dtype=torch.float64)),
    case("alibi-list", TypeError, r"alibi_slopes must be a torch\.Tensor", alibi_slopes=[0.5] * HQ),
    case("alibi-nan", ValueError, r"alibi_slopes must be finite", alibi_slopes=torch.full((B, HQ), float("nan"))),
    case("alibi-device", ValueError, r"alibi_slopes.*device", alibi_slopes=torch.ones(HQ, device=META)),
    # backend
    case("backend-unknown", ValueError, r"backend must be one of.*'cpu'.*'triton'.*'reference'", backend="flash"),
    case("backend-none", TypeError, r"backend must be a string", backend=None),
]


@pytest.mark.parametrize("q, k, v, kwargs, exc, match", CASES)
def test_bad_input_is_refused_naming_the_argument(q, k, v, kwargs, exc, match):
    q, k, v = (default if t is DEFAULT else t for t, default in ((q, _Q), (k, _K), (v, _V)))
    backends = (kwargs.pop("backend"),) if "backend" in kwargs else BACKENDS
    for backend in backends:
        with pytest.raises(exc, match=match):
            fused_attention(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize("name", ["kv_lengths", "q_lengths", "attn_mask"])
def test_device_mismatch_message_names_the_expected_device(name):
    value = torch.ones(SQ, SK, device=META) if name == "attn_mask" else torch.ones(B, dtype=torch.int64, device=META)
    with pytest.raises(ValueError, match=name) as info:
        fused_attention(_Q, _K, _V, backend="cpu", **{name: value})
    assert "input_ids" not in str(info.value), str(info.value)


def test_valid_edge_values_are_accepted():
    """The bounds themselves are valid: lengths 0 and S, empty spans [s, s), spans ending at Sk, a 1-D
    (Sk,) mask, a float mask of another float dtype, an int scale."""
    for backend in BACKENDS:
        out = fused_attention(_Q, _K, _V, causal=True, kv_lengths=_t(0, SK), q_lengths=_t(SQ, 0),
                              prefix_lengths=_t(SK, 0), spans=_t([[2, 2], [0, SK]], [[SK, SK], [1, 3]]),
                              span_mode="outside", attn_mask=torch.zeros(SK, dtype=torch.float64), scale=1,
                              backend=backend)
        assert out.shape == _Q.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# fused_attention_varlen
# ------------------------------------------------------------------------------------------------

_CU = torch.tensor([0, 3, 8], dtype=torch.int32)  # two sequences of 3 and 5 tokens
_QV, _KV = torch.randn(8, HQ, D), torch.randn(8, HKV, D)


def vcase(id_, exc, match, *, q=_QV, k=_KV, v=_KV, cu_q=_CU, cu_k=_CU, max_q=5, max_k=5, **kwargs):
    return pytest.param(q, k, v, cu_q, cu_k, max_q, max_k, kwargs, exc, match, id=id_)


VARLEN_CASES = [
    vcase("q-4d", ValueError, r"\bq\b must be 3-D", q=_Q),
    vcase("k-dtype", TypeError, r"\bk\b must have the dtype of q", k=_KV.double(), v=_KV.double()),
    vcase("heads", ValueError, r"multiple of k/v's heads", q=torch.randn(8, 3, D)),
    vcase("head_dim", ValueError, r"head_dim", q=torch.randn(8, HQ, 12), k=torch.randn(8, HKV, 12),
          v=torch.randn(8, HKV, 12)),
    vcase("cu-int64", TypeError, r"cu_seqlens_q must be an int32", cu_q=_CU.long()),
    vcase("cu-float", TypeError, r"cu_seqlens_k must be an int32", cu_k=_CU.float()),
    vcase("cu-2d", ValueError, r"cu_seqlens_q must be 1-D", cu_q=_CU[None]),
    vcase("cu-not-tensor", TypeError, r"cu_seqlens_q must be a torch.Tensor", cu_q=[0, 3, 8]),
    vcase("cu-start", ValueError, r"cu_seqlens_q must start at 0", cu_q=torch.tensor([1, 3, 8], dtype=torch.int32)),
    vcase("cu-decreasing", ValueError, r"cu_seqlens_k .*never decrease",
          cu_k=torch.tensor([0, 6, 5, 8], dtype=torch.int32),
          cu_q=torch.tensor([0, 3, 3, 8], dtype=torch.int32)),
    vcase("cu-end", ValueError, r"cu_seqlens_q .*end at the number of tokens \(8\)",
          cu_q=torch.tensor([0, 3, 7], dtype=torch.int32)),
    vcase("cu-length-mismatch", ValueError, r"same length", cu_k=torch.tensor([0, 8], dtype=torch.int32), max_k=8),
    vcase("cu-device", ValueError, r"cu_seqlens_q must be on the same device as q", cu_q=_CU.to("meta")),
    vcase("max-too-small", ValueError, r"longer \(5\) than its max_seqlen \(4\)", max_q=4),
    vcase("max-negative", ValueError, r"max_seqlen_k", max_k=-1),
    vcase("max-float", TypeError, r"max_seqlen_q must be an int", max_q=5.0),
    vcase("causal-int", TypeError, r"causal must be a bool", causal=1),
    vcase("scale-zero", ValueError, r"scale", scale=0.0),
    vcase("window", ValueError, r"window_size\[1\]", window_size=(2, -5)),
    vcase("alibi-batch", ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)",
          alibi_slopes=torch.ones(3, HQ)),
    vcase("backend-unknown", ValueError, r"backend must be one of", backend="flash"),
]


@pytest.mark.parametrize("q, k, v, cu_q, cu_k, max_q, max_k, kwargs, exc, match", VARLEN_CASES)
def test_varlen_bad_input_is_refused_naming_the_argument(q, k, v, cu_q, cu_k, max_q, max_k, kwargs, exc, match):
    backends = (kwargs.pop("backend"),) if "backend" in kwargs else BACKENDS
    for backend in backends:
        with pytest.raises(exc, match=match):
            fused_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, **kwargs)
