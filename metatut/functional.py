r"""The engine: task losses, inner-loop adaptation and the MAML meta-loss, as pure functions.

Notation (Finn et al., 2017). For a task :math:`t` with support set :math:`S_t` and query set
:math:`Q_t`, one inner step of size :math:`\alpha` gives

.. math:: \theta'_t = \theta - \alpha \nabla_\theta L_{S_t}(\theta),

and MAML minimises :math:`\sum_t L_{Q_t}(\theta'_t)`. Its gradient is
:math:`\sum_t (I - \alpha \nabla^2 L_{S_t}(\theta))^\top \nabla L_{Q_t}(\theta'_t)` (second order); first-order
MAML drops the Hessian term and uses :math:`\sum_t \nabla L_{Q_t}(\theta'_t)`.

Every function here takes ``(model, params, batch)`` and returns tensors that are differentiable
with respect to ``params`` (a dict of tensors). Nothing here keeps state.

Two execution paths give the same numbers:

* the **loop** path: one task at a time with ``torch.autograd.grad`` (the reference);
* the **vmap** path: all tasks at once with ``torch.func.vmap`` over ``torch.func.grad``.

``vectorize="auto"`` takes vmap only for models built from layers whose vmap path the test-suite
checks against the loop (:data:`VMAP_VERIFIED_LAYERS`); anything else runs the loop.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .models import Params
from .tasks.base import TaskBatch, check_positive_int

__all__ = [
    "LossFn", "VMAP_VERIFIED_LAYERS", "can_vectorize", "task_loss", "per_task_losses", "summed_task_loss",
    "inner_step", "adapt", "maml_loss", "maml_objective", "summed_loss_objective", "meta_gradient",
    "adaptation_curve",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Layer types whose vmap-over-tasks path the tests check against the per-task loop.
VMAP_VERIFIED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Identity, nn.Flatten,
)

_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------------------------- checks
def _check_step_size(name: str, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (got a tensor of shape {tuple(value.shape)})")
        number = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a number >= 0 (got {value!r})")
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError(f"{name} must be a finite number >= 0 (got {number})")
    return number


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS} (got {reduction!r})")


def _check_params(params) -> None:
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of name -> tensor (e.g. metatut.init_params(model))")


def _check_batch(batch) -> None:
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a metatut.TaskBatch (got {type(batch).__name__})")


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def can_vectorize(model: nn.Module) -> bool:
    """True when every submodule of ``model`` is a layer type in :data:`VMAP_VERIFIED_LAYERS`."""
    return all(type(m) in VMAP_VERIFIED_LAYERS for m in model.modules())


def _use_vmap(model: nn.Module, vectorize) -> bool:
    if vectorize == "auto":
        return can_vectorize(model)
    if isinstance(vectorize, bool):
        return vectorize
    raise ValueError(f"vectorize must be True, False or 'auto' (got {vectorize!r})")


# ------------------------------------------------------------------------------------- task losses
def task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """Loss of one task's examples ``x [shots, ...]``, ``y [shots, ...]`` at ``params`` (a scalar)."""
    return loss_fn(functional_call(model, params, (x,)), y)


def per_task_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss,
                    vectorize="auto") -> Tensor:
    """Loss of each task at the same ``params``: ``x [tasks, shots, ...]`` -> ``[tasks]``."""
    if _use_vmap(model, vectorize):
        return vmap(partial(task_loss, model, loss_fn=loss_fn), in_dims=(None, 0, 0))(params, x, y)
    return torch.stack([task_loss(model, params, x[t], y[t], loss_fn) for t in range(x.shape[0])])


