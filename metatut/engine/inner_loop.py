r"""The inner loop: optimiser steps on one task's inner loss, and the outer loss along the trajectory.

The core works on **closures**: an inner loss and an outer loss, each a function of ``(params, task)`` (or
``(params, task, meta_params)``) returning a scalar, where ``task`` is one task's slice of any pytree of tensors
with a leading task dimension. One inner step is ``optimizer.update`` on the gradient of the inner loss
(:mod:`metatut.engine.inner_optimizers`; plain SGD :math:`\theta_{k+1} = \theta_k - \alpha \nabla L_S(\theta_k)` by
default); the trajectory :math:`[\theta_0, \dots, \theta_K]` is what MAML's meta-loss and the adaptation curves
read. The ``TaskBatch`` + ``loss_fn(prediction, target)`` form is a thin layer on top: its closures call
``functional_call(model, params, (x,))`` on the support and query sets (:func:`loss_fn_losses`).

Each function works on one task; :mod:`metatut.engine.execution` runs it over the tasks (``functional=True`` inside
``vmap``).
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from ..models import Params
from ..validate import apply_loss, check_adapt_names, check_inputs, check_positive_int, prepare_loss
from .conventions import MetaParams, at_step, resolve_inner_lr, step_overrides
from .execution import checkpointed, num_tasks, over_tasks, task_slice
from .inner_optimizers import SGD, as_inner_optimizer, resolve_optimizer
from .policy import Probe, use_vmap

__all__ = ["inner_step", "adapt", "sgd_step", "trajectory", "task_meta_loss", "LossFn", "ClosureLoss", "Task",
           "TaskLosses", "loss_fn_losses", "closure_losses", "inner_trajectory", "task_objective", "check_tasks",
           "as_tasks", "ClosureProbe", "Prepared", "prepare"]

#: ``loss_fn(prediction, target) -> scalar``, e.g. ``torch.nn.functional.mse_loss``.
LossFn = Callable[[Tensor, Tensor], Tensor]

#: ``loss(params, task) -> scalar`` or ``loss(params, task, meta_params) -> scalar`` (see :func:`closure_losses`).
ClosureLoss = Callable[..., Tensor]


class Task(NamedTuple):
    """One task of a :class:`~metatut.TaskBatch` as the closures see it: ``support_x [shots, ...]``,
    ``support_y [shots, ...]``, ``query_x [query_shots, ...]``, ``query_y [query_shots, ...]`` (a named tuple, so
    a pytree that ``vmap`` slices).

    Example::

        >>> import metatut as mt
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> as_tasks(batch).support_x.shape, Task(*as_tasks(batch))[0].shape
        (torch.Size([3, 5, 1]), torch.Size([3, 5, 1]))
    """

    support_x: Any
    support_y: Any
    query_x: Any
    query_y: Any


def as_tasks(tasks):
    """A :class:`~metatut.TaskBatch` as a :class:`Task` of its four tensors (``[tasks, ...]`` each); any other
    pytree as it is.

    Example::

        >>> import metatut as mt
        >>> type(as_tasks(mt.SinusoidTasks().sample(2, 3))).__name__, as_tasks({"x": 1})
        ('Task', {'x': 1})
    """
    from ..tasks.base import TaskBatch

    if isinstance(tasks, TaskBatch):
        return Task(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
    return tasks


def check_tasks(tasks, name: str = "tasks") -> dict[str, Tensor]:
    """Check that ``tasks`` is a pytree (dict, tuple, list, named tuple, :class:`~metatut.TaskBatch`) of tensors
    sharing a leading task dimension >= 1; returns ``{'tasks[path]': tensor}`` (for the dtype and device checks).

    Example::

        >>> sorted(check_tasks({"ids": torch.zeros(2, 4, dtype=torch.long), "y": torch.zeros(2, 4)}))
        ["tasks['ids']", "tasks['y']"]
        >>> check_tasks({"ids": torch.zeros(2, 4), "y": torch.zeros(3, 4)})
        Traceback (most recent call last):
        ...
        ValueError: every tensor in tasks must have the same leading (task) dimension (got {"tasks['ids']": 2, ...
    """
    from torch.utils._pytree import tree_flatten_with_path, keystr

    tasks = as_tasks(tasks)
    leaves = tree_flatten_with_path(tasks)[0]
    named = {}
    for path, leaf in leaves:
        key = f"{name}{keystr(path)}"
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name} must be a pytree (a dict, tuple, list or TaskBatch) of tensors with a leading "
                            f"task dimension; {key} is a {type(leaf).__name__}")
        if leaf.dim() < 1:
            raise ValueError(f"every tensor in {name} needs a leading task dimension; {key} is a scalar")
        named[key] = leaf
    if not named:
        raise ValueError(f"{name} holds no tensors")
    sizes = {k: t.shape[0] for k, t in named.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every tensor in {name} must have the same leading (task) dimension (got {sizes})")
    if next(iter(sizes.values())) < 1:
        raise ValueError(f"{name} holds 0 tasks")
    return named


def _arity(fn, name: str) -> int:
    """2 for ``fn(params, task)``, 3 for ``fn(params, task, meta_params)``."""
    if not callable(fn):
        raise TypeError(f"{name} must be a function {name}(params, task) -> scalar tensor (got {fn!r})")
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 2
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    if len(positional) >= 3:
        return 3
    if len(positional) == 2 or variadic:
        return 2
    raise TypeError(f"{name} must take (params, task) or (params, task, meta_params) (its signature is "
                    f"{inspect.signature(fn)})")


def _scalar(value, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must return a scalar tensor (one task's loss; got {shape}): reduce over the "
                         "task's examples, e.g. with .mean()")
    return value


@dataclass(frozen=True)
class TaskLosses:
    """One task's inner and outer loss at inner step ``k``: ``inner(net, params, task, k, meta_params)`` and
    ``outer(...)``, scalars (``net``: the model to call, a per-thread copy in the threaded loop; ``meta_params``:
    the trajectory's start θ). ``uses_net``: whether they call ``net`` (False for a user's closures, which call
    their own model). Made by :func:`loss_fn_losses` and :func:`closure_losses`.

    Example::

        >>> losses = closure_losses(lambda p, t: (p["w"] * t).sum(), lambda p, t: p["w"].sum())
        >>> losses.inner(None, {"w": torch.ones(2)}, torch.ones(2), 0, {}).item()
        2.0
    """

    inner: Callable[..., Tensor]
    outer: Callable[..., Tensor] | None
    uses_net: bool = True


def loss_fn_losses(loss_fn, overrides=None) -> TaskLosses:
    """The losses of the ``TaskBatch`` form: ``loss_fn(net(support_x), support_y)`` inside,
    ``loss_fn(net(query_x), query_y)`` outside, each with the per-step replacements ``overrides[k]`` (MAML++).
    The task is a :class:`Task`.

    Example::

        >>> losses = loss_fn_losses(F.mse_loss)
        >>> task = Task(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1), torch.ones(2, 1))
        >>> net = nn.Linear(1, 1, bias=False)
        >>> losses.inner(net, {"weight": torch.ones(1, 1)}, task, 0, {}).item()
        1.0
    """
    def inner(net, params, task, k, meta):
        return apply_loss(loss_fn, functional_call(net, {**params, **at_step(overrides, k)}, (task.support_x,)),
                          task.support_y, "support_y")

    def outer(net, params, task, k, meta):
        return apply_loss(loss_fn, functional_call(net, {**params, **at_step(overrides, k)}, (task.query_x,)),
                          task.query_y, "query_y")

    return TaskLosses(inner, outer, True)


def closure_losses(inner_loss: ClosureLoss, outer_loss: ClosureLoss | None = None, overrides=None) -> TaskLosses:
    """The losses of the closure form: ``inner_loss(params, task)`` and ``outer_loss(params, task)``, or with a
    third positional parameter ``(params, task, meta_params)``, where ``meta_params`` is θ, the parameters the
    inner loop started from (e.g. for iMAML's proximal term ``(λ/2)‖params − meta_params‖²``).

    ``params`` is the full parameter dict the model should be evaluated with (the adapted tensors, the others as
    given, per-step replacements applied; learned step sizes ``inner_lr.*`` removed); ``task`` is one task's slice
    of the tasks pytree (a :class:`Task` for a ``TaskBatch``). Each must return a scalar tensor.

    Example::

        >>> losses = closure_losses(lambda p, t, theta: ((p["w"] - theta["w"]) ** 2).sum(), lambda p, t: p["w"].sum())
        >>> losses.inner(None, {"w": torch.ones(2)}, None, 0, {"w": torch.zeros(2)}).item()
        2.0
    """
    inner_arity = _arity(inner_loss, "inner_loss")
    outer_arity = _arity(outer_loss, "outer_loss") if outer_loss is not None else 2

    def call(fn, arity, name):
        def loss(net, params, task, k, meta):
            p = {**params, **at_step(overrides, k)}
            return _scalar(fn(p, task, meta) if arity == 3 else fn(p, task), name)
        return loss

    return TaskLosses(call(inner_loss, inner_arity, "inner_loss"),
                      call(outer_loss, outer_arity, "outer_loss") if outer_loss is not None else None, False)


def _inner_grads(net, params: Params, task, k: int, meta: Params, *, losses: TaskLosses, adapt_names,
                 functional: bool, first_order: bool) -> tuple[Params, Params]:
    """``(params, gradients of the inner loss)`` for the names in ``adapt_names``."""
    if functional:
        def inner_loss(sub):
            return losses.inner(net, {**params, **sub}, task, k, meta)
        grads = grad(inner_loss)({n: params[n] for n in adapt_names})
        return params, ({n: g.detach() for n, g in grads.items()} if first_order else grads)
    with torch.enable_grad():
        inputs = {n: params[n] if params[n].requires_grad else params[n].detach().requires_grad_()
                  for n in adapt_names}
        loss = losses.inner(net, {**params, **inputs}, task, k, meta)
        grads = torch.autograd.grad(loss, list(inputs.values()), create_graph=not first_order)
        return {**params, **inputs}, dict(zip(adapt_names, grads, strict=True))


def _optimizer_step(net, params: Params, state, task, k: int, meta: Params, *, losses, optimizer, adapt_names,
                    functional: bool, first_order: bool):
    params, grads = _inner_grads(net, params, task, k, meta, losses=losses, adapt_names=adapt_names,
                                 functional=functional, first_order=first_order)
    new, state = optimizer.update(grads, state, {n: params[n] for n in adapt_names}, k)
    return {**params, **{n: new[n] for n in adapt_names}}, state


def inner_trajectory(net: nn.Module, theta: Params, task, *, losses: TaskLosses, optimizer, steps: int,
                     first_order: bool, adapt_names, functional: bool, checkpoint_steps: bool = False) -> list[Params]:
    """[theta_0, ..., theta_steps] for one ``task``: ``steps`` updates of ``optimizer`` (its state starts at
    ``optimizer.init``) on the gradient of ``losses.inner`` with respect to the parameters in ``adapt_names``.
    ``functional=True`` uses ``torch.func.grad`` (runs under ``vmap``), ``False`` ``torch.autograd.grad`` with
    ``create_graph=not first_order``; ``checkpoint_steps`` recomputes each step in the backward pass (loop only).

    Example::

        >>> losses = closure_losses(lambda p, t: ((p["w"] - t) ** 2).sum(), None)
        >>> path = inner_trajectory(None, {"w": torch.zeros(1)}, torch.ones(1), losses=losses, optimizer=SGD(0.25),
        ...                         steps=2, first_order=True, adapt_names=["w"], functional=False)
        >>> [p["w"].item() for p in path]
        [0.0, 0.5, 0.75]
    """
    path = [theta]
    params = theta
    state = optimizer.init({n: theta[n] for n in adapt_names})
    options = dict(losses=losses, optimizer=optimizer, adapt_names=adapt_names, first_order=first_order)
    for k in range(steps):
        if checkpoint_steps and not functional:
            # Bind this step's index now: the recomputation in the backward pass runs after the loop has moved on
            # (a closure over the loop variable would see the last step's).
            def step_fn(carry, _k=k):
                return _optimizer_step(net, carry[0], carry[1], task, _k, theta, functional=False, **options)
            params, state = checkpointed(step_fn, (params, state))
        else:
            params, state = _optimizer_step(net, params, state, task, k, theta, functional=functional, **options)
        path.append(params)
    return path


def task_objective(net: nn.Module, theta: Params, task, *, losses: TaskLosses, optimizer, steps: int,
                   first_order: bool, adapt_names, weights=None, functional: bool,
                   checkpoint_steps: bool = False) -> Tensor:
    """One task's meta-loss: ``losses.outer`` after :func:`inner_trajectory` (``weights [steps]``: the weighted sum
    of the outer losses after each step, MAML++'s multi-step loss). A scalar.

    Example::

        >>> losses = closure_losses(lambda p, t: ((p["w"] - t) ** 2).sum(), lambda p, t: ((p["w"] - t) ** 2).sum())
        >>> task_objective(None, {"w": torch.zeros(1)}, torch.ones(1), losses=losses, optimizer=SGD(0.25), steps=1,
        ...                first_order=False, adapt_names=["w"], functional=False).item()
        0.25
    """
    path = inner_trajectory(net, theta, task, losses=losses, optimizer=optimizer, steps=steps, first_order=first_order,
                            adapt_names=adapt_names, functional=functional, checkpoint_steps=checkpoint_steps)
    if weights is None:
        return losses.outer(net, path[-1], task, len(path) - 1, theta)
    values = torch.stack([losses.outer(net, p, task, k, theta) for k, p in enumerate(path) if k > 0])
    return (weights.to(values) * values).sum()


# ------------------------------------------------------------------- the (x, y) form, kept for its callers
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
    losses = loss_fn_losses(loss_fn, {step: fixed} if fixed else None)
    return _optimizer_step(model, params, (), Task(x, y, None, None), step, params, losses=losses,
                           optimizer=SGD(rates), adapt_names=adapt_names, functional=functional,
                           first_order=first_order)[0]


def trajectory(model: nn.Module, params: Params, x: Tensor, y: Tensor, *, rates, steps: int, first_order: bool,
               adapt_names, loss_fn, functional: bool, checkpoint_steps: bool = False,
               overrides=None) -> list[Params]:
    """[theta_0, theta_1, ..., theta_steps] of SGD on one task's ``x``, ``y`` (:func:`inner_trajectory` with
    :func:`loss_fn_losses`); ``overrides[k]`` replaces tensors at step ``k``.

    Example::

        >>> model = nn.Linear(1, 1, bias=False)
        >>> path = trajectory(model, {"weight": torch.ones(1, 1)}, torch.ones(2, 1), torch.zeros(2, 1), rates=0.25,
        ...                   steps=2, first_order=True, adapt_names=["weight"], loss_fn=F.mse_loss, functional=False)
        >>> [p["weight"].item() for p in path]
        [1.0, 0.5, 0.25]
    """
    return inner_trajectory(model, params, Task(x, y, None, None), losses=loss_fn_losses(loss_fn, overrides),
                            optimizer=SGD(rates), steps=steps, first_order=first_order, adapt_names=adapt_names,
                            functional=functional, checkpoint_steps=checkpoint_steps)


def task_meta_loss(model: nn.Module, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *, rates,
                   steps: int, first_order: bool, adapt_names, loss_fn, weights, functional: bool, overrides=None,
                   checkpoint_steps: bool = False, optimizer=None) -> Tensor:
    """One task's meta-loss in the ``(x, y)`` form (:func:`task_objective` with :func:`loss_fn_losses`; SGD with
    ``rates`` unless ``optimizer`` is given). A scalar.

    Example::

        >>> model = nn.Linear(1, 1, bias=False)
        >>> x, y = torch.ones(2, 1), torch.zeros(2, 1)
        >>> task_meta_loss(model, {"weight": torch.ones(1, 1)}, x, y, x, y, weights=None, functional=False,
        ...                loss_fn=F.mse_loss, rates=0.25, steps=1, first_order=True, adapt_names=["weight"]).item()
        0.25
    """
    return task_objective(model, params, Task(sx, sy, qx, qy), losses=loss_fn_losses(loss_fn, overrides),
                          optimizer=optimizer or SGD(rates), steps=steps, first_order=first_order,
                          adapt_names=adapt_names, weights=weights, functional=functional,
                          checkpoint_steps=checkpoint_steps)


# -------------------------------------------------------------------------------- preparing a call
@dataclass(frozen=True, eq=False)
class ClosureProbe(Probe):
    """The runtime vmap check's data for the closure form: the first batch's ``tasks`` pytree and the ``losses``
    (:func:`closure_losses`); the closures call the user's model itself, so the check runs on it (its buffers are
    restored afterwards: :func:`metatut.engine.verify.vmap_matches_loop`).

    Example::

        >>> probe = ClosureProbe({}, None, None, None, None, None, tasks={"x": torch.zeros(4, 2)}, losses=None)
        >>> probe.num_tasks
        4
    """

    tasks: Any = None
    losses: Any = None

    @property
    def num_tasks(self) -> int:
        return num_tasks(self.tasks)


@dataclass(frozen=True)
class Prepared:
    """What an entry point resolved before running the inner loop (made by :func:`prepare`): the tasks pytree,
    the losses, the optimiser, θ (without learned step sizes and per-step tensors), the adapted names, the
    per-step replacements and the probe for the runtime vmap check (a :class:`ClosureProbe` for closures).

    Example::

        >>> import metatut as mt
        >>> model = nn.Linear(1, 1)
        >>> ready = prepare(model, mt.init_params(model), mt.SinusoidTasks().sample(2, 3), inner_lr=0.1, steps=1)
        >>> ready.names, ready.optimizer
        (['weight', 'bias'], sgd(lr=0.1))
    """

    tasks: Any
    losses: TaskLosses
    optimizer: Any
    theta: Params
    names: list[str]
    overrides: list | None
    probe: Probe | None


def _user_stacklevel() -> int:
    from .policy import _caller_level  # one helper for every warning that names the user's line

    return _caller_level() - 1  # counted from this helper, one frame below the warning's caller


def _warn_unused_learned_rates(params: MetaParams, optimizer) -> None:
    """Learned step sizes that the inner optimiser does not read get a zero meta-gradient: say so when they are being
    trained (``requires_grad``), since that is almost always a forgotten ``inner_lr='learned'``."""
    if getattr(optimizer, "lr", None) == "learned":
        return
    trained = [name for rates in params.inner_lrs.values() for name, t in rates.items()
               if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()]
    if trained:
        warnings.warn(f"params hold learned inner step sizes (for {sorted(set(trained))[:4]}...) that the inner "
                      f"optimiser {optimizer!r} does not read: their meta-gradient is zero. Pass inner_lr='learned' "
                      "(Meta-SGD, MAML++) to use them, or leave them out of params", stacklevel=_user_stacklevel())


def prepare(model: nn.Module, params: Params, tasks, *, inner_lr=None, inner_optimizer=None, inner_loss=None,
            outer_loss=None, loss_fn=F.mse_loss, steps: int, adapt_names=None, buffers=None,
            need_outer: bool = True, probe_lr=None) -> Prepared:
    """Validate and resolve the options shared by :func:`metatut.maml_loss`, :func:`adapt` and
    :func:`metatut.adaptation_curve` (see :class:`Prepared`). Closures: ``inner_loss`` and (where ``need_outer``)
    ``outer_loss`` both, with ``tasks`` any pytree of tensors; otherwise ``tasks`` is a ``TaskBatch`` and
    ``loss_fn(prediction, target)`` is used.

    Example::

        >>> import metatut as mt
        >>> model = nn.Linear(1, 1)
        >>> prepare(model, mt.init_params(model), {"x": torch.zeros(2, 3)}, inner_lr=0.1, steps=1,
        ...         inner_loss=lambda p, t: p["weight"].sum())
        Traceback (most recent call last):
        ...
        TypeError: pass both inner_loss and outer_loss (functions of (params, task)) or neither ...
    """
    from ..validate import batch_tensors, check_batch, check_params

    closures = inner_loss is not None or outer_loss is not None
    check_params(params)
    if closures:
        if inner_loss is None or (need_outer and outer_loss is None):
            raise TypeError("pass both inner_loss and outer_loss (functions of (params, task)) or neither (then the "
                            "batch is a metatut.TaskBatch scored with loss_fn(model(x), y))"
                            if need_outer else "adapt takes inner_loss=fn(params, task) (not outer_loss)")
        if not need_outer and outer_loss is not None:
            raise TypeError("adapt takes inner_loss=fn(params, task) only (there is no outer loss to adapt with)")
        if loss_fn is not F.mse_loss:
            raise TypeError("loss_fn is not used with inner_loss/outer_loss: compute the loss inside the closures")
        check_inputs(model, params, check_tasks(tasks))
    else:
        check_batch(tasks)
        check_inputs(model, params, batch_tensors(tasks))
    check_positive_int("steps", steps, minimum=0)
    optimizer = as_inner_optimizer(inner_optimizer, inner_lr=inner_lr)
    params = MetaParams.from_flat(params, model=model)  # legacy keys read with the model's own names
    theta, optimizer = resolve_optimizer(optimizer, params)
    _warn_unused_learned_rates(params, optimizer)
    theta, overrides = step_overrides(theta, steps, buffers)
    names = check_adapt_names(theta, adapt_names)
    rate = probe_lr if probe_lr is not None else (inner_lr if isinstance(inner_lr, (int, float)) else 0.01)
    if closures:
        losses = closure_losses(inner_loss, outer_loss, overrides)
        probe = ClosureProbe(params, None, None, None, None, None, rate, tasks=as_tasks(tasks),
                             losses=closure_losses(inner_loss, outer_loss or inner_loss))
        return Prepared(as_tasks(tasks), losses, optimizer, theta, names, overrides, probe)
    loss = prepare_loss(loss_fn, {"support_y": tasks.support_y, "query_y": tasks.query_y})
    probe = Probe(params, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, loss,
                  inner_lr if inner_lr is not None else rate)
    return Prepared(as_tasks(tasks), loss_fn_losses(loss, overrides), optimizer, theta, names, overrides, probe)


# --------------------------------------------------------------------------------------- public
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
    theta, rates = resolve_inner_lr(inner_lr, params, model=model)
    return sgd_step(model, theta, x, y, rates=rates, step=0, first_order=not create_graph,
                    adapt_names=list(theta), loss_fn=loss, functional=False)


def adapt(model: nn.Module, params: Params, support_x, support_y: Tensor | None = None, *, inner_lr=None,
          steps: int = 1, first_order: bool = False, adapt_names=None, buffers=None, loss_fn=F.mse_loss,
          vectorize="auto", inner_optimizer=None, inner_loss: ClosureLoss | None = None) -> Params:
    """Adapt ``params`` to each task with ``steps`` inner-optimiser steps (SGD of size ``inner_lr`` by default).

    ``support_x [tasks, shots, ...]``, ``support_y [tasks, shots, ...]``; or, in the closure form,
    ``adapt(model, params, tasks, inner_loss=fn(params, task) -> scalar, ...)`` with ``tasks`` any pytree of tensors
    with a leading task dimension (see :func:`closure_losses`). Returns a dict whose tensors
    have a leading task dimension: ``{name: [tasks, *param.shape]}``. The result stays differentiable
    with respect to ``params`` (fully for ``first_order=False``; through the identity path only for
    ``first_order=True``). ``inner_lr`` is a number, a dict of step sizes, or ``'learned'``;
    ``inner_optimizer`` another update rule (:func:`metatut.inner_adam`, ...);
    ``adapt_names`` restricts adaptation to some parameters (ANIL: the head). Per-step parameters and
    ``buffers`` (MAML++) are used as in :func:`metatut.maml_loss` and are not part of the result.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> adapted = adapt(model, mt.init_params(model), batch.support_x, batch.support_y, inner_lr=0.01, steps=2)
        >>> adapted["0.weight"].shape
        torch.Size([3, 8, 1])
        >>> def support_loss(p, task):
        ...     return F.mse_loss(torch.func.functional_call(model, p, (task["x"],)), task["y"])
        >>> tasks = {"x": batch.support_x, "y": batch.support_y}
        >>> same = adapt(model, mt.init_params(model), tasks, inner_loss=support_loss, inner_lr=0.01, steps=2)
        >>> torch.allclose(same["0.weight"], adapted["0.weight"])
        True
    """
    from ..tasks.base import TaskBatch

    if inner_loss is None:
        if support_y is None:
            raise TypeError("adapt needs support_x and support_y, or tasks and inner_loss=fn(params, task)")
        check_inputs(model, params, {"support_x": support_x, "support_y": support_y})
        tasks = TaskBatch(support_x, support_y, support_x, support_y)
    else:
        if support_y is not None:
            raise TypeError("with inner_loss=, pass the tasks as one pytree: adapt(model, params, tasks, "
                            "inner_loss=...) (support_y is not used)")
        tasks = support_x
    ready = prepare(model, params, tasks, inner_lr=inner_lr, inner_optimizer=inner_optimizer, inner_loss=inner_loss,
                    loss_fn=loss_fn, steps=steps, adapt_names=adapt_names, buffers=buffers, need_outer=False)
    vmapped = use_vmap(model, vectorize, per_step=ready.overrides is not None, probe=ready.probe)

    def final(net, p, task, functional):
        return inner_trajectory(net, p, task, losses=ready.losses, optimizer=ready.optimizer, steps=steps,
                                first_order=first_order, adapt_names=ready.names, functional=functional)[-1]

    if vmapped:
        with torch.enable_grad():
            return over_tasks(model, final, ready.theta, (ready.tasks,), use_vmap=True)
    adapted = [final(model, ready.theta, task_slice(ready.tasks, t), False) for t in range(num_tasks(ready.tasks))]
    return {k: torch.stack([a[k] for a in adapted]) for k in ready.theta}

