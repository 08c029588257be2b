"""The training command (the library's main job): `python -m masklm_kernels.train` / `masklm-train`.

Masked-LM (`--task mlm`; BERT-style, or ModernBERT- / MosaicBERT-style with `--model modern-small` /
`mosaic-small`), MASS (`--task mass`), T5 span corruption or BART infilling (`--task t5` / `bart`, an
encoder-decoder) pre-training of a reference model on the library's kernels (`--implementation fused`)
or plain PyTorch (`--implementation reference`), on a corpus built on the spot from the Python standard library's
docstrings (or `--text-file`), with a WordPiece tokenizer trained on it and cached. Masks are drawn on
the device every step, keyed by (seed, step, global sample id).
`--compare` runs the same steps with both implementations and prints the speedup and the loss difference.
Data parallel: `torchrun --nproc_per_node N -m masklm_kernels.train ...` (DDP, gloo on CPU, nccl on CUDA;
--batch-size is the global batch).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from ._cli import description
from ._io import write_json
from .models import SIZES
from .training import data, distributed
from .training.checkpoint import RUN_SETTINGS, CheckpointError
from .training.loop import Args, train


def parse(argv=None) -> Args:
    p = argparse.ArgumentParser(prog="python -m masklm_kernels.train", description=description(__doc__))
    d = Args()
    p.add_argument("--task", choices=("mlm", "mass", "t5", "bart"), default=d.task,
                   help="mlm: BERT-style masked LM; mass: MASS fragments; t5: T5 span corruption; bart: BART text "
                        "infilling (t5 and bart: an encoder-decoder)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split across processes)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--model", choices=tuple(SIZES), default=d.model,
                   help="size, BERT-style (tiny, small, base), ModernBERT-style (modern-*: RoPE, 128-token local "
                        "windows, a global layer every third) or MosaicBERT-style (mosaic-*: ALiBi); --task mlm for "
                        "the styles")
    p.add_argument("--implementation", choices=("fused", "reference"), default=d.implementation)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--text-file", default=None, help="one paragraph per line (default: stdlib docstrings)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--dropout", type=float, default=None,
                   help="hidden dropout rate (default: the config's 0.1), and attention-probability dropout's unless "
                        "--attention-dropout is given")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="attention-probability dropout rate, applied inside the fused attention kernels (default: "
                        "--dropout, else the config's 0.1)")
    p.add_argument("--adaptive-masking", action="store_true",
                   help="MLM: mask each token id at a rate following the model's running per-token loss (harder ids "
                        "more often, 15%% on average per row; AdaptiveMaskRates, checkpointed)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save", default=None, help="checkpoint path written at the end (atomically)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="with --save: also save every N steps (the last good checkpoint always stays intact)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (up to --steps)")
    p.add_argument("--allow-changed", default="", metavar="SETTINGS",
                   help="comma-separated run settings that may differ from the checkpoint's on --resume: "
                        + ", ".join(RUN_SETTINGS))
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps run (with --save: an interruption to resume)")
    p.add_argument("--summary-json", default=None)
    p.add_argument("--ddp-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for a stalled rank before failing, naming it")
    p.add_argument("--compare", action="store_true", help="run both implementations, print speedup and loss difference")
    a = p.parse_args(argv)
    if a.task != "mlm" and a.adaptive_masking:
        p.error(f"--adaptive-masking: MLM only (--task mlm), not --task {a.task}")
    if a.task != "mlm" and "-" in a.model:
        p.error(f"--model {a.model}: the ModernBERT- and MosaicBERT-style encoders are BertMLM's (--task mlm); "
                f"--task {a.task} trains tiny, small or base")
    if a.steps < 1 or a.batch_size < 1 or a.seq_len < 8:
        p.error("--steps and --batch-size must be >= 1, --seq-len >= 8")
    for name in ("dropout", "attention_dropout"):
        value = getattr(a, name)
        if value is not None and not 0.0 <= value < 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if not a.ddp_timeout > 0:
        p.error("--ddp-timeout must be > 0 seconds")
    if a.save_every is not None and (a.save_every < 1 or not a.save):
        p.error("--save-every needs --save and must be >= 1")
    allow = tuple(s.strip().replace("-", "_") for s in a.allow_changed.split(",") if s.strip())
    if set(allow) - set(RUN_SETTINGS):
        p.error(f"--allow-changed: unknown setting(s) {sorted(set(allow) - set(RUN_SETTINGS))}; "
                f"choose from {', '.join(RUN_SETTINGS)}")
    for name in ("text_file", "resume"):
        path = getattr(a, name)
        if path is not None and not os.path.isfile(path):
            p.error(f"--{name.replace('_', '-')} {path!r}: no such file")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args = Args(task=a.task, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, model=a.model,
                implementation=a.implementation, device=device, seed=a.seed, text_file=a.text_file,
                vocab_size=a.vocab_size, lr=a.lr, log_every=a.log_every, save=a.save, save_every=a.save_every,
                resume=a.resume, allow_changed=allow, stop_after=a.stop_after, dropout=a.dropout,
                attention_dropout=a.attention_dropout, adaptive_masking=a.adaptive_masking,
                ddp_timeout=a.ddp_timeout)
    args.summary_json, args.compare = a.summary_json, a.compare
    return args


def main(argv=None) -> int:
    args = parse(argv)
    ctx = distributed.setup(args.device, args.ddp_timeout)
    try:
        run_all(args, ctx)
    except (CheckpointError, data.CorpusError) as e:
        print(f"masklm_kernels.train: error: {e}", file=sys.stderr)
        return 2
    except distributed.StalledRankError as e:
        print(f"masklm_kernels.train: error: {e}", file=sys.stderr)
        return 3
    finally:
        distributed.teardown(ctx)
    return 0


def run_all(args: Args, ctx: distributed.Context) -> None:
    say = print if ctx.main else (lambda *a, **k: None)
    say(f"task {args.task}, model {args.model}, implementation {args.implementation}, device {ctx.device}, "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len}"
        + (f" on {ctx.world} processes" if ctx.enabled else ""), flush=True)
    ds = distributed.main_first(ctx, lambda: data.build_dataset(args.text_file, args.seq_len, args.vocab_size))
    say(f"corpus: {len(ds.train)} train / {len(ds.eval)} eval samples, vocabulary {ds.vocab_size}", flush=True)
    runs = [args] if not args.compare else [dataclasses.replace(args, implementation=b) for b in ("reference", "fused")]
    summaries = []
    for run in runs:
        s = train(run, ds, ctx=ctx)
        s.pop("state")
        say(f"{run.implementation}: {s['steps']} steps in {s['elapsed_s']:.1f} s, {s['tokens_per_s']:,.0f} tokens/s; "
            f"held-out loss {s['eval_loss']:.4f} (a uniform guess scores ln V = {s['baseline_loss']:.4f}); "
            f"training loss {s['first_loss']:.4f} at the first step, {s['final_loss']:.4f} at the last (one "
            "batch each)" + (f"; checkpoint written to {s['checkpoint']}" if s["checkpoint"] else ""),
            flush=True)
        summaries.append(s)
    summary = summaries[-1]
    if args.compare:
        ref, fused = summaries
        summary = dict(fused, speedup=fused["tokens_per_s"] / ref["tokens_per_s"],
                       loss_difference=abs(fused["final_loss"] - ref["final_loss"]), reference=ref)
        say(f"fused vs reference: {summary['speedup']:.2f}x tokens/s, final loss difference "
            f"{summary['loss_difference']:.2e}", flush=True)
    if args.summary_json and ctx.main:
        write_json(args.summary_json, summary)  # strict JSON: a NaN loss (no step run) is null


if __name__ == "__main__":
    sys.exit(main())
