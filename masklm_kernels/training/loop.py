"""The training loop: model, AdamW with linear warm-up and decay, masking on the device every step,
held-out evaluation, checkpoints that resume a run exactly, data parallelism under torchrun, and a summary."""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch

from .._common import IGNORE_INDEX
from ..masking import AdaptiveMaskRates, bart_infill, mask_tokens, mass_mask, t5_span_corruption
from ..models import BertMLM, MassModel, Seq2SeqModel, model_config
from . import checkpoint, data, distributed

T5_SENTINELS = 100  # T5's <extra_id_0..99>: ids vocab_size .. vocab_size + 99 of the t5 task's model
MODELS = {"mlm": BertMLM, "mass": MassModel, "t5": Seq2SeqModel, "bart": Seq2SeqModel}


@dataclasses.dataclass
class Args:
    task: str = "mlm"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    model: str = "small"
    implementation: str = "fused"
    device: str = "cpu"
    seed: int = 0
    text_file: str | None = None
    vocab_size: int = 8000
    lr: float = 1e-3
    warmup: float = 0.1
    log_every: int = 10
    save: str | None = None
    save_every: int | None = None  # also save every this many steps (atomically: the last good one stays)
    resume: str | None = None
    allow_changed: tuple[str, ...] = ()  # run settings that may differ from the checkpoint's on resume
    stop_after: int | None = None  # stop (and save) after this many steps of a run planned for `steps`
    dropout: float | None = None  # hidden dropout, and attention dropout unless attention_dropout (None: config's 0.1)
    attention_dropout: float | None = None  # attention-probability dropout (None: as dropout)
    ddp_timeout: float = distributed.DEFAULT_TIMEOUT_S  # seconds a collective waits for a stalled rank
    adaptive_masking: bool = False  # MLM: per-token rates from the model's per-token loss (AdaptiveMaskRates)


def masked_batch(args: Args, ds: data.Dataset, step: int, split: str = "train", rank: int = 0, world: int = 1,
                 adaptive: AdaptiveMaskRates | None = None) -> dict:
    """This rank's part of the step's global batch with its masks (keyed by seed, step and global sample ids),
    on the device; MLM rates from `adaptive` when given (else 15%)."""
    n = len(ds.train if split == "train" else ds.eval)
    sample_ids = data.sample_ids_for(step, args.batch_size, n, args.seed, rank, world)
    ids, lengths = ds.batch(sample_ids, split)
    dev = torch.device(args.device)
    ids, lengths, sample_ids = ids.to(dev), lengths.to(dev), sample_ids.to(dev)
    seed = args.seed + (7919 if split == "eval" else 0)
    specials = [data.PAD_ID, data.CLS_ID, data.SEP_ID]
    # attention dropout keyed like the masks: by seed, step and global sample id (the same on any number of ranks)
    keys = dict(sample_ids=sample_ids, dropout_seed=seed, dropout_step=step)
    if args.task == "mlm":
        rate = 0.15 if adaptive is None else adaptive.rates(ids, lengths=lengths, special_token_ids=specials)
        masked, labels = mask_tokens(ids, mask_token_id=data.MASK_ID, vocab_size=ds.vocab_size, lengths=lengths,
                                     special_token_ids=specials, sample_ids=sample_ids, seed=seed, step=step,
                                     random_token_range=(len(data.SPECIAL), ds.vocab_size), mlm_probability=rate)
        return dict(args=(masked, labels), kwargs=dict(lengths=lengths, **keys), labels=labels,
                    tokens=int(lengths.sum()))
    if args.task == "bart":  # BART's text infilling (30% in Poisson(3) spans, one mask each), [SEP] starts
        bart = bart_infill(ids, vocab_size=ds.vocab_size, mask_token_id=data.MASK_ID,
                           decoder_start_token_id=data.SEP_ID, pad_token_id=data.PAD_ID, lengths=lengths,
                           sample_ids=sample_ids, seed=seed, step=step,
                           random_token_range=(len(data.SPECIAL), ds.vocab_size))
        return dict(args=(bart.input_ids, bart.decoder_input_ids, bart.labels),
                    kwargs=dict(input_lengths=bart.input_lengths, label_lengths=bart.label_lengths, **keys),
                    labels=bart.labels, tokens=int(lengths.sum()))
    if args.task == "t5":
        t5 = t5_span_corruption(ids, vocab_size=ds.vocab_size + T5_SENTINELS, eos_token_id=data.SEP_ID,
                                sentinel_start_id=ds.vocab_size + T5_SENTINELS - 1, pad_token_id=data.PAD_ID,
                                lengths=lengths, sample_ids=sample_ids, seed=seed, step=step)
        return dict(args=(t5.input_ids, t5.decoder_input_ids, t5.labels),
                    kwargs=dict(input_lengths=t5.input_lengths, label_lengths=t5.label_lengths, **keys),
                    labels=t5.labels, tokens=int(lengths.sum()))
    enc, dec, labels, spans = mass_mask(ids, lengths=lengths, mask_token_id=data.MASK_ID, vocab_size=ds.vocab_size,
                                        special_token_ids=specials, sample_ids=sample_ids, seed=seed, step=step)
    return dict(args=(enc, dec, labels, spans), kwargs=dict(lengths=lengths, **keys), labels=labels,
                tokens=int(lengths.sum()))


