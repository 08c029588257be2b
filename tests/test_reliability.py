"""Reliability: no public call crashes the process or touches memory outside its tensors, bad input is
rejected by name, and every backend treats non-finite values the same way.

* The bad-input / edge-input sweep (tests/reliability_cases.py) runs in a child process: a case that kills
  it is named; every "reject" case must raise ValueError / TypeError naming the argument, every "ok" case
  must return. The counts per backend are printed (tried / rejected clearly / crashed / silent).
* Non-finite values, every backend against the reference: keys, values and query rows hidden by the
  metadata (padding, outside the spans) are inert whatever they hold; a NaN a query can see makes that
  query's output NaN; spans of shape (B, 0, 2) mean the same everywhere; -inf logits give what
  F.cross_entropy gives.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from masklm_kernels import fused_attention, fused_attention_varlen, fused_linear_cross_entropy, masked_cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("cpu", "triton", "reference")


def test_bad_input_sweep_never_crashes_and_rejects_by_name():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "reliability_cases.py")], capture_output=True, text=True,
                       env=env, timeout=900, cwd=os.path.dirname(HERE))
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    started = {e["index"]: e for e in events if e["event"] == "start"}
    ended = {e["index"]: e for e in events if e["event"] == "end"}
    crashed = [started[i] for i in started if i not in ended]
    assert r.returncode == 0 and not crashed, (f"the sweep process died (exit {r.returncode}) in "
                                               f"{crashed[:1]}:\n{r.stderr[-3000:]}")
    counts = collections.defaultdict(collections.Counter)
    wrong = []
    for e in ended.values():
        key = f"{e['op']}[{e['backend']}]"
        counts[e["backend"]]["tried"] += 1
        if e["outcome"] == "rejected" and e["expect"] == "reject" and any(n in e["msg"] for n in e["names"]):
            counts[e["backend"]]["rejected clearly"] += 1
        elif e["outcome"] == "ok" and e["expect"] == "ok":
            counts[e["backend"]]["edge input handled"] += 1
        else:
            counts[e["backend"]]["silent" if e["outcome"] == "ok" else "wrong error"] += 1
            wrong.append(f"{key} {e['case']}: expected {e['expect']}, got {e['outcome']} {e['exc']}: {e['msg'][:300]}")
    print("\n" + "\n".join(f"{b}: {dict(c)}, crashed: 0" for b, c in sorted(counts.items())))
    assert len(ended) > 100
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------------ attention

def _backend_ok(backend):
    from masklm_kernels._backends import triton_interpreting

    if backend == "triton" and not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("triton needs a CUDA device or the interpreter")


def _run(backend, q, k, v, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fused_attention(q, k, v, backend=backend, **kw)
    out.backward(torch.ones_like(out))
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(seed=0, B=2, H=2, S=40, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3)]


HIDDEN_KINDS = {
    "padding": dict(kv_lengths=torch.tensor([30, 17]), q_lengths=torch.tensor([25, 40]), causal=True),
    "spans_outside": dict(spans=torch.tensor([[5, 20], [0, 33]]), span_mode="outside",
                          kv_lengths=torch.tensor([38, 40]), q_lengths=torch.tensor([31, 40])),
    "spans_inside": dict(spans=torch.tensor([[5, 20], [3, 33]]), span_mode="inside", causal=True),
}


def _hidden_positions(kw, S=40):
    """(keys, query rows) of batch row 0 that the lengths and spans exclude (causal and prefix aside)."""
    j = torch.arange(S)
    keys = j >= kw.get("kv_lengths", torch.tensor([S]))[0]
    rows = j >= kw.get("q_lengths", torch.tensor([S]))[0]
    if "spans" in kw:
        start, end = kw["spans"][0].tolist()
        in_span = (j >= start) & (j < end)
        keys |= ~in_span if kw["span_mode"] == "inside" else in_span
        rows |= ~in_span if kw["span_mode"] == "inside" else torch.zeros_like(rows)
    return keys.nonzero().flatten(), rows.nonzero().flatten()


@pytest.mark.parametrize("kind", sorted(HIDDEN_KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_hidden_keys_values_and_queries_are_inert(backend, kind, poison):
    """NaN / inf in every key, value and query row the metadata hides (and in the output gradient of the
    hidden rows): outputs and gradients equal the clean run's, on every backend."""
    _backend_ok(backend)
    kw = HIDDEN_KINDS[kind]
    q, k, v = _inputs(1)
    keys, rows = _hidden_positions(kw)
    assert keys.numel() and rows.numel()  # the case hides both
    clean = _run(backend, q, k, v, **kw)
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    kp[0, :, keys] = poison
    vp[0, :, keys] = poison
    qp[0, :, rows] = poison
    dirty = _run(backend, qp, kp, vp, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), dirty, clean):
        assert torch.isfinite(a).all(), f"{backend} {kind}: non-finite {name} from hidden positions"
        torch.testing.assert_close(a, b, msg=f"{backend} {kind}: {name} changed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_visible_nan_reaches_every_output_that_sees_it(backend, where):
    _backend_ok(backend)
    kw = dict(causal=True, kv_lengths=torch.tensor([30, 40]))
    q, k, v = _inputs(2)
    dict(q=q, k=k, v=v)[where][0, 1, 12, 3] = float("nan")
    out = _run(backend, q, k, v, **kw)[0]
    if where == "q":
        sees = out[0, 1, 12]
    elif where == "k":  # key 12 is visible to queries 12.. of row 0 (causal, Sq = Sk), head 1
        sees = out[0, 1, 12:]
    else:  # a NaN in one component of a value reaches that component of the outputs
        sees = out[0, 1, 12:, 3]
    assert torch.isnan(sees).all(), f"{backend}: NaN in a visible {where} did not reach the outputs that see it"
    assert torch.isfinite(out[1]).all(), f"{backend}: NaN spread to another batch row"
    assert torch.isfinite(out[0, 0]).all(), f"{backend}: NaN spread to another head"


@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_zero_spans_mean_the_same_on_every_backend(mode):
    q, k, v = _inputs(3)
    spans = torch.zeros(2, 0, 2, dtype=torch.long)
    ref = _run("reference", q, k, v, spans=spans, span_mode=mode)
    for backend in ("cpu", "triton"):
        _backend_ok(backend)
        for name, a, b in zip(("out", "dq", "dk", "dv"), _run(backend, q, k, v, spans=spans, span_mode=mode), ref):
            torch.testing.assert_close(a, b, msg=f"{backend} {mode}: {name}")
    assert (ref[0] == 0).all() if mode == "inside" else (ref[0] != 0).any()


def test_varlen_tokens_outside_every_sequence_read_zero_on_the_triton_op():
    """cu_seqlens that cover only part of the tokens (bad metadata below the API's check): the uncovered
    rows are 0 and their gradients 0, not uninitialised memory."""
    from masklm_kernels.attention import ops

    _backend_ok("triton")
    q = torch.full((10, 2, 16), float("nan"), dtype=torch.float64)
    q[:9] = torch.randn(9, 2, 16, dtype=torch.float64)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, _ = ops.VARLEN_FORWARD["triton"](q, q, q, cu, cu, 5, 5, True, -1, -1, None, 0.25)
    assert (out[9] == 0).all() and torch.isfinite(out[:9]).all()
    ref = fused_attention_varlen(q[:9], q[:9], q[:9], cu, cu, 5, 5, causal=True, scale=0.25, backend="reference")
    torch.testing.assert_close(out[:9], ref)


# ------------------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_minus_infinity_logits_behave_as_in_torch(backend, label_smoothing, reduction):
    """A -inf logit of a class that is not the target: finite loss without smoothing, inf with it (the
    smoothing term averages every log-probability); a -inf target logit: inf. Gradients as torch's."""
    _backend_ok(backend)
    x = torch.randn(4, 9, dtype=torch.float64)
    x[0, 2] = x[1, 3] = x[3, 0] = float("-inf")
    y = torch.tensor([1, 3, 4, -100])
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, y, label_smoothing=label_smoothing, reduction=reduction)
    ref.sum().backward()
    xb = x.clone().requires_grad_()
    out = masked_cross_entropy(xb, y, label_smoothing=label_smoothing, reduction=reduction, backend=backend)
    out.sum().backward()
    torch.testing.assert_close(out, ref.to(out.dtype), equal_nan=False)
    finite = torch.isfinite(ref) if ref.dim() else torch.isfinite(ref)[None]
    if bool(finite.all()):  # torch's gradient is defined: ours must equal it
        torch.testing.assert_close(xb.grad, xr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_with_minus_infinity_bias_is_finite_as_in_torch(backend):
    _backend_ok(backend)
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    b = torch.zeros(11, dtype=torch.float64)
    b[7] = float("-inf")  # a class the head can never predict
    y = torch.tensor([1, 2, -100, 3, 4, 5])
    ref = F.cross_entropy(F.linear(h, w, b), y)
    out = fused_linear_cross_entropy(h, w, y, bias=b, backend=backend)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------------ switches, grid

_MASK = ("import torch; from masklm_kernels import mask_tokens; "
         "mask_tokens(torch.full((2, 8), 7), mask_token_id=3, vocab_size=10, backend='cpu'); print('ran')")


@pytest.mark.parametrize("name, value", [("MASKLM_NO_EXTENSION", "maybe"), ("MASKLM_CPU_ISA", "avx5")])
def test_an_invalid_environment_switch_is_an_error_naming_it(name, value):
    env = {**os.environ, name: value}
    r = subprocess.run([sys.executable, "-c", _MASK], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and f"{name}={value!r}" in r.stderr, r.stderr[-2000:]
    info = subprocess.run([sys.executable, "-m", "masklm_kernels.info"], capture_output=True, text=True, env=env)
    assert info.returncode == 0 and "INVALID" in info.stdout and name in info.stdout


@pytest.mark.parametrize("value, loaded", [("false", "yes"), ("off", "yes"), ("0", "yes"), ("1", "no"), ("yes", "no")])
def test_switch_values_mean_what_they_say(value, loaded):
    env = {**os.environ, "MASKLM_NO_EXTENSION": value}
    info = subprocess.run([sys.executable, "-m", "masklm_kernels.info"], capture_output=True, text=True, env=env)
    line = next(x for x in info.stdout.splitlines() if x.strip().startswith("loaded"))
    assert line.split()[1].startswith(loaded), line


def test_grid_limits_are_a_reason_not_a_launch_failure():
    """65,536 batch rows: more than CUDA's grid axis 1 takes. The triton backend refuses by name; auto runs
    the cpu backend on CPU tensors."""
    from masklm_kernels import BackendUnavailableError

    _backend_ok("triton")
    q = torch.randn(65536, 1, 1, 16)
    with pytest.raises(BackendUnavailableError, match="batch 65536 is above the CUDA grid limit"):
        fused_attention(q, q, q, backend="triton")
