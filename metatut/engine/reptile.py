r"""Reptile (Nichol et al. 2018) as a surrogate loss, so that :func:`metatut.meta_train` runs it like MAML."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Params
from ..tasks.base import TaskBatch
from ..validate import batch_tensors, check_batch, check_inputs, check_params, check_positive_int, check_step_size
from .inner_loop import LossFn, adapt
from .inner_optimizers import as_inner_optimizer

__all__ = ["reptile_loss", "reptile_objective"]


def _examples(batch: TaskBatch, use: str) -> tuple[Tensor, Tensor]:
    if use == "both":
        return torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)
    if use == "support":
        return batch.support_x, batch.support_y
    raise ValueError(f"use must be 'support' or 'both' (got {use!r})")


def reptile_loss(model: nn.Module, params: Params, batch: TaskBatch, *, inner_lr: float | None = None,
                 inner_steps: int = 5, use: str = "both", loss_fn: LossFn = F.mse_loss, vectorize="auto",
                 inner_optimizer=None) -> Tensor:
    r"""A surrogate (a scalar) whose gradient is Reptile's update direction :math:`\theta - \frac{1}{T}\sum_t \theta'_t`.

    Reptile runs ``inner_steps`` plain SGD steps on each task's data (``use``: ``'support'`` or ``'both'``,
    support and query together), then moves θ towards the adapted parameters. The surrogate
    :math:`\tfrac12\lVert\theta - \mathrm{sg}(\bar\theta')\rVert^2` has exactly that gradient, so
    :func:`metatut.meta_train` with ``torch.optim.SGD(lr=ε)`` performs
    :math:`\theta \leftarrow \theta + \varepsilon(\bar\theta' - \theta)`; with Adam it is Reptile with Adam.
    ``inner_optimizer`` replaces the inner SGD (e.g. :func:`metatut.inner_adam`, as in the Reptile paper).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> reptile_loss(model, mt.init_params(model), batch, inner_lr=0.01, inner_steps=2).shape
        torch.Size([])
    """
    check_params(params)
    check_batch(batch)
    check_inputs(model, params, batch_tensors(batch))
    check_positive_int("inner_steps", inner_steps)
    x, y = _examples(batch, use)
    detached = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        adapted = adapt(model, detached, x, y, inner_lr=inner_lr, steps=inner_steps, first_order=True,
                        loss_fn=loss_fn, vectorize=vectorize, inner_optimizer=inner_optimizer)
    target = {k: v.detach().mean(0) for k, v in adapted.items()}
    return 0.5 * sum(((params[k] - target[k]) ** 2).sum() for k in params)


def reptile_objective(model: nn.Module, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for :func:`metatut.meta_train`: :func:`reptile_loss` with fixed options.

    Example::

        >>> import metatut as mt
        >>> objective = reptile_objective(mt.mlp(hidden=(8,), seed=0), inner_lr=0.01, inner_steps=1)
        >>> callable(objective)
        True
    """
    if options.get("inner_optimizer") is None:
        check_step_size("inner_lr", options.get("inner_lr"))
    else:
        as_inner_optimizer(options["inner_optimizer"], inner_lr=options.get("inner_lr"))
    return partial(reptile_loss, model, **options)
