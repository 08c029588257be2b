"""Bad input to `fused_attention` gets a ValueError / TypeError whose message names the argument
(BRIEF.md, "Tests: how correctness is judged"). Each case runs on both backends: validation happens
before the backend is chosen, so the reference must refuse what the cpu backend refuses."""
from __future__ import annotations

import pytest
import torch

from masklm_kernels import fused_attention

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 8, 6, 16
BACKENDS = ("cpu", "reference")


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
    # backend
    case("backend-unknown", ValueError, r"backend must be one of.*'cpu'.*'reference'", backend="triton"),
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