def summed_task_loss(model: nn.Module, params: Params, batch: TaskBatch, *, loss_fn: LossFn = F.mse_loss,
                     reduction: str = "sum", use: str = "both", vectorize="auto") -> Tensor:
    r"""The joint-training objective :math:`L(\theta) = \sum_t L_t(\theta)` (no adaptation).

    ``use`` picks the examples each task contributes: ``'support'``, ``'query'`` or ``'both'``
    (all of the task's labelled examples: a baseline trained this way sees as much data as MAML).
    ``reduction='mean'`` divides by the number of tasks.
    """
    _check_params(params)
    _check_batch(batch)
    _check_reduction(reduction)
    if use == "support":
        x, y = batch.support_x, batch.support_y
    elif use == "query":
        x, y = batch.query_x, batch.query_y
    elif use == "both":
        x, y = torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)
    else:
        raise ValueError(f"use must be one of ('support', 'query', 'both') (got {use!r})")
    return _reduce(per_task_losses(model, params, x, y, loss_fn, vectorize), reduction)


# -------------------------------------------------------------------------------------- inner loop
def inner_step(model: nn.Module, params: Params, x: Tensor, y: Tensor, inner_lr: float, *,
               create_graph: bool = True, loss_fn: LossFn = F.mse_loss) -> Params:
    r"""One SGD step on one task's support set: :math:`\theta' = \theta - \alpha \nabla L_S(\theta)`.

    ``create_graph=True`` keeps the step differentiable (second-order MAML); ``False`` treats the
    gradient as a constant (first-order MAML). Returns a new dict; ``params`` is not modified.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    with torch.enable_grad():
        tensors = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors]
        loss = task_loss(model, dict(zip(names, tensors)), x, y, loss_fn)
        grads = torch.autograd.grad(loss, tensors, create_graph=create_graph)
    return {n: t - inner_lr * g for n, t, g in zip(names, tensors, grads)}


def _adapt_one(model, params, x, y, inner_lr, steps, first_order, loss_fn) -> Params:
    for _ in range(steps):
        params = inner_step(model, params, x, y, inner_lr, create_graph=not first_order, loss_fn=loss_fn)
    return params


def _adapt_functional(model, params, x, y, inner_lr, steps, first_order, loss_fn) -> Params:
    """The same inner loop written with ``torch.func.grad`` so that it can run under ``vmap``."""
    def support_loss(p):
        return loss_fn(functional_call(model, p, (x,)), y)
    for _ in range(steps):
        g = grad(support_loss)(params)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        params = {k: params[k] - inner_lr * g[k] for k in params}
    return params


def adapt(model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, *, inner_lr: float,
          steps: int = 1, first_order: bool = False, loss_fn: LossFn = F.mse_loss, vectorize="auto") -> Params:
    """Adapt ``params`` to each task with ``steps`` SGD steps of size ``inner_lr`` on its support set.

    ``support_x [tasks, shots, ...]``, ``support_y [tasks, shots, ...]``. Returns a dict whose tensors
    have a leading task dimension: ``{name: [tasks, *param.shape]}``. The result stays differentiable
    with respect to ``params`` (fully for ``first_order=False``; through the identity path only for
    ``first_order=True``).
    """
    _check_params(params)
    inner_lr = _check_step_size("inner_lr", inner_lr)
    check_positive_int("steps", steps, minimum=0)
    if _use_vmap(model, vectorize):
        fn = partial(_adapt_functional, model, inner_lr=inner_lr, steps=steps, first_order=first_order,
                     loss_fn=loss_fn)
        with torch.enable_grad():
            return vmap(fn, in_dims=(None, 0, 0))(params, support_x, support_y)
    adapted = [_adapt_one(model, params, support_x[t], support_y[t], inner_lr, steps, first_order, loss_fn)
               for t in range(support_x.shape[0])]
    return {k: torch.stack([a[k] for a in adapted]) for k in params}


# --------------------------------------------------------------------------------------- meta-loss
def _query_loss_after_adaptation(model, params, sx, sy, qx, qy, inner_lr, steps, first_order, loss_fn):
    adapted = _adapt_functional(model, params, sx, sy, inner_lr, steps, first_order, loss_fn)
    return loss_fn(functional_call(model, adapted, (qx,)), qy)


def maml_loss(model: nn.Module, params: Params, batch: TaskBatch, *, inner_lr: float, inner_steps: int = 1,
              first_order: bool = False, loss_fn: LossFn = F.mse_loss, reduction: str = "mean",
              vectorize="auto") -> Tensor:
    r"""The MAML meta-loss :math:`\frac{1}{T}\sum_t L_{Q_t}(\mathrm{adapt}_t(\theta))` (``reduction='mean'``).

    Differentiate it with respect to ``params`` (``.backward()`` or ``torch.autograd.grad``) to get
    the second-order meta-gradient, or the first-order one with ``first_order=True``.
    ``inner_steps=0`` makes it the summed-task loss on the query sets.
    """
    _check_params(params)
    _check_batch(batch)
    _check_reduction(reduction)
    inner_lr = _check_step_size("inner_lr", inner_lr)
    check_positive_int("inner_steps", inner_steps, minimum=0)
    if _use_vmap(model, vectorize):
        fn = partial(_query_loss_after_adaptation, model, inner_lr=inner_lr, steps=inner_steps,
                     first_order=first_order, loss_fn=loss_fn)
        losses = vmap(fn, in_dims=(None, 0, 0, 0, 0))(
            params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    else:
        losses = []
        for t in range(batch.num_tasks):
            adapted = _adapt_one(model, params, batch.support_x[t], batch.support_y[t], inner_lr, inner_steps,
                                 first_order, loss_fn)
            losses.append(task_loss(model, adapted, batch.query_x[t], batch.query_y[t], loss_fn))
        losses = torch.stack(losses)
    return _reduce(losses, reduction)


def maml_objective(model: nn.Module, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for :func:`metatut.meta_train`: :func:`maml_loss` with fixed options."""
    _check_step_size("inner_lr", options.get("inner_lr"))
    objective = partial(maml_loss, model, **options)
    objective.__doc__ = f"MAML meta-loss with {options}"
    return objective


