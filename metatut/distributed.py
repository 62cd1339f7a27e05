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
    """Seed of task stream ``stream`` (a shard of the meta-batch) for a run seeded with ``seed``.

    Rank ``r`` samples its share of every meta-batch from the stream seeded ``stream_seed(seed, r)``:
    distinct streams for distinct ranks, the same ones on every rerun.

    Example::

        >>> [stream_seed(0, rank) for rank in range(4)]
        [0, 1, 2, 3]
        >>> stream_seed(1, 2)
        1000005
    """
    return seed * 1_000_003 + stream


class DistributedContext:
    """Rank, world size and the gradient all-reduce; a no-op for a single process.

    :func:`init_distributed` builds one from ``torchrun``'s environment. With one process every collective
    returns its input, so a training loop written against this class runs unchanged without ``torchrun``.

    Example (a single process)::

        >>> ctx = DistributedContext()                       # rank 0 of 1
        >>> ctx.enabled, ctx.is_main
        (False, True)
        >>> params = {"w": torch.zeros(2, 3, requires_grad=True)}
        >>> params["w"].grad = torch.ones(2, 3)             # [2, 3], as after loss.backward()
        >>> ctx.average_gradients(params)                    # with N ranks: the mean of the N gradients
        >>> params["w"].grad.shape
        torch.Size([2, 3])
        >>> ctx.gather(torch.arange(3))                      # one [3] tensor per rank
        [tensor([0, 1, 2])]
        >>> ctx.mean(torch.tensor(0.25)), ctx.all_ok(torch.tensor(True))
        (tensor(0.2500), True)
        >>> ctx.barrier(); ctx.close()
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def enabled(self) -> bool:
        """True with more than one process (then the methods run collectives)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, logs and metrics."""
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
        """The mean of ``value`` (same shape on all ranks) over the ranks; ``value`` itself with one process."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def minimum(self, value: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum of ``value`` (same shape on all ranks) over the ranks (an all-reduce with MIN,
        no host synchronisation); ``value`` itself with one process."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def all_ok(self, ok: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
        """True when ``ok`` holds on every rank (an all-reduce with MIN; ``device`` is where the collective
        runs: the GPU with NCCL). With one process, just ``bool(ok)`` (a host sync for a tensor)."""
        if not self.enabled:
            return bool(ok)
        flag = torch.as_tensor(ok, device=device).detach().to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to do with one process)."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (nothing to do with one process)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    with NCCL on CUDA and gloo otherwise; a single-process context when not launched that way.

    Example (not launched by ``torchrun``: ``WORLD_SIZE`` unset or 1)::

        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"WORLD_SIZE": "1"}):
        ...     ctx = init_distributed(torch.device("cpu"))
        >>> ctx.rank, ctx.world_size, ctx.enabled
        (0, 1, False)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size())
