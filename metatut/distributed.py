"""Data-parallel meta-training with ``torch.distributed`` (launched with ``torchrun``).

The meta-batch is split across ranks; each rank samples its own tasks from its own seeded stream and
the meta-gradients are averaged with an all-reduce, so every rank takes the same optimiser step.
Launch lines::

    torchrun --nproc_per_node=4 -m metatut.cli configs/omniglot_5way_1shot.json           # 4 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 -m metatut.cli configs/omniglot_20way_1shot.json   # 2 nodes
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .models import Params

__all__ = ["DistributedContext", "init_distributed", "stream_seed"]


def stream_seed(seed: int, stream: int) -> int:
    """Seed of task stream ``stream`` (a shard of the meta-batch) for a run seeded with ``seed``."""
    return seed * 1_000_003 + stream


class DistributedContext:
    """Rank, world size and the gradient all-reduce; a no-op for a single process."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: Params) -> None:
        """All-reduce (sum) every gradient, then divide by the world size: the meta-gradient of the
        global meta-batch when each rank's loss is the mean over its own tasks."""
        if not self.enabled:
            return
        grads = [p.grad for p in params.values() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of ``tensor`` (same shape on all ranks), in rank order."""
        if not self.enabled:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_ok(self, ok: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
        """True when ``ok`` holds on every rank (an all-reduce with MIN; ``device`` is where the collective
        runs: the GPU with NCCL). With one process, just ``bool(ok)`` (a host sync for a tensor)."""
        if not self.enabled:
            return bool(ok)
        flag = torch.as_tensor(ok, device=device).detach().to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    with NCCL on CUDA and gloo otherwise; a single-process context when not launched that way."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size())