def summed_loss_objective(model: nn.Module, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for the joint-training baseline (:func:`summed_task_loss`)."""
    return partial(summed_task_loss, model, **options)


def meta_gradient(objective: Callable[[Params, TaskBatch], Tensor], params: Params,
                  batch: TaskBatch) -> tuple[Tensor, Params]:
    """Return ``(loss, {name: d loss / d param})`` for any objective (detached results)."""
    _check_params(params)
    names = list(params)
    tensors = [params[n] if params[n].requires_grad else params[n].detach().requires_grad_() for n in names]
    with torch.enable_grad():
        loss = objective(dict(zip(names, tensors)), batch)
        grads = torch.autograd.grad(loss, tensors)
    return loss.detach(), dict(zip(names, grads))


# --------------------------------------------------------------------------------------- evaluation
def adaptation_curve(model: nn.Module, params: Params, batch: TaskBatch, *, inner_lr: float, steps: int,
                     loss_fn: LossFn = F.mse_loss, vectorize="auto", chunk_size: int | None = None) -> Tensor:
    """Query loss of each task after 0, 1, ..., ``steps`` SGD steps on its support set.

    Returns a detached tensor ``[tasks, steps + 1]``. Used at test time: no meta-gradient is kept.
    """
    _check_params(params)
    _check_batch(batch)
    inner_lr = _check_step_size("inner_lr", inner_lr)
    check_positive_int("steps", steps, minimum=0)
    base = {k: v.detach() for k, v in params.items()}

    def curve(p, sx, sy, qx, qy):
        def support_loss(q):
            return loss_fn(functional_call(model, q, (sx,)), sy)
        out = [loss_fn(functional_call(model, p, (qx,)), qy)]
        for _ in range(steps):
            g = grad(support_loss)(p)
            p = {k: p[k] - inner_lr * g[k] for k in p}
            out.append(loss_fn(functional_call(model, p, (qx,)), qy))
        return torch.stack(out)

    with torch.no_grad():
        if _use_vmap(model, vectorize):
            return vmap(curve, in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size)(
                base, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return torch.stack([curve(base, batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t])
                            for t in range(batch.num_tasks)])
