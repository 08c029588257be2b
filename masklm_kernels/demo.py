"""`python -m masklm_kernels.demo`: on-device dynamic masking on a BERT-shaped batch, shown and timed.

Builds a synthetic padded batch ([CLS] ... [SEP] [PAD]..., BERT's vocabulary size), masks it in each
mode (token, exact counts, whole-word, SpanBERT spans, MASS fragments) on the best backend here,
prints one row before and after and what was selected, then each mode's throughput. Fresh masks each
step come from `step`; the same (seed, step, sample id) always gives the same mask.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import info, mask_tokens, mass_mask
from ._cli import description

PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-uncased ids
VOCAB = 30522


def make_batch(batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, seq), generator=g)
    lengths = torch.randint(max(2, seq // 2), seq + 1, (batch,), generator=g)
    pos = torch.arange(seq)
    ids[pos >= lengths[:, None]] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    # words of 1-3 word pieces; -1 on special tokens and padding
    starts = torch.rand(batch, seq, generator=g) < 0.5
    word_ids = torch.cumsum(starts, 1)
    special = (pos[None] == 0) | (pos[None] >= lengths[:, None] - 1)
    return ids, lengths, word_ids.masked_fill(special, -1)


MODES = {
    "token 15%": {},
    "exact 15%": {"exact": True},
    "whole word": {"word_ids": "word_ids"},
    "span (SpanBERT)": {"span_lengths": True},
}


def _time(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _show_row(name: str, ids: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, ignore: int, width: int):
    sel = labels != ignore
    n = int((ids != PAD).sum())
    print(f"  {name:<16} selected {int(sel.sum()):>3}/{n} tokens | ", end="")
    cells = []
    for t in range(min(width, ids.numel())):
        if not sel[t]:
            cells.append("  .  ")
        elif out[t] == MASK:
            cells.append("[MSK]")
        elif out[t] == ids[t]:
            cells.append(" keep")
        else:
            cells.append(" rand")
    print(" ".join(cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m masklm_kernels.demo", description=description(__doc__))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ids, lengths, word_ids = (t.to(device) for t in make_batch(args.batch, args.seq))
    common = dict(mask_token_id=MASK, vocab_size=VOCAB, lengths=lengths, special_token_ids=[CLS, SEP, PAD])
    report = info.collect()
    backend = next(b["backend"] for b in report["ops"]["mask_tokens"]
                   if not b["reasons"] and device in b["tensors"])
    print(f"masklm_kernels demo: B={args.batch} S={args.seq} on {device} (backend {backend!r}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    print(f"row 0: {int(lengths[0])} tokens; first {min(16, args.seq)} positions ('.' = not selected):")
    results = {}
    for name, extra in MODES.items():
        kw = {k: (word_ids if v == "word_ids" else v) for k, v in extra.items()}
        out, labels = mask_tokens(ids, **common, **kw, seed=0, step=1)
        again, _ = mask_tokens(ids, **common, **kw, seed=0, step=1)
        nxt, _ = mask_tokens(ids, **common, **kw, seed=0, step=2)
        assert torch.equal(out, again), "same (seed, step) must give the same mask"
        sel = labels != -100
        results[name] = (kw, sel.sum().item() / (ids != PAD).sum().item(), not torch.equal(out, nxt))
        _show_row(name, ids[0].cpu(), out[0].cpu(), labels[0].cpu(), -100, 16)
    enc, dec, mlabels, spans = mass_mask(ids, lengths=lengths, mask_token_id=MASK, vocab_size=VOCAB,
                                         special_token_ids=[CLS, SEP], pad_token_id=PAD, seed=0, step=1)
    s0, e0 = (int(v) for v in spans[0])
    print(f"  {'MASS fragment':<16} row 0 fragment [{s0}, {e0}) of {int(lengths[0])}: encoder sees it masked, "
          f"decoder predicts it ({int((mlabels != -100).sum())} label tokens in the batch)")
    print("\nselected share of real tokens, and whether step=2 gives a fresh mask:")
    for name, (_, share, fresh) in results.items():
        print(f"  {name:<16} {100 * share:5.1f}%   fresh: {fresh}")
    print(f"\nthroughput ({args.repeats} timed calls each, median):")
    tokens = args.batch * args.seq
    for name, (kw, _, _) in results.items():
        t = _time(lambda: mask_tokens(ids, **common, **kw, step=3), device, args.repeats)
        print(f"  {name:<16} {t * 1e6:8.1f} us/batch  {tokens / t / 1e6:8.1f} M tokens/s")
    t = _time(lambda: mass_mask(ids, lengths=lengths, mask_token_id=MASK, vocab_size=VOCAB,
                                special_token_ids=[CLS, SEP], step=3), device, args.repeats)
    print(f"  {'MASS fragment':<16} {t * 1e6:8.1f} us/batch  {tokens / t / 1e6:8.1f} M tokens/s")
    print("\nfull comparison with Hugging Face's collator: python -m benchmarks masking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
