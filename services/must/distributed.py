"""Data-parallel MUST on torch.distributed: which process this is, and the few collectives it needs.

A run launched by `torchrun` (torch.distributed.run) has RANK, LOCAL_RANK and WORLD_SIZE in its
environment; `init_from_env` joins the process group (nccl on CUDA, gloo on the CPU). Everything
else in the engine asks `world()` and works unchanged in a single process, where every helper
here is the identity.

The batch size in `MustConfig` is the global batch: each of W ranks trains on batch / W images
of it. The schedule, the sampler position and the checkpoint are then the same at any world size,
which is what lets a job checkpointed on 4 GPUs resume on 2.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from services.must.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run (rank 0 of 1 outside torch.distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, reports progress, decides on cancellation and exports."""
        return self.rank == 0

    def shard(self, global_batch: int) -> int:
        """This rank's share of a global batch; refuses a batch the ranks cannot split evenly."""
        if global_batch % self.size:
            raise ConfigError(
                f"batch_size {global_batch} (the global batch) must be divisible by the {self.size} "
                "processes of a distributed run"
            )
        return global_batch // self.size


def world() -> World:
    """The current process group's view of this process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launched() -> bool:
    """True when torchrun (or another launcher using its environment) started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float = 1800.0) -> World:
    """Join the process group torchrun describes (no-op for a single process) and pick the GPU.

    nccl when this rank has a CUDA device, gloo otherwise (the CPU tests run two gloo ranks).
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda and local_rank >= torch.cuda.device_count():
        # One rank on the CPU beside nccl ranks would wait for them forever: refuse at once.
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}, "
            "start at most that many processes per node"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    return world()


def rank_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when it has one, else the CPU."""
    local_rank = world().local_rank
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group (before the process exits, so nccl does not warn of a leak)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and keeps this
    rank's rows (what reduce_scatter does, with all_reduce, which gloo also runs).

    torch.distributed.nn.functional.all_gather does the same but is deprecated in favour of a
    private module (torch.distributed._functional_collectives), so the few lines are written here.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        w = world()
        ctx.rows, ctx.rank = x.shape[0], w.rank
        parts = [torch.empty_like(x) for _ in range(w.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order, with gradient back to each rank's part.

    The backward pass sums every rank's gradient for a part, and DDP then averages over the ranks:
    a loss that each rank computes identically from the gathered tensor trains as in one process.
    """
    if not world().active:
        return x
    return _GatherWithGrad.apply(x)


def gather(x: Tensor) -> Tensor:
    """Every rank's `x` (same shape on all ranks) concatenated along dim 0, without gradient."""
    w = world()
    if not w.active:
        return x
    parts = [torch.empty_like(x) for _ in range(w.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_uneven(x: Tensor) -> Tensor:
    """Like `gather`, for parts whose first dimension differs between ranks (padded to travel)."""
    w = world()
    if not w.active:
        return x
    sizes = gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return torch.cat([part[:n] for part, n in zip(gather(padded).split(max(sizes)), sizes, strict=True)])


def mean_over_ranks(x: Tensor) -> Tensor:
    """The mean of `x` over the ranks (a copy; `x` itself is left alone), without gradient."""
    w = world()
    if not w.active:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / w.size


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank, so that all ranks stop (or go on) at the same step."""
    if not world().active:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
