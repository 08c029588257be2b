"""Data-parallel training under `torchrun` (DDP; gloo on CPU, nccl on CUDA).

Each rank trains on its slice of the global batch (`data.sample_ids_for(..., rank, world)`); the masks are
keyed by global sample ids, so N processes see the same samples and masks as one. The loss each rank
back-propagates is scaled so that DDP's gradient average equals the gradient of the *global* mean over
labelled tokens (ranks hold different numbers of them), and the logged loss is that global mean: step 1's
loss equals the one-process run's.

A rank that stalls (a hung data step, a dead node) must not block the others for torch's default half hour:
the process group's timeout is `timeout_s` (`--ddp-timeout`, default 5 minutes), and a collective that runs
out of it raises `StalledRankError`, naming the ranks that did not answer where it can tell: every rank that
hit the timeout joins a `monitored_barrier` on a separate gloo group, and rank 0 learns from it which ranks
never arrived. (With NCCL on CUDA, NCCL's own watchdog may end the processes first, with its own report.)
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class StalledRankError(RuntimeError):
    """A collective got no answer from every rank within the process group's timeout."""


@dataclasses.dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    timeout_s: float = DEFAULT_TIMEOUT_S
    monitor: object = None  # a gloo group for monitored_barrier (names the stalled ranks)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a `torchrun` launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Joins the process group that torchrun describes in the environment (no-op for a single process)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if not launched():
        return Context(device=device, timeout_s=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    return Context(rank, world, device, timeout_s, dist.new_group(backend="gloo", timeout=timeout))


def collective(ctx: Context, what: str, fn):
    """fn() (a collective); on a timeout, `StalledRankError` saying which ranks did not answer."""
    try:
        return fn()
    except RuntimeError as e:  # gloo: "Timed out waiting ..."; DistBackendError is a RuntimeError too
        if isinstance(e, StalledRankError):
            raise
        stalled = _stalled_ranks(ctx)
        who = f"; ranks that did not answer: {stalled}" if stalled else ""
        raise StalledRankError(f"rank {ctx.rank}: {what} got no answer from every rank within "
                               f"{ctx.timeout_s:g} s (--ddp-timeout){who}. Original error: {str(e)[:300]}") from e


def _stalled_ranks(ctx: Context) -> str | None:
    """The ranks that do not reach a monitored barrier within a short wait (rank 0 learns them)."""
    if ctx.monitor is None:
        return None
    try:
        dist.monitored_barrier(group=ctx.monitor, timeout=datetime.timedelta(seconds=min(30.0, ctx.timeout_s)),
                               wait_all_ranks=True)
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
        return m.group(1).strip() if m else None
    return None


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def global_loss(loss: torch.Tensor, labels: torch.Tensor, ctx: Context,
                ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to back-propagate, the global mean loss to log) from this rank's mean `loss` over its
    labelled tokens (`labels != ignore_index`). One all-reduce of two numbers per step: the global labelled
    count has to be known before the backward."""
    if not ctx.enabled:
        return loss, loss.detach()
    labelled = (labels != ignore_index).sum()
    stats = torch.stack([loss.detach() * labelled, labelled.to(loss.dtype)])
    collective(ctx, "the loss all-reduce", lambda: dist.all_reduce(stats))
    total = stats[1].clamp_min(1)
    # DDP averages gradients over `world` ranks: sum_r(loss_r * n_r) / N is what each rank's scaled loss sums to.
    return loss * (labelled * ctx.world / total), stats[0] / total


def main_first(ctx: Context, build):
    """build() on rank 0 first, then on the other ranks. For the dataset: training a WordPiece tokenizer is not
    deterministic across processes (HF tokenizers breaks ties in hash order), so rank 0 trains and caches it
    and the others load that cache (one node, or a cache directory shared by all)."""
    if ctx.enabled and not ctx.main:
        collective(ctx, "waiting for rank 0's dataset", dist.barrier)
    result = build()
    if ctx.enabled and ctx.main:
        collective(ctx, "waiting for the ranks after the dataset", dist.barrier)
    return result


def all_sum_tensors(tensors, ctx: Context) -> tuple:
    """The element-wise sums of `tensors` over the ranks (one all-reduce of their concatenation)."""
    tensors = tuple(tensors)
    if not ctx.enabled:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(ctx, "the statistics all-reduce", lambda: dist.all_reduce(flat))
    return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))


def all_sum(value: float, ctx: Context) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    collective(ctx, "the token count all-reduce", lambda: dist.all_reduce(t))
    return float(t)


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
