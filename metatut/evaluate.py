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

from .engine.execution import over_tasks
from .engine.inner_loop import LossFn, inner_trajectory, prepare
from .engine.policy import use_vmap
from .models import Params
from .tasks.base import TaskBatch
from .tasks.episodes import held_out_episodes

__all__ = ["Summary", "summarize", "adaptation_curve", "evaluate_adaptation", "adapted_accuracy", "adapted_logits", "adapted_predictor",
           "held_out_episodes"]


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` per-task values with the half-width of its 95% confidence interval.

    Example::

        >>> summary = Summary(mean=0.5, ci95=0.02, n=600)
        >>> print(summary), f"{summary:.1f}"
        0.500 ± 0.020 (n=600)
        (None, '0.5 ± 0.0')
    """

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
    """Mean ± 1.96·σ/√n of per-task values ``[n]`` (σ: sample standard deviation; the papers use n = 600).

    Example::

        >>> summarize([1.0, 2.0, 3.0])
        Summary(mean=2.0, ci95=1.1316..., n=3)
    """
    v = torch.as_tensor(values, dtype=torch.float64).detach().flatten().cpu()
    if v.numel() < 2:
        raise ValueError(f"values must hold at least 2 numbers to estimate a confidence interval (got {v.numel()})")
    if not torch.isfinite(v).all():
        raise ValueError("values contain NaN or infinity")
    n = v.numel()
    return Summary(float(v.mean()), float(1.96 * v.std(unbiased=True) / math.sqrt(n)), n)


def adaptation_curve(model: nn.Module, params: Params, batch, *, inner_lr=None, steps: int,
                     adapt_names=None, buffers=None, loss_fn: LossFn = F.mse_loss, vectorize="auto",
                     chunk_size: int | None = None, inner_optimizer=None, inner_loss=None,
                     outer_loss=None) -> Tensor:
    """Query (outer) loss of each task after 0, 1, ..., ``steps`` inner steps on its support set (inner loss).

    Returns a detached tensor ``[tasks, steps + 1]``. Used at test time: no meta-gradient is kept.
    ``inner_lr``, ``inner_optimizer``, ``adapt_names`` and ``buffers`` are as in :func:`metatut.maml_loss` (e.g.
    ``'learned'`` for Meta-SGD, ``inner_optimizer=metatut.inner_adam(0.01)``), and so is the closure form: ``batch``
    any pytree of tensors ``[tasks, ...]`` with ``inner_loss``/``outer_loss`` functions of ``(params, task)``.
    ``chunk_size`` bounds the tasks per vmap call.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> adaptation_curve(model, mt.init_params(model), batch, inner_lr=0.01, steps=4).shape
        torch.Size([3, 5])
    """
    ready = prepare(model, {k: v.detach() for k, v in params.items()} if isinstance(params, dict) else params, batch,
                    inner_lr=inner_lr, inner_optimizer=inner_optimizer, inner_loss=inner_loss, outer_loss=outer_loss,
                    loss_fn=loss_fn, steps=steps, adapt_names=adapt_names, buffers=buffers)
    losses = ready.losses

    def curve(net, p, task, functional):
        path = inner_trajectory(net, p, task, losses=losses, optimizer=ready.optimizer, steps=steps, first_order=True,
                                adapt_names=ready.names, functional=functional)
        return torch.stack([losses.outer(net, q, task, k, p).detach() for k, q in enumerate(path)])

    with torch.no_grad():
        vmapped = use_vmap(model, vectorize, per_step=ready.overrides is not None, probe=ready.probe)
        return over_tasks(model, curve, ready.theta, (ready.tasks,), use_vmap=vmapped, chunk_size=chunk_size)


def evaluate_adaptation(model: nn.Module, params: Params, tasks, *, inner_lr=None,
                        steps: Sequence[int] = (0, 1, 10), adapt_names=None, loss_fn: LossFn = F.mse_loss,
                        vectorize="auto", chunk_size: int | None = None, inner_optimizer=None, inner_loss=None,
                        outer_loss=None) -> dict[int, Summary]:
    """Fine-tune ``params`` on each held-out task's support set and score its query set.

    Returns ``{k: Summary}``: the query loss after ``k`` inner steps (SGD of size ``inner_lr``, or
    ``inner_optimizer``), for each ``k`` in ``steps``. Works for any parameters: MAML's, the summed-loss
    baseline's, a random init; and for the closure form (``inner_loss``/``outer_loss``, see
    :func:`adaptation_curve`).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> tasks = mt.SinusoidTasks().sample(4, 5, generator=mt.make_generator(0))
        >>> result = evaluate_adaptation(model, mt.init_params(model), tasks, inner_lr=0.01, steps=(0, 2))
        >>> sorted(result), result[2].n
        ([0, 2], 4)
    """
    if isinstance(steps, str) or not isinstance(steps, Sequence) \
            or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in steps):
        raise TypeError(f"steps must be a tuple of inner-step counts, e.g. steps=(0, 1, 10) (got {steps!r})")
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be a non-empty list of ints >= 0, e.g. steps=(0, 1, 10) (got {tuple(steps)})")
    curve = adaptation_curve(model, params, tasks, inner_lr=inner_lr, steps=steps[-1], adapt_names=adapt_names,
                             loss_fn=loss_fn, vectorize=vectorize, chunk_size=chunk_size,
                             inner_optimizer=inner_optimizer, inner_loss=inner_loss, outer_loss=outer_loss)
    return {k: summarize(curve[:, k]) for k in steps}


def adapted_logits(model: nn.Module, params: Params, tasks: TaskBatch, *, inner_lr, steps: int,
                   adapt_names=None, buffers=None, loss_fn: LossFn = F.cross_entropy, vectorize="auto") -> Tensor:
    """The model's outputs on each task's query set after ``steps`` inner steps on its support set, evaluated
    exactly as the meta-loss evaluates the query set after the last step: with the per-step parameters and
    ``buffers`` of step ``steps`` when ``params`` holds MAML++'s per-step copies. Returns ``[tasks, queries, ...]``
    (detached). ``inner_lr``, ``adapt_names`` and ``buffers`` are as in :func:`metatut.maml_loss`.

    Example::

        >>> import metatut as mt
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> episodes = mt.sample_episodes(torch.rand(5, 4, 4, 4), 2, n_way=3, k_shot=1, q_query=2)
        >>> adapted_logits(model, mt.init_params(model), episodes, inner_lr=0.1, steps=1).shape
        torch.Size([2, 6, 3])
    """
    from .engine.conventions import at_step

    ready = prepare(model, {k: v.detach() for k, v in params.items()}, tasks, inner_lr=inner_lr, loss_fn=loss_fn,
                    steps=steps, adapt_names=adapt_names, buffers=buffers)

    def query_outputs(net, p, task, functional):
        adapted = inner_trajectory(net, p, task, losses=ready.losses, optimizer=ready.optimizer, steps=steps,
                                   first_order=True, adapt_names=ready.names, functional=functional)[-1]
        return functional_call(net, {**adapted, **at_step(ready.overrides, steps)}, (task.query_x,)).detach()

    with torch.no_grad():
        vmapped = use_vmap(model, vectorize, per_step=ready.overrides is not None, probe=ready.probe)
        return over_tasks(model, query_outputs, ready.theta, (ready.tasks,), use_vmap=vmapped)


def adapted_accuracy(model: nn.Module, params: Params, tasks: TaskBatch, *, inner_lr, steps: int,
                     adapt_names=None, buffers=None, loss_fn: LossFn = F.cross_entropy, vectorize="auto") -> Tensor:
    """Classification accuracy on each task's query set after ``steps`` SGD steps on its support set.

    ``support_y``/``query_y`` hold class indices ``[tasks, shots]``. Returns ``[tasks]`` (detached). MAML++'s
    per-step parameters (and ``buffers``) are used as in training: the query set is scored with those of step
    ``steps`` (:func:`adapted_logits`).

    Example::

        >>> import metatut as mt
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> episodes = mt.sample_episodes(torch.rand(5, 4, 4, 4), 2, n_way=3, k_shot=1, q_query=2)
        >>> adapted_accuracy(model, mt.init_params(model), episodes, inner_lr=0.1, steps=1).shape
        torch.Size([2])
    """
    logits = adapted_logits(model, params, tasks, inner_lr=inner_lr, steps=steps, adapt_names=adapt_names,
                            buffers=buffers, loss_fn=loss_fn, vectorize=vectorize)
    return (logits.argmax(-1) == tasks.query_y).float().mean(-1)


def adapted_predictor(model: nn.Module, params: Params, *, inner_lr, steps: int, adapt_names=None,
                      buffers=None, loss_fn: LossFn = F.cross_entropy):
    """``predict(support_x [n, ...], support_y [n], query_x [m, ...]) -> labels [m]`` for one task:
    fine-tune on the support set as :func:`adapted_accuracy` does (per-step parameters and ``buffers`` included),
    then take the arg-max class (e.g. for :func:`metatut.data.evaluate_one_shot`).

    Example::

        >>> import metatut as mt
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> predict = adapted_predictor(model, mt.init_params(model), inner_lr=0.1, steps=1)
        >>> predict(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), torch.rand(3, 1, 2, 2)).shape
        torch.Size([3])
    """
    def predict(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        dummy_y = torch.zeros(query_x.shape[0], dtype=support_y.dtype, device=support_y.device)
        task = TaskBatch(support_x[None], support_y[None], query_x[None], dummy_y[None])
        return adapted_logits(model, params, task, inner_lr=inner_lr, steps=steps, adapt_names=adapt_names,
                              buffers=buffers, loss_fn=loss_fn, vectorize=False)[0].argmax(-1)
    return predict
