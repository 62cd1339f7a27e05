"""Evaluation on held-out tasks: mean and 95% confidence interval (1.96 * std / sqrt(n))."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import LossFn, adaptation_curve
from .models import Params
from .tasks.base import TaskBatch

__all__ = ["Summary", "summarize", "evaluate_adaptation"]


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` per-task values with the half-width of its 95% confidence interval."""

    mean: float
    ci95: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.ci95:.3f} (n={self.n})"

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(self)
        return f"{format(self.mean, spec)} ± {format(self.ci95, spec)}"


def summarize(values: Tensor | Sequence[float]) -> Summary:
    """Mean ± 1.96·σ/√n of per-task values (σ: sample standard deviation; the papers use n = 600)."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().flatten().cpu()
    if v.numel() < 2:
        raise ValueError(f"values must hold at least 2 numbers to estimate a confidence interval (got {v.numel()})")
    if not torch.isfinite(v).all():
        raise ValueError("values contain NaN or infinity")
    n = v.numel()
    return Summary(float(v.mean()), float(1.96 * v.std(unbiased=True) / math.sqrt(n)), n)


def evaluate_adaptation(model: nn.Module, params: Params, tasks: TaskBatch, *, inner_lr: float,
                        steps: Sequence[int] = (0, 1, 10), loss_fn: LossFn = F.mse_loss,
                        vectorize="auto", chunk_size: int | None = None) -> dict[int, Summary]:
    """Fine-tune ``params`` on each held-out task's support set and score its query set.

    Returns ``{k: Summary}``: the query loss after ``k`` SGD steps of size ``inner_lr``, for each
    ``k`` in ``steps``. Works for any parameters: MAML's, the summed-loss baseline's, a random init.
    """
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be a non-empty list of ints >= 0 (got {steps})")
    curve = adaptation_curve(model, params, tasks, inner_lr=inner_lr, steps=steps[-1], loss_fn=loss_fn,
                             vectorize=vectorize, chunk_size=chunk_size)
    return {k: summarize(curve[:, k]) for k in steps}
