r"""The inner loop: SGD steps on one task's support set, and the query loss at the end of the trajectory.

One inner step of size :math:`\alpha` (a number, or per-parameter/per-step step sizes) is
:math:`\theta_{k+1} = \theta_k - \alpha \nabla L_S(\theta_k)` on the parameters being adapted; the trajectory
:math:`[\theta_0, \dots, \theta_K]` is what MAML's meta-loss and the adaptation curves read. Each function works on
one task; :mod:`metatut.engine.execution` runs it over the tasks (``functional=True`` inside ``vmap``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from ..models import Params
from ..validate import apply_loss, check_adapt_names, check_inputs, check_positive_int, prepare_loss
from .conventions import at_step, resolve_inner_lr, step_overrides, step_size
from .execution import checkpointed, over_tasks
from .policy import Probe, use_vmap

__all__ = ["inner_step", "adapt", "sgd_step", "trajectory", "task_meta_loss", "LossFn"]

#: ``loss_fn(prediction, target) -> scalar``, e.g. ``torch.nn.functional.mse_loss``.
LossFn = Callable[[Tensor, Tensor], Tensor]


def _support_grads(model, params: Params, x, y, *, adapt_names, loss_fn, functional: bool, first_order: bool,
                   fixed: Params) -> tuple[Params, Params]:
    """``(params, gradients of the support loss)`` for the names in ``adapt_names``."""
    if functional:
        def support_loss(sub):
            return apply_loss(loss_fn, functional_call(model, {**params, **fixed, **sub}, (x,)), y, "support_y")
        grads = grad(support_loss)({n: params[n] for n in adapt_names})
        return params, ({n: g.detach() for n, g in grads.items()} if first_order else grads)
    with torch.enable_grad():
        inputs = {n: params[n] if params[n].requires_grad else params[n].detach().requires_grad_()
                  for n in adapt_names}
        loss = apply_loss(loss_fn, functional_call(model, {**params, **fixed, **inputs}, (x,)), y, "support_y")
        grads = torch.autograd.grad(loss, list(inputs.values()), create_graph=not first_order)
        return {**params, **inputs}, dict(zip(adapt_names, grads, strict=True))


def sgd_step(model: nn.Module, params: Params, x: Tensor, y: Tensor, *, rates, step: int, first_order: bool,
             adapt_names, loss_fn, functional: bool, fixed: Params | None = None) -> Params:
    """theta_{k+1} = theta_k - rate * grad L_S(theta_k) on the parameters in ``adapt_names`` (one task:
    ``x [shots, ...]``, ``y [shots, ...]``); ``fixed`` replaces tensors without being adapted.

    ``functional=True`` uses ``torch.func.grad`` (runs under ``vmap``); ``False`` uses
    ``torch.autograd.grad`` with ``create_graph=not first_order`` (the per-task reference).

    Example::

        >>> model = nn.Linear(1, 1, bias=False)
        >>> p = {"weight": torch.ones(1, 1)}
        >>> sgd_step(model, p, torch.ones(2, 1), torch.zeros(2, 1), rates=0.25, step=0, first_order=True,
        ...          adapt_names=["weight"], loss_fn=F.mse_loss, functional=True)["weight"]
        tensor([[0.5000]])
    """
    params, grads = _support_grads(model, params, x, y, adapt_names=adapt_names, loss_fn=loss_fn,
                                   functional=functional, first_order=first_order, fixed=fixed or {})
    new = dict(params)
    for n in adapt_names:
        new[n] = params[n] - step_size(rates, n, step) * grads[n]
    return new


def trajectory(model: nn.Module, params: Params, x: Tensor, y: Tensor, *, rates, steps: int, first_order: bool,
               adapt_names, loss_fn, functional: bool, checkpoint_steps: bool = False,
               overrides=None) -> list[Params]:
    """[theta_0, theta_1, ..., theta_steps] for one task; ``overrides[k]`` replaces tensors at step ``k``;
    ``checkpoint_steps`` recomputes each step in the backward pass (loop path only).

    Example::

        >>> model = nn.Linear(1, 1, bias=False)
        >>> path = trajectory(model, {"weight": torch.ones(1, 1)}, torch.ones(2, 1), torch.zeros(2, 1), rates=0.25,
        ...                   steps=2, first_order=True, adapt_names=["weight"], loss_fn=F.mse_loss, functional=False)
        >>> [p["weight"].item() for p in path]
        [1.0, 0.5, 0.25]
    """
    path = [params]
    options = dict(rates=rates, first_order=first_order, adapt_names=adapt_names, loss_fn=loss_fn)
    for k in range(steps):
        fixed = overrides[k] if overrides else None
        if checkpoint_steps and not functional:
            # Bind this step's index and overrides now: the recomputation in the backward pass runs after
            # the loop has moved on (a closure over the loop variables would see the last step's).
            def step_fn(p, _k=k, _fixed=fixed):
                return sgd_step(model, p, x, y, step=_k, functional=False, fixed=_fixed, **options)
            params = checkpointed(step_fn, params)
        else:
            params = sgd_step(model, params, x, y, step=k, functional=functional, fixed=fixed, **options)
        path.append(params)
    return path


def _query_loss(model, params: Params, qx, qy, loss_fn, overrides, k: int) -> Tensor:
    return apply_loss(loss_fn, functional_call(model, {**params, **at_step(overrides, k)}, (qx,)), qy, "query_y")


def task_meta_loss(model: nn.Module, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *, rates,
                   steps: int, first_order: bool, adapt_names, loss_fn, weights, functional: bool, overrides=None,
                   checkpoint_steps: bool = False) -> Tensor:
    """One task's meta-loss: the query loss after the trajectory (``weights [steps]``: the weighted sum of the
    query losses after each step, MAML++'s multi-step loss); the other options are :func:`trajectory`'s. A scalar.

    Example::

        >>> model = nn.Linear(1, 1, bias=False)
        >>> x, y = torch.ones(2, 1), torch.zeros(2, 1)
        >>> task_meta_loss(model, {"weight": torch.ones(1, 1)}, x, y, x, y, weights=None, functional=False,
        ...                loss_fn=F.mse_loss, rates=0.25, steps=1, first_order=True, adapt_names=["weight"]).item()
        0.25
    """
    path = trajectory(model, params, sx, sy, rates=rates, steps=steps, first_order=first_order, adapt_names=adapt_names,
                      loss_fn=loss_fn, functional=functional, checkpoint_steps=checkpoint_steps, overrides=overrides)
    if weights is None:
        return _query_loss(model, path[-1], qx, qy, loss_fn, overrides, len(path) - 1)
    losses = torch.stack([_query_loss(model, p, qx, qy, loss_fn, overrides, k) for k, p in enumerate(path) if k > 0])
    return (weights.to(losses) * losses).sum()


def inner_step(model: nn.Module, params: Params, x: Tensor, y: Tensor, inner_lr: float, *,
               create_graph: bool = True, loss_fn=F.mse_loss) -> Params:
    r"""One SGD step on one task's support set: :math:`\theta' = \theta - \alpha \nabla L_S(\theta)`.

    ``x [shots, ...]``, ``y [shots, ...]``. ``create_graph=True`` keeps the step differentiable
    (second-order MAML); ``False`` treats the gradient as a constant (first-order MAML).
    Returns a new dict (the parameters' shapes); ``params`` is not modified.

    Example::

        >>> import metatut as mt
        >>> model = nn.Linear(1, 1)
        >>> params = mt.init_params(model)
        >>> new = inner_step(model, params, torch.randn(5, 1), torch.randn(5, 1), 0.1)
        >>> sorted(new), new["weight"].shape
        (['bias', 'weight'], torch.Size([1, 1]))
    """
    check_inputs(model, params, {"x": x, "y": y})
    loss = prepare_loss(loss_fn, {"support_y": y})
    theta, rates = resolve_inner_lr(inner_lr, params)
    return sgd_step(model, theta, x, y, rates=rates, step=0, first_order=not create_graph,
                    adapt_names=list(theta), loss_fn=loss, functional=False)


def adapt(model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, *, inner_lr, steps: int = 1,
          first_order: bool = False, adapt_names=None, buffers=None, loss_fn=F.mse_loss,
          vectorize="auto") -> Params:
    """Adapt ``params`` to each task with ``steps`` SGD steps of size ``inner_lr`` on its support set.

    ``support_x [tasks, shots, ...]``, ``support_y [tasks, shots, ...]``. Returns a dict whose tensors
    have a leading task dimension: ``{name: [tasks, *param.shape]}``. The result stays differentiable
    with respect to ``params`` (fully for ``first_order=False``; through the identity path only for
    ``first_order=True``). ``inner_lr`` is a number, a dict of step sizes, or ``'learned'``;
    ``adapt_names`` restricts adaptation to some parameters (ANIL: the head). Per-step parameters and
    ``buffers`` (MAML++) are used as in :func:`metatut.maml_loss` and are not part of the result.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> adapted = adapt(model, mt.init_params(model), batch.support_x, batch.support_y, inner_lr=0.01, steps=2)
        >>> adapted["0.weight"].shape
        torch.Size([3, 8, 1])
    """
    check_inputs(model, params, {"support_x": support_x, "support_y": support_y})
    loss_fn = prepare_loss(loss_fn, {"support_y": support_y})
    check_positive_int("steps", steps, minimum=0)
    theta, rates = resolve_inner_lr(inner_lr, params)
    theta, overrides = step_overrides(theta, steps, buffers)
    names = check_adapt_names(theta, adapt_names)
    options = dict(rates=rates, steps=steps, first_order=first_order, adapt_names=names, loss_fn=loss_fn,
                   overrides=overrides)
    probe = Probe(params, support_x, support_y, support_x, support_y, loss_fn, inner_lr)
    vmapped = use_vmap(model, vectorize, per_step=overrides is not None, probe=probe)

    def final(net, p, x, y, functional):
        return trajectory(net, p, x, y, functional=functional, **options)[-1]

    if vmapped:
        with torch.enable_grad():
            return over_tasks(model, final, theta, (support_x, support_y), use_vmap=True)
    adapted = [final(model, theta, support_x[t], support_y[t], False) for t in range(support_x.shape[0])]
    return {k: torch.stack([a[k] for a in adapted]) for k in theta}
