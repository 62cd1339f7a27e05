"""Evaluation on held-out tasks: mean and 95% confidence interval (1.96 * std / sqrt(n))."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .functional import LossFn, adapt, adaptation_curve
from .models import Params
from .tasks.base import TaskBatch, check_positive_int

__all__ = ["Summary", "summarize", "evaluate_adaptation", "adapted_accuracy", "adapted_predictor", "held_out_episodes"]


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
    if isinstance(steps, str) or not isinstance(steps, Sequence) \
            or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in steps):
        raise TypeError(f"steps must be a tuple of inner-step counts, e.g. steps=(0, 1, 10) (got {steps!r})")
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be a non-empty list of ints >= 0, e.g. steps=(0, 1, 10) (got {tuple(steps)})")
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


def held_out_episodes(images, episodes: int, n_way: int, k_shot: int, q_query: int, *, seed: int = 2015,
                  chunk: int = 100) -> list[TaskBatch]:
    """Seeded test episodes, drawn ``chunk`` at a time from one generator on the images' device.

    Whole chunks are always drawn (the last one cut to size), so the first ``n`` episodes are the same
    whatever ``episodes >= n`` is: a short evaluation re-checks a prefix of a long recorded one.
    Returns a list of :class:`TaskBatch` of at most ``chunk`` tasks each (``[tasks, N*K, 1, 28, 28]``).
    """
    from .tasks.episodes import sample_episodes

    check_positive_int("episodes", episodes)
    check_positive_int("chunk", chunk)
    device = images.images.device if hasattr(images, "images") else torch.as_tensor(images).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for start in range(0, episodes, chunk):
        batch = sample_episodes(images, chunk, n_way, k_shot, q_query, generator=generator)
        batches.append(batch[: min(chunk, episodes - start)])
    return batches


def adapted_predictor(model: nn.Module, params: Params, *, inner_lr, steps: int, adapt_names=None,
                      loss_fn: LossFn = F.cross_entropy):
    """``predict(support_x [n, ...], support_y [n], query_x [m, ...]) -> labels [m]`` for one task:
    fine-tune on the support set as :func:`adapted_accuracy` does, then take the arg-max class
    (e.g. for :func:`metatut.data.evaluate_one_shot`)."""
    def predict(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        adapted = adapt(model, {k: v.detach() for k, v in params.items()}, support_x[None], support_y[None],
                        inner_lr=inner_lr, steps=steps, first_order=True, adapt_names=adapt_names, loss_fn=loss_fn)
        with torch.no_grad():
            return functional_call(model, {k: v[0] for k, v in adapted.items()}, (query_x,)).argmax(-1)
    return predict