def build(args: Args, vocab_size: int):
    torch.manual_seed(args.seed)
    drop = {} if args.dropout is None else dict(hidden_dropout_prob=args.dropout,
                                                  attention_probs_dropout_prob=args.dropout)
    if args.attention_dropout is not None:
        drop["attention_probs_dropout_prob"] = args.attention_dropout
    if args.task == "t5":  # the sentinels' rows, and T5 inputs one longer than a row at most (EOS)
        vocab_size, positions = vocab_size + T5_SENTINELS, max(args.seq_len + 1, 64)
    elif args.task == "bart":  # infilled inputs: up to the budget's insertions longer than a row
        positions = max(args.seq_len + math.ceil(max(args.seq_len - 2, 0) * 0.3), 64)
    else:
        positions = max(args.seq_len, 64)
    cfg = model_config(args.model, vocab_size=vocab_size, max_position_embeddings=positions, **drop)
    model = MODELS[args.task](cfg, implementation=args.implementation).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / max(1, args.steps - warm))))
    return model, opt, sched


def evaluate(args: Args, model, ds: data.Dataset, batches: int = 4) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model(*b["args"], **b["kwargs"])["loss"])
                  for b in (masked_batch(args, ds, s, "eval") for s in range(batches))]
    model.train()
    return sum(losses) / len(losses)


def train(args: Args, ds: data.Dataset | None = None, out=None, ctx: distributed.Context | None = None) -> dict:
    """Runs args.steps steps (from a checkpoint with args.resume) and returns the summary. Under torchrun
    (WORLD_SIZE > 1) every rank runs this with its slice of each global batch; rank 0 logs and saves.
    `ctx`: the process group the caller joined (the command line's), else joined here."""
    ctx = ctx or distributed.setup(args.device, args.ddp_timeout)
    if args.batch_size % ctx.world:
        raise ValueError(f"batch_size ({args.batch_size}) must be a multiple of the number of processes "
                         f"({ctx.world})")
    args = dataclasses.replace(args, device=ctx.device)
    out = (out or sys.stdout) if ctx.main else None
    ds = ds or distributed.main_first(ctx, lambda: data.build_dataset(args.text_file, args.seq_len, args.vocab_size))
    model, opt, sched = build(args, ds.vocab_size)
    adaptive = AdaptiveMaskRates(ds.vocab_size).to(args.device) if args.adaptive_masking else None
    start, first_loss = 0, None
    if args.resume:
        ckpt = checkpoint.load(args.resume, args, args.allow_changed)
        model.load_state_dict(ckpt["model"])
        if adaptive is not None and ckpt.get("adaptive") is not None:
            adaptive.load_state_dict(ckpt["adaptive"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"])
        start, first_loss = ckpt["step"], ckpt["first_loss"]
    net = distributed.wrap(model, ctx)
    model.train()
    tokens, t0, loss_value = 0, time.perf_counter(), float("nan")
    end = min(args.steps, args.stop_after or args.steps)
    for step in range(start, end):
        batch = masked_batch(args, ds, step, rank=ctx.rank, world=ctx.world, adaptive=adaptive)
        extra = dict(return_token_losses=True) if adaptive is not None else {}
        result = net(*batch["args"], **batch["kwargs"], **extra)
        if adaptive is not None:  # the global batch's per-id statistics, the same on every rank
            adaptive.fold(*distributed.all_sum_tensors(
                adaptive.batch_statistics(result["labelled"], result["token_losses"]), ctx))
        loss, logged = distributed.global_loss(result["loss"], batch["labels"], ctx, IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(logged)  # one host read per step, for the log
        first_loss = loss_value if first_loss is None else first_loss
        tokens += batch["tokens"]
        if args.save and ctx.main and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end:
            checkpoint.save(args.save, args, step=step + 1, first_loss=first_loss, model=model, opt=opt, sched=sched,
                            adaptive=adaptive)
        if out and ((step + 1) % args.log_every == 0 or step + 1 == end):
            rate = tokens * ctx.world / max(time.perf_counter() - t0, 1e-9)  # estimate: rank 0's share x ranks
            bar = "#" * int(20 * (step + 1) / args.steps)
            print(f"[{bar:<20}] step {step + 1}/{args.steps}  loss {loss_value:.4f}  {rate:,.0f} tokens/s",
                  file=out, flush=True)
    elapsed = time.perf_counter() - t0
    tokens = distributed.all_sum(tokens, ctx)
    if args.save and ctx.main:
        checkpoint.save(args.save, args, step=end, first_loss=first_loss, model=model, opt=opt, sched=sched,
                        adaptive=adaptive)
    return dict(first_loss=first_loss, final_loss=loss_value, eval_loss=evaluate(args, model, ds),
                baseline_loss=math.log(ds.vocab_size), elapsed_s=elapsed,
                checkpoint=args.save if args.save and ctx.main else None,
                tokens_per_s=tokens / elapsed if elapsed > 0 and tokens else math.nan, steps=end,
                device=args.device, implementation=args.implementation, task=args.task, model=args.model,
                processes=ctx.world, state=model.state_dict())
