"""Data-parallel training under `torchrun` (DDP; gloo on CPU, nccl on CUDA).

Each rank trains on its slice of the global batch (`data.sample_ids_for(..., rank, world)`); the masks are
keyed by global sample ids, so N processes see the same samples and masks as one. The loss each rank
back-propagates is scaled so that DDP's gradient average equals the gradient of the *global* mean over
labelled tokens (ranks hold different numbers of them), and the logged loss is that global mean: step 1's
loss equals the one-process run's.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a `torchrun` launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> Context:
    """Joins the process group that torchrun describes in the environment (no-op for a single process)."""
    if not launched():
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Context(rank, world, device)


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
    dist.all_reduce(stats)
    total = stats[1].clamp_min(1)
    # DDP averages gradients over `world` ranks: sum_r(loss_r * n_r) / N is what each rank's scaled loss sums to.
    return loss * (labelled * ctx.world / total), stats[0] / total


def main_first(ctx: Context, build):
    """build() on rank 0 first, then on the other ranks. For the dataset: training a WordPiece tokenizer is not
    deterministic across processes (HF tokenizers breaks ties in hash order), so rank 0 trains and caches it
    and the others load that cache (one node, or a cache directory shared by all)."""
    if ctx.enabled and not ctx.main:
        dist.barrier()
    result = build()
    if ctx.enabled and ctx.main:
        dist.barrier()
    return result


def all_sum(value: float, ctx: Context) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t)


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
