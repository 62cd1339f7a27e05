"""Evaluation on held-out tasks: mean and 95% confidence interval (1.96 * std / sqrt(n))."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .functional import LossFn, adapt, adaptation_curve
from .models import Params
from .tasks.base import TaskBatch

__all__ = ["Summary", "summarize", "evaluate_adaptation", "adapted_accuracy"]


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
                        steps: Sequence[int] = (0, 1, 10), adapt_names=None, loss_fn: LossFn = F.mse_loss,
                        vectorize="auto", chunk_size: int | None = None) -> dict[int, Summary]:
    """Fine-tune ``params`` on each held-out task's support set and score its query set.

    Returns ``{k: Summary}``: the query loss after ``k`` SGD steps of size ``inner_lr``, for each
    ``k`` in ``steps``. Works for any parameters: MAML's, the summed-loss baseline's, a random init.
    """
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be a non-empty list of ints >= 0 (got {steps})")
    curve = adaptation_curve(model, params, tasks, inner_lr=inner_lr, steps=steps[-1], adapt_names=adapt_names,
                             loss_fn=loss_fn,
                             vectorize=vectorize, chunk_size=chunk_size)
    return {k: summarize(curve[:, k]) for k in steps}


def adapted_accuracy(model: nn.Module, params: Params, tasks: TaskBatch, *, inner_lr, steps: int,
                     adapt_names=None, loss_fn: LossFn = F.cross_entropy, vectorize="auto") -> Tensor:
    """Classification accuracy on each task's query set after ``steps`` SGD steps on its support set.

    ``support_y``/``query_y`` hold class indices ``[tasks, shots]``. Returns ``[tasks]`` (detached).
    """
    detached = {k: v.detach() for k, v in params.items()}
    adapted = adapt(model, detached, tasks.support_x, tasks.support_y, inner_lr=inner_lr, steps=steps,
                    first_order=True, adapt_names=adapt_names, loss_fn=loss_fn, vectorize=vectorize)
    with torch.no_grad():
        correct = []
        for t in range(tasks.num_tasks):
            p = {k: v[t] for k, v in adapted.items()}
            logits = functional_call(model, p, (tasks.query_x[t],))
            correct.append((logits.argmax(-1) == tasks.query_y[t]).float().mean())
    return torch.stack(correct)
