"""The task-batch container shared by every sampler and algorithm."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# The checks live in metatut.validate; re-exported here, where they were first defined.
from ..validate import check_generator, check_positive_int, check_range

__all__ = ["TaskBatch", "check_positive_int", "check_range", "check_generator"]


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of tasks, each with a support set (to adapt on) and a query set (to score on).

    Shapes: ``support_x [tasks, shots, *x_shape]``, ``support_y [tasks, shots, *y_shape]``,
    ``query_x [tasks, query_shots, *x_shape]``, ``query_y [tasks, query_shots, *y_shape]``.
    ``info`` holds per-task metadata such as ``amplitude [tasks]`` (not used by algorithms).

    Example::

        >>> x = torch.zeros(4, 5, 1)
        >>> batch = TaskBatch(x, x, torch.zeros(4, 7, 1), torch.zeros(4, 7, 1))
        >>> batch.num_tasks, batch.shots, batch.query_shots, batch[1:3].num_tasks
        (4, 5, 7, 2)
        >>> TaskBatch(x, x, torch.zeros(3, 7, 1), torch.zeros(3, 7, 1))
        Traceback (most recent call last):
        ...
        ValueError: support_x, support_y, query_x and query_y must have the same number of tasks (got [4, 4, 3, 3])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("support_x", "support_y", "query_x", "query_y")
        tensors = [getattr(self, n) for n in names]
        for name, t in zip(names, tensors, strict=True):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
            if t.dim() < 2:
                raise ValueError(f"{name} must have shape [tasks, shots, ...] (got {tuple(t.shape)})")
        sx, sy, qx, qy = tensors
        if len({t.shape[0] for t in tensors}) != 1:
            raise ValueError("support_x, support_y, query_x and query_y must have the same number of tasks "
                             f"(got {[t.shape[0] for t in tensors]})")
        if self.num_tasks < 1:
            raise ValueError("a TaskBatch needs at least 1 task (got 0)")
        if sx.shape[1] != sy.shape[1]:
            raise ValueError(f"support_x and support_y must have the same number of shots "
                             f"(got {sx.shape[1]} and {sy.shape[1]})")
        if qx.shape[1] != qy.shape[1]:
            raise ValueError(f"query_x and query_y must have the same number of shots "
                             f"(got {qx.shape[1]} and {qy.shape[1]})")
        if sx.shape[1] < 1 or qx.shape[1] < 1:
            raise ValueError(f"support and query sets need at least 1 shot each "
                             f"(got {sx.shape[1]} support, {qx.shape[1]} query)")
        if sx.shape[2:] != qx.shape[2:] or sy.shape[2:] != qy.shape[2:]:
            raise ValueError("support and query inputs/targets must have the same per-example shapes "
                             f"(got x {tuple(sx.shape[2:])} vs {tuple(qx.shape[2:])}, "
                             f"y {tuple(sy.shape[2:])} vs {tuple(qy.shape[2:])})")
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"all tensors of a TaskBatch must be on one device (got {sorted(map(str, devices))})")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def shots(self) -> int:
        return self.support_x.shape[1]

    @property
    def query_shots(self) -> int:
        return self.query_x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TaskBatch":
        """Move to ``device`` and cast floating tensors to ``dtype``."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return TaskBatch(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y),
                         {k: move(v) for k, v in self.info.items()})

    def task(self, index: int) -> "TaskBatch":
        """The single task ``index`` as a batch of one (shapes keep the leading task dimension)."""
        sl = slice(index, index + 1)
        return TaskBatch(self.support_x[sl], self.support_y[sl], self.query_x[sl], self.query_y[sl],
                         {k: v[sl] for k, v in self.info.items()})

    def __getitem__(self, index) -> "TaskBatch":
        """Select tasks with an int, slice or index tensor (an int keeps the task dimension)."""
        if isinstance(index, int):
            return self.task(index)
        return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index],
                         {k: v[index] for k, v in self.info.items()})

    def swapped(self) -> "TaskBatch":
        """The same tasks with support and query exchanged."""
        return TaskBatch(self.query_x, self.query_y, self.support_x, self.support_y, dict(self.info))
