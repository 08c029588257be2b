"""The bad-input and edge-input sweep of tests/test_reliability.py, as a table, and its runner.

Each case calls one public op (or, for the memory-safety cases, a custom op directly, below the API's
checks) with one bad or edge input on one backend, and says what must happen: "reject" (a ValueError or
TypeError naming the argument in `names`) or "ok" (returns without error: empty inputs, clamped metadata).
The runner executes every case in one child process, printing a JSON line before and after each, so that a
case that kills the process (a signal, a segfault) is named by the last "start" without its "end":

    python tests/reliability_cases.py [START]  # one JSON line per event, from case START; TRITON_INTERPRET=1
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from typing import Callable

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton imports: triton on CPU tensors

import torch


@dataclasses.dataclass
class Case:
    op: str
    backend: str
    name: str
    fn: Callable[[], object]
    expect: str  # "reject" or "ok"
    names: tuple[str, ...] = ()  # a rejection's message must contain one of these (the argument's name)


def _qkv(B=2, H=2, Sq=8, Sk=8, D=16, dtype=torch.float32, Hk=None):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Sq, D, generator=g, dtype=dtype),
            torch.randn(B, Hk or H, Sk, D, generator=g, dtype=dtype),
            torch.randn(B, Hk or H, Sk, D, generator=g, dtype=dtype))


def attention_cases() -> list[Case]:
    from masklm_kernels import fused_attention, fused_attention_varlen

    out = []
    for be in ("cpu", "triton", "reference"):
        def att(*shape_kw, be=be, **kw):
            q, k, v = _qkv(**(shape_kw[0] if shape_kw else {}))
            return lambda: fused_attention(q, k, v, backend=be, **kw)

        def grad(be=be, **shape):
            def run():
                q, k, v = (t.requires_grad_() for t in _qkv(**shape))
                fused_attention(q, k, v, causal=True, backend=be).sum().backward()
            return run

        out += [
            Case("fused_attention", be, "Sq=0", att(dict(Sq=0)), "ok"),
            Case("fused_attention", be, "Sk=0", att(dict(Sk=0), causal=True), "ok"),
            Case("fused_attention", be, "B=0", att(dict(B=0)), "ok"),
            Case("fused_attention", be, "Sq=0 backward", grad(Sq=0), "ok"),
            Case("fused_attention", be, "B=0 backward", grad(B=0), "ok"),
            Case("fused_attention", be, "zero heads", att(dict(H=0)), "reject", ("head",)),
            Case("fused_attention", be, "heads not a multiple", att(dict(H=3, Hk=2)), "reject", ("heads",)),
            Case("fused_attention", be, "head_dim 12", att(dict(D=12)), "reject", ("head_dim",)),
            Case("fused_attention", be, "int q", lambda be=be: fused_attention(*(t.long() for t in _qkv()), backend=be),
                 "reject", ("q",)),
            Case("fused_attention", be, "kv_lengths > Sk", att(kv_lengths=torch.tensor([9, 1])), "reject",
                 ("kv_lengths",)),
            Case("fused_attention", be, "negative q_lengths", att(q_lengths=torch.tensor([-1, 1])), "reject",
                 ("q_lengths",)),
            Case("fused_attention", be, "float kv_lengths", att(kv_lengths=torch.tensor([1.0, 2.0])), "reject",
                 ("kv_lengths",)),
            Case("fused_attention", be, "spans past Sk", att(spans=torch.tensor([[0, 9], [0, 1]])), "reject",
                 ("spans",)),
            Case("fused_attention", be, "spans start > end", att(spans=torch.tensor([[5, 2], [0, 1]])), "reject",
                 ("spans",)),
            Case("fused_attention", be, "spans (B, 0, 2)", att(spans=torch.zeros(2, 0, 2, dtype=torch.long)), "ok"),
            Case("fused_attention", be, "prefix without causal", att(prefix_lengths=torch.tensor([1, 1])), "reject",
                 ("prefix_lengths",)),
            Case("fused_attention", be, "scale nan", att(scale=float("nan")), "reject", ("scale",)),
            Case("fused_attention", be, "scale 0", att(scale=0.0), "reject", ("scale",)),
            Case("fused_attention", be, "mask shape", att(attn_mask=torch.ones(3, 1, 8, 8, dtype=torch.bool)),
                 "reject", ("attn_mask",)),
            Case("fused_attention", be, "int mask", att(attn_mask=torch.ones(8, 8, dtype=torch.long)), "reject",
                 ("attn_mask",)),
            Case("fused_attention", be, "causal not bool", att(causal=1), "reject", ("causal",)),
            Case("fused_attention", be, "span_mode", att(spans=torch.tensor([[0, 1], [0, 1]]), span_mode="in"),
                 "reject", ("span_mode",)),
        ]

        def varlen(cu, max_q=8, total=10, be=be):
            q = torch.randn(total, 2, 16)
            return lambda: fused_attention_varlen(q, q, q, cu, cu, max_q, max_q, backend=be)

        out += [
            Case("fused_attention_varlen", be, "cu past the tokens",
                 varlen(torch.tensor([0, 4, 4000], dtype=torch.int32)), "reject", ("cu_seqlens",)),
            Case("fused_attention_varlen", be, "cu short of the tokens",
                 varlen(torch.tensor([0, 4, 9], dtype=torch.int32)), "reject", ("cu_seqlens",)),
            Case("fused_attention_varlen", be, "cu decreasing", varlen(torch.tensor([0, 6, 4, 10], dtype=torch.int32)),
                 "reject", ("cu_seqlens",)),
            Case("fused_attention_varlen", be, "cu int64", varlen(torch.tensor([0, 4, 10])), "reject", ("cu_seqlens",)),
            Case("fused_attention_varlen", be, "max_seqlen 2**40",
                 varlen(torch.tensor([0, 4, 10], dtype=torch.int32), max_q=2**40), "ok"),
            Case("fused_attention_varlen", be, "max_seqlen too small",
                 varlen(torch.tensor([0, 4, 10], dtype=torch.int32), max_q=3), "reject", ("max_seqlen",)),
            Case("fused_attention_varlen", be, "no tokens", varlen(torch.tensor([0, 0], dtype=torch.int32), 0, 0),
                 "ok"),
        ]
    return out


def memory_safety_cases() -> list[Case]:
    """The varlen custom ops called directly (below the API's checks) with cu_seqlens that would address
    outside the tensors: the kernels clamp them; nothing outside q/k/v is read or written."""
    from masklm_kernels.attention import ops

    def direct(backend, cu_list, total=10, max_q=8):
        def run():
            q = torch.randn(total, 2, 16, dtype=torch.float64)
            cu = torch.tensor(cu_list, dtype=torch.int32)
            out, _ = ops.VARLEN_FORWARD[backend](q, q, q, cu, cu, max_q, max_q, True, -1, -1, None, 0.25)
            assert torch.isfinite(out).all(), "non-finite output from clamped metadata"
            return out
        return run

    out = []
    for cu in ([0, 4, 4000], [0, 4, 9], [-50, 4, 10], [0, 9, 3], [0, 2**30, 2**31 - 1]):
        out.append(Case("attention_varlen_triton_fwd", "triton", f"cu={cu}", direct("triton", cu), "ok"))
    return out


def loss_cases() -> list[Case]:
    from masklm_kernels import fused_linear_cross_entropy, masked_cross_entropy

    out = []
    x, y = torch.randn(6, 11), torch.tensor([1, 2, -100, 3, 4, 5])
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    for be in ("cpu", "triton", "reference"):
        def ce(be=be, xx=x, yy=y, **kw):
            return lambda: masked_cross_entropy(xx, yy, backend=be, **kw)

        def lce(be=be, yy=y, **kw):
            return lambda: fused_linear_cross_entropy(h, w, yy, backend=be, **kw)

        out += [
            Case("masked_cross_entropy", be, "num_items tensor 0", ce(num_items=torch.tensor(0)), "reject",
                 ("num_items",)),
            Case("masked_cross_entropy", be, "num_items inf", ce(num_items=float("inf")), "reject", ("num_items",)),
            Case("masked_cross_entropy", be, "num_items nan tensor", ce(num_items=torch.tensor(float("nan"))), "reject",
                 ("num_items",)),
            Case("masked_cross_entropy", be, "z_loss inf", ce(z_loss=float("inf")), "reject", ("z_loss",)),
            Case("masked_cross_entropy", be, "label_smoothing nan", ce(label_smoothing=float("nan")), "reject",
                 ("label_smoothing",)),
            Case("masked_cross_entropy", be, "label out of range", ce(yy=torch.tensor([1, 2, -100, 3, 4, 11])),
                 "reject", ("labels",)),
            Case("masked_cross_entropy", be, "N=0", ce(xx=torch.randn(0, 11), yy=torch.zeros(0, dtype=torch.long)),
                 "ok"),
            Case("masked_cross_entropy", be, "reduction", ce(reduction="avg"), "reject", ("reduction",)),
            Case("fused_linear_cross_entropy", be, "num_items 0", lce(num_items=0), "reject", ("num_items",)),
            Case("fused_linear_cross_entropy", be, "z_loss inf", lce(z_loss=float("inf")), "reject", ("z_loss",)),
            Case("fused_linear_cross_entropy", be, "label out of range", lce(yy=torch.tensor([1, 2, -100, 3, 4, -7])),
                 "reject", ("labels",)),
        ]
    return out


def masking_cases() -> list[Case]:
    from masklm_kernels import mask_tokens, mass_mask

    out = []
    ids32 = torch.randint(5, 100, (2, 8), dtype=torch.int32)
    ids = ids32.long()
    for be in ("cpu", "reference"):
        def mt(be=be, ii=ids, **kw):
            base = dict(mask_token_id=3, vocab_size=100)
            return lambda: mask_tokens(ii, backend=be, **{**base, **kw})

        out += [
            Case("mask_tokens", be, "int32 ids, ignore_index 2**40", mt(ii=ids32, ignore_index=2**40), "reject",
                 ("ignore_index",)),
            Case("mask_tokens", be, "int32 ids, mask_token_id 2**32+7",
                 mt(ii=ids32, mask_token_id=2**32 + 7, vocab_size=2**33), "reject", ("vocab_size", "mask_token_id")),
            Case("mask_tokens", be, "int32 ids, vocab_size 2**33", mt(ii=ids32, vocab_size=2**33), "reject",
                 ("vocab_size",)),
            Case("mask_tokens", be, "special ids tensor out of range",
                 mt(special_token_ids=torch.tensor([0, 100])), "reject", ("special_token_ids",)),
            Case("mask_tokens", be, "special list out of range", mt(special_token_ids=[0, 5, 100]), "reject",
                 ("special_token_ids[2]",)),
            Case("mask_tokens", be, "every id special", mt(vocab_size=4, mask_token_id=3, ii=ids % 4,
                                                        special_token_ids=[0, 1, 2, 3]), "reject",
                 ("special_token_ids",)),
            Case("mask_tokens", be, "ids >= vocab_size", mt(ii=ids + 100), "reject", ("input_ids",)),
            Case("mask_tokens", be, "negative ids", mt(ii=ids - 200), "reject", ("input_ids",)),
            Case("mask_tokens", be, "lengths > S", mt(lengths=torch.tensor([9, 1])), "reject", ("lengths",)),
            Case("mask_tokens", be, "B=0", mt(ii=torch.zeros(0, 8, dtype=torch.long)), "ok"),
            Case("mask_tokens", be, "S=0", mt(ii=torch.zeros(2, 0, dtype=torch.long)), "ok"),
            Case("mass_mask", be, "ids >= vocab_size",
                 lambda be=be: mass_mask(ids + 100, lengths=torch.tensor([8, 8]), mask_token_id=3, vocab_size=100,
                                         backend=be), "reject", ("input_ids",)),
            Case("mass_mask", be, "int32 ids, ignore_index 2**40",
                 lambda be=be: mass_mask(ids32, lengths=torch.tensor([8, 8]), mask_token_id=3, vocab_size=100,
                                         ignore_index=2**40, backend=be), "reject", ("ignore_index",)),
        ]
    return out


def model_cases() -> list[Case]:
    from masklm_kernels.models import BertMLM, model_config

    def bert(lengths):
        def run():
            m = BertMLM(model_config("tiny", vocab_size=50), implementation="fused")
            ids = torch.randint(5, 50, (2, 8))
            return m(ids, ids, lengths=lengths)
        return run

    return [Case("BertMLM", "fused", "lengths > S", bert(torch.tensor([9, 3])), "reject", ("lengths",)),
            Case("BertMLM", "fused", "negative lengths", bert(torch.tensor([-1, 3])), "reject", ("lengths",)),
            Case("BertMLM", "fused", "float lengths", bert(torch.tensor([1.0, 3.0])), "reject", ("lengths",))]


def all_cases() -> list[Case]:
    return attention_cases() + memory_safety_cases() + loss_cases() + masking_cases() + model_cases()


def run_case(c: Case) -> dict:
    try:
        c.fn()
        outcome, exc, msg = "ok", None, ""
    except (ValueError, TypeError) as e:
        outcome, exc, msg = "rejected", type(e).__name__, str(e)
    except Exception as e:  # noqa: BLE001 - any other exception is a finding
        outcome, exc, msg = "other", type(e).__name__, f"{e}\n{traceback.format_exc()[-1500:]}"
    return dict(op=c.op, backend=c.backend, case=c.name, expect=c.expect, names=list(c.names), outcome=outcome,
                exc=exc, msg=msg[:2000])


def main() -> int:
    start = int(sys.argv[1]) if len(sys.argv) > 1 else 0  # resume after a case that killed the process
    for i, c in enumerate(all_cases()):
        if i < start:
            continue
        print(json.dumps(dict(event="start", index=i, op=c.op, backend=c.backend, case=c.name)), flush=True)
        print(json.dumps(dict(event="end", index=i, **run_case(c))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
