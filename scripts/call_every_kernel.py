"""Calls every GPU kernel of the library once, on small but non-trivial inputs, and checks each result
against the reference backend: the program compute-sanitizer (memcheck, racecheck) runs in the GPU check
(scripts/gpu_check.sh). Out-of-bounds accesses and races show in the sanitizer's report; a wrong result
makes this program exit non-zero by itself.

    python scripts/call_every_kernel.py          # CUDA tensors: the CUDA C++ and Triton kernels
    python scripts/call_every_kernel.py --tiny   # no GPU: CPU tensors, Triton under its interpreter

Kernels: masking (every mode: token, exact, whole-word, spans, per-row and per-token rates; MASS
fragments; T5 span corruption; BART infilling), attention forward and backward for every mask kind (none, causal,
padding, prefix-LM, spans inside and outside, bool and float dense masks, GQA, Sq != Sk, attention
dropout, sliding windows and ALiBi) and the packed varlen layout (with dropout; with a window), the
masked cross-entropy (gradient buffer and in place) and the fused linear cross-entropy (with and without
the labelled-row bound). Sizes are odd on purpose: partial tiles on every side.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="smaller shapes (CPU, Triton's interpreter)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before masklm_kernels imports triton
    from masklm_kernels import (
        bart_infill,
        fused_attention,
        fused_attention_varlen,
        fused_linear_cross_entropy,
        mask_tokens,
        masked_cross_entropy,
        mass_mask,
        t5_span_corruption,
    )

    dev = "cuda" if cuda else "cpu"
    mask_backend = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(0)
    called = 0
    failures: list[str] = []

    def check(name, ours, ref, atol):
        nonlocal called
        called += 1
        ours, ref = [t if isinstance(t, (tuple, list)) else (t,) for t in (ours, ref)]
        for i, (a, b) in enumerate(zip(ours, ref)):
            a, b = a.detach().double().cpu(), b.detach().double().cpu()
            if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=atol, equal_nan=True):
                err = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {a.shape} / {b.shape}"
                failures.append(f"{name}[{i}]: max |diff| {err}")

    # masking: every mode, the device kernel against the reference, bit for bit
    B, S, V = (3, 37, 1000) if args.tiny else (9, 301, 30522)
    ids = torch.randint(5, V, (B, S), generator=g)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    words = torch.cumsum(torch.randint(0, 2, (B, S), generator=g), 1)
    modes = {"token": {}, "exact": dict(exact=True), "whole_word": dict(word_ids=words),
             "spans": dict(span_lengths=True), "row_rates": dict(mlm_probability=torch.rand(B, generator=g)),
             "token_rates": dict(mlm_probability=torch.rand(B, S, generator=g) * 0.5)}
    for mode, kw in modes.items():
        common = dict(mask_token_id=4, vocab_size=V, lengths=lengths, special_token_ids=[0, 1], seed=7, step=3)
        dkw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in {**common, **kw}.items()}
        ours = mask_tokens(ids.to(dev), **dkw, backend=mask_backend)
        check(f"mask_tokens {mode}", ours, mask_tokens(ids, **common, **kw, backend="reference"), 0)
    ours = mass_mask(ids.to(dev), lengths=lengths.to(dev), mask_token_id=4, vocab_size=V, backend=mask_backend)
    check("mass_mask", ours, mass_mask(ids, lengths=lengths, mask_token_id=4, vocab_size=V, backend="reference"), 0)
    t5 = dict(vocab_size=V + 100, sentinel_start_id=V + 99, eos_token_id=1, lengths=lengths, seed=3, step=1)
    dt5 = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in t5.items()}
    ours = t5_span_corruption(ids.to(dev), **dt5, backend=mask_backend)
    check("t5_span_corruption", tuple(ours), tuple(t5_span_corruption(ids, **t5, backend="reference")), 0)
    for replace_length in (-1, 0, 1):
        bart = dict(vocab_size=V, mask_token_id=4, decoder_start_token_id=2, lengths=lengths, seed=3, step=1,
                    replace_length=replace_length, random_ratio=0.2, poisson_lambda=2.0 + replace_length)
        dbart = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in bart.items()}
        ours = bart_infill(ids.to(dev), **dbart, backend=mask_backend)
        check(f"bart_infill replace_length={replace_length}", tuple(ours),
              tuple(bart_infill(ids, **bart, backend="reference")), 0)

    # attention: every mask kind, forward and backward
    Bq, Hq, Hkv, Sq, Sk, D = (2, 4, 2, 45, 53, 40) if args.tiny else (3, 8, 2, 333, 397, 64)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tol = 2e-3 if args.tiny else 6e-2

    def qkv(sq, sk, hq=Hq, hkv=Hkv):
        return [torch.randn(Bq, h, s, D, generator=g) for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]

    kv_len = torch.randint(0, Sk + 1, (Bq,), generator=g)
    q_len = torch.randint(0, Sq + 1, (Bq,), generator=g)
    starts = torch.randint(0, Sk // 2, (Bq, 2), generator=g)
    spans = torch.stack([starts, starts + torch.randint(0, Sk // 3, (Bq, 2), generator=g)], -1)
    bool_mask = torch.rand(Bq, 1, Sq, Sk, generator=g) > 0.3
    float_mask = torch.where(bool_mask, torch.randn(Bq, 1, Sq, Sk, generator=g), float("-inf"))
    kinds = {"none": {}, "causal": dict(causal=True), "padding": dict(kv_lengths=kv_len, q_lengths=q_len),
             "causal_padding": dict(causal=True, kv_lengths=kv_len, q_lengths=q_len),
             "prefix_lm": dict(causal=True, prefix_lengths=torch.randint(0, Sk, (Bq,), generator=g)),
             "spans_inside": dict(causal=True, spans=spans, span_mode="inside"),
             "spans_outside": dict(spans=spans[:, 0], span_mode="outside", kv_lengths=kv_len),
             "bool_mask": dict(attn_mask=bool_mask), "float_mask": dict(attn_mask=float_mask),
             "causal_dropout": dict(causal=True, kv_lengths=kv_len, dropout_p=0.2, dropout_seed=7, dropout_offset=3),
             "window_alibi": dict(window_size=(9, 4), kv_lengths=kv_len, q_lengths=q_len,
                                  alibi_slopes=torch.rand(Bq, Hq, generator=g)),
             "causal_window": dict(causal=True, window_size=(13, -1), alibi_slopes=torch.rand(Hq, generator=g))}
    for kind, kw in kinds.items():
        # the interpreter runs every program one after the other: there, heads equal to the key heads only
        # for a few kinds (the GQA head mapping is the same code for every mask)
        for gqa in (True, False) if not args.tiny or kind in ("none", "padding") else (True,):
            base = qkv(Sq, Sk) if gqa else qkv(Sq, Sk, Hq, Hq)
            dout = torch.randn(Bq, Hq, Sq, D, generator=g)
            grads = []
            for backend in ("triton", "reference"):
                dt = dtype if backend == "triton" else torch.float64
                t = [x.to(dev, dt, copy=True).requires_grad_() for x in base]
                mk = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                out = fused_attention(*t, **mk, backend=backend)
                out.backward(dout.to(out))
                grads.append((out, *(x.grad for x in t)))
            check(f"attention {kind} {'gqa' if gqa else 'mha'}", grads[0], grads[1], tol)

    # varlen (packed) layout
    seqs = torch.tensor([0, 17, 1, Sq + 3], dtype=torch.int64)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), seqs.cumsum(0)]).to(torch.int32)
    total = int(cu[-1])
    base = [torch.randn(total, h, D, generator=g) for h in (Hq, Hkv, Hkv)]
    dout = torch.randn(total, Hq, D, generator=g)
    for causal in (False, True):
        res = []
        for backend in ("triton", "reference"):
            t = [x.to(dev, dtype if backend == "triton" else torch.float64, copy=True).requires_grad_() for x in base]
            out = fused_attention_varlen(*t, cu.to(dev), cu.to(dev), int(seqs.max()), int(seqs.max()),
                                         causal=causal, backend=backend, window_size=(-1, -1) if causal else (6, 6),
                                         dropout_p=0.2 if causal else 0.0, dropout_seed=5)  # with and without
            out.backward(dout.to(out))
            res.append((out, *(x.grad for x in t)))
        check(f"attention varlen causal={causal}", res[0], res[1], tol)

    # losses
    N, H, Vl = (37, 24, 1003) if args.tiny else (1021, 256, 30522)
    labels = torch.randint(0, Vl, (N,), generator=g)
    labels[torch.rand(N, generator=g) > 0.3] = -100
    logits = torch.randn(N, Vl, generator=g)
    for inplace in (False, True):
        res = []
        for backend in ("triton", "reference"):
            leaf = logits.to(dev, dtype if backend == "triton" else torch.float64, copy=True).requires_grad_()
            kw = dict(inplace_grad=True) if inplace and backend == "triton" else {}
            loss = masked_cross_entropy(leaf * 1, labels.to(dev), label_smoothing=0.1, backend=backend, **kw)
            loss.backward()
            res.append((loss, leaf.grad))
        check(f"masked_cross_entropy inplace={inplace}", res[0], res[1], tol)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(Vl, H, generator=g) / H ** 0.5
    bound = int((labels != -100).sum())
    for kw in ({}, dict(max_labelled_rows=bound)):
        res = []
        for backend in ("triton", "reference"):
            dt = dtype if backend == "triton" else torch.float64
            h, w = (t.to(dev, dt, copy=True).requires_grad_() for t in (hidden, weight))
            loss = fused_linear_cross_entropy(h, w, labels.to(dev), backend=backend, **kw)
            loss.backward()
            res.append((loss, h.grad, w.grad))
        check(f"fused_linear_cross_entropy {'bounded' if kw else 'unbounded'}", res[0], res[1], tol)

    if cuda:
        torch.cuda.synchronize()
    print(f"kernels called: {called} checks, {len(failures)} wrong")
    for f in failures:
        print("WRONG " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
