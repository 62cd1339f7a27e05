r"""Task losses, the MAML meta-loss and the objectives :func:`metatut.meta_train` minimises.

:func:`maml_loss` is :math:`\frac{1}{T}\sum_t L_{Q_t}(\mathrm{adapt}_t(\theta))`: what to compute comes as a
:class:`~metatut.engine.options.MetaOptions`, how to run it as an :class:`~metatut.engine.options.ExecutionOptions`
(both built from its keyword arguments, or passed ready as ``options=``/``execution=``).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..models import Params
from ..tasks.base import TaskBatch
from ..validate import (
    apply_loss,
    batch_tensors,
    check_batch,
    check_inputs,
    check_params,
    check_positive_int,
    check_reduction,
    prepare_loss,
)
from .conventions import updates_running_stats
from .execution import over_tasks, reduce, run_meta_loss
from .inner_loop import ClosureLoss, LossFn, prepare, task_objective
from .options import ExecutionOptions, MetaOptions, split_options
from .policy import Probe, use_vmap

__all__ = ["task_loss", "per_task_losses", "summed_task_loss", "maml_loss", "compute_maml_loss", "MAMLObjective",
           "maml_objective", "msl_weights", "meta_gradient", "summed_loss_objective"]


# ------------------------------------------------------------------------------------- task losses
def _task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn, role: str = "y",
               functional: bool = False) -> Tensor:
    return apply_loss(loss_fn, functional_call(model, params, (x,)), y, role)


def task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """Loss of one task's examples ``x [shots, ...]``, ``y [shots, ...]`` at ``params`` (a scalar).

    Example::

        >>> model = nn.Linear(1, 1)
        >>> task_loss(model, dict(model.named_parameters()), torch.zeros(4, 1), torch.zeros(4, 1)).shape
        torch.Size([])
    """
    return _task_loss(model, params, x, y, prepare_loss(loss_fn, {"y": y}))


def _per_task_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn, vectorize, role: str) -> Tensor:
    vmapped = use_vmap(model, vectorize, probe=Probe(params, x, y, x, y, loss_fn))
    return over_tasks(model, partial(_task_loss, loss_fn=loss_fn, role=role), params, (x, y), use_vmap=vmapped)


def per_task_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss,
                    vectorize="auto") -> Tensor:
    """Loss of each task at the same ``params``: ``x [tasks, shots, ...]``, ``y [tasks, shots, ...]`` -> ``[tasks]``.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> per_task_losses(model, mt.init_params(model), batch.query_x, batch.query_y).shape
        torch.Size([3])
    """
    check_inputs(model, params, {"x": x, "y": y})
    loss = prepare_loss(loss_fn, {"y": y})
    return _per_task_losses(model, params, x, y, loss, vectorize, "y")


def _examples(batch: TaskBatch, use: str) -> tuple[Tensor, Tensor]:
    if use == "support":
        return batch.support_x, batch.support_y
    if use == "query":
        return batch.query_x, batch.query_y
    if use == "both":
        return torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)
    raise ValueError(f"use must be one of ('support', 'query', 'both') (got {use!r})")


def summed_task_loss(model: nn.Module, params: Params, batch: TaskBatch, *, loss_fn: LossFn = F.mse_loss,
                     reduction: str = "sum", use: str = "both", vectorize="auto") -> Tensor:
    r"""The joint-training objective :math:`L(\theta) = \sum_t L_t(\theta)` (no adaptation; a scalar).

    ``use`` picks the examples each task contributes: ``'support'``, ``'query'`` or ``'both'``
    (all of the task's labelled examples: a baseline trained this way sees as much data as MAML).
    ``reduction='mean'`` divides by the number of tasks.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> summed_task_loss(model, mt.init_params(model), batch, use="query").shape
        torch.Size([])
    """
    check_params(params)
    check_batch(batch)
    check_inputs(model, params, batch_tensors(batch))
    check_reduction(reduction)
    x, y = _examples(batch, use)
    loss = prepare_loss(loss_fn, {"targets": y})
    return reduce(_per_task_losses(model, params, x, y, loss, vectorize, "targets"), reduction)


# --------------------------------------------------------------------------------------- meta-loss
def compute_maml_loss(model: nn.Module, params: Params, batch, options: MetaOptions,
                      execution: ExecutionOptions) -> Tensor:
    """:func:`maml_loss` with its options as the two objects (inputs checked here); a scalar.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> compute_maml_loss(model, mt.init_params(model), batch, MetaOptions(inner_lr=0.01), ExecutionOptions()).shape
        torch.Size([])
    """
    ready = prepare(model, params, batch, inner_lr=options.inner_lr, inner_optimizer=options.inner_optimizer,
                    inner_loss=options.inner_loss, outer_loss=options.outer_loss, loss_fn=options.loss_fn,
                    steps=options.inner_steps, adapt_names=options.adapt_names, buffers=options.buffers)
    if options.closures and execution.task_workers > 1:
        raise ValueError("task_workers > 1 cannot run inner_loss/outer_loss closures: they call the model object "
                         "themselves, which the threads would share (functional_call swaps tensors into it); use "
                         "task_workers=1 (per_task_backward=True also bounds memory)")
    vmapped = use_vmap(model, execution.vectorize, per_step=ready.overrides is not None,
                       checkpoint_steps=execution.checkpoint_steps, probe=ready.probe)
    if execution.checkpoint_steps and options.inner_steps and updates_running_stats(model):
        raise ValueError("checkpoint_steps=True cannot be used while batch norm updates running statistics (the "
                         "model's own, or per-step buffers=): recomputing each inner step in the backward pass would "
                         "update them a second time. Use checkpoint_steps=False, or model.eval() (running statistics "
                         "are then only read)")
    task_fn = partial(task_objective, losses=ready.losses, optimizer=ready.optimizer, steps=options.inner_steps,
                      first_order=options.first_order, adapt_names=ready.names, weights=options.step_weights,
                      checkpoint_steps=execution.checkpoint_steps)
    return run_meta_loss(model, task_fn, ready.theta, ready.tasks, params, execution=execution, use_vmap=vmapped,
                         reduction=options.reduction)


def maml_loss(model: nn.Module, params: Params, batch, *, inner_lr=None, inner_steps: int = 1,
              first_order: bool = False, adapt_names=None, step_weights=None, checkpoint_steps: bool = False,
              buffers=None, loss_fn: LossFn = F.mse_loss, reduction: str = "mean", vectorize="auto",
              vmap_chunk_size: int | None = None, task_workers: int = 1, per_task_backward: bool = False,
              inner_optimizer=None, inner_loss: ClosureLoss | None = None, outer_loss: ClosureLoss | None = None,
              options: MetaOptions | None = None, execution: ExecutionOptions | None = None) -> Tensor:
    r"""The MAML meta-loss :math:`\frac{1}{T}\sum_t L^{out}_t(\mathrm{adapt}_t(\theta))` (``reduction='mean'``; a scalar).

    Differentiate it with respect to ``params`` (``.backward()`` or ``torch.autograd.grad``) to get
    the second-order meta-gradient, or the first-order one with ``first_order=True``.
    ``inner_steps=0`` makes it the summed-task loss on the query sets.

    Two forms of the losses:

    * ``batch`` a :class:`~metatut.TaskBatch` and ``loss_fn(prediction, target)``: adapt on
      ``loss_fn(model(support_x), support_y)``, score ``loss_fn(model(query_x), query_y)``;
    * closures: ``maml_loss(model, params, tasks, inner_loss=f, outer_loss=g, ...)`` where ``tasks`` is any pytree
      of tensors with a leading task dimension ``[tasks, ...]`` (a dict, a tuple, a ``TaskBatch``), and ``f``/``g``
      are called per task as ``f(params, task)`` (or ``f(params, task, meta_params)``, with the meta-parameters θ
      the inner loop started from, e.g. for iMAML's proximal term), ``task`` being that task's slice (a
      :class:`~metatut.engine.inner_loop.Task` for a ``TaskBatch``); they call the model themselves, e.g.
      ``torch.func.functional_call(model, params, (task["ids"], task["lengths"]))``, and return a scalar. The model
      is still passed: the vmap-or-loop policy judges it. See :func:`~metatut.engine.inner_loop.closure_losses`.

    The inner loop: ``inner_lr`` (SGD; a number, a dict ``{name: step size}`` (scalar or parameter-shaped), or
    ``'learned'`` to read step sizes from ``params``: Meta-SGD, MAML++, see :func:`learned_inner_lrs`) or
    ``inner_optimizer`` (:func:`metatut.inner_sgd`, :func:`metatut.inner_sgd_momentum`, :func:`metatut.inner_adam`,
    a TorchOpt ``GradientTransformation``, or any object with ``init``/``update``:
    :class:`~metatut.engine.inner_optimizers.InnerOptimizer`; its state is per task).
    Options of the MAML family (:class:`~metatut.engine.options.MetaOptions`, or pass one as ``options=``):

    * ``adapt_names``: adapt only these parameters in the inner loop (ANIL: :func:`final_layer_names`);
    * ``step_weights [inner_steps]``: multi-step loss :math:`\sum_k w_k L_Q(\theta_k)` (MAML++);
    * per-step parameters ``per_step.<k>.<name>`` in ``params`` (:func:`per_step_params`) replace
      ``name`` while the model is evaluated at inner step ``k``, and ``buffers={k: {name: tensor}}``
      (:func:`per_step_buffers`) gives each step its own batch-norm running statistics (MAML++'s per-step
      batch norm; per-step parameters also run batched with :class:`metatut.TaskBatchNorm2d`, per-step running
      statistics on the per-task loop only).

    How to run it (:class:`~metatut.engine.options.ExecutionOptions`, or pass one as ``execution=``):
    ``vectorize``: ``'auto'`` (:func:`prefers_vmap`: vmap for verified models, and for convolutional ones only on a
    device where the batched path is faster, e.g. CUDA), ``True`` (vmap over tasks; :class:`VectorizeError` where that
    path is not verified: PyTorch's own batch norm or running statistics, per-step buffers, ``checkpoint_steps``; conv4's
    :class:`metatut.TaskBatchNorm2d` in batch-statistics mode is exact there) or ``False`` (the per-task loop, the
    reference). ``vmap_chunk_size=c`` runs the vmap path ``c`` tasks at a time, bounding memory.
    ``checkpoint_steps``: recompute each inner step in the backward pass instead of storing it
    (gradient checkpointing: less memory, more time; per-task loop only; refused while batch norm
    updates running statistics, which the recomputation would update twice: use ``model.eval()``).
    ``per_task_backward=True`` differentiates each task as soon as its loss is built and frees its graph
    (memory of one task instead of the whole meta-batch, as the training command does), and
    ``task_workers=w`` runs the per-task loop in ``w`` threads, each differentiating its share of the tasks
    (:func:`accumulated_meta_loss`; not with closures); with either, the loss returned is differentiable once.
    With closures, a model that cannot be judged statically (:func:`metatut.engine.policy.judge`) is checked at run
    time through the closures, on the model itself (its buffers restored afterwards).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> params = mt.init_params(model)
        >>> batch = mt.SinusoidTasks().sample(4, 5, generator=mt.make_generator(0))
        >>> loss = maml_loss(model, params, batch, inner_lr=0.01, inner_steps=2)
        >>> same = maml_loss(model, params, batch, options=MetaOptions(inner_lr=0.01, inner_steps=2),
        ...                  execution=ExecutionOptions(vectorize=False))
        >>> torch.allclose(loss, same)
        True
        >>> def support(p, task):
        ...     return F.mse_loss(functional_call(model, p, (task["sx"],)), task["sy"])
        >>> def query(p, task):
        ...     return F.mse_loss(functional_call(model, p, (task["qx"],)), task["qy"])
        >>> tasks = {"sx": batch.support_x, "sy": batch.support_y, "qx": batch.query_x, "qy": batch.query_y}
        >>> closure = maml_loss(model, params, tasks, inner_loss=support, outer_loss=query, inner_lr=0.01, inner_steps=2)
        >>> torch.allclose(loss, closure)
        True
    """
    meta, run = split_options(options, execution, inner_lr=inner_lr, inner_steps=inner_steps,
                              first_order=first_order, adapt_names=adapt_names, step_weights=step_weights,
                              buffers=buffers, loss_fn=loss_fn, reduction=reduction, vectorize=vectorize,
                              vmap_chunk_size=vmap_chunk_size, task_workers=task_workers,
                              per_task_backward=per_task_backward, checkpoint_steps=checkpoint_steps,
                              inner_optimizer=inner_optimizer, inner_loss=inner_loss, outer_loss=outer_loss)
    return compute_maml_loss(model, params, batch, meta, run)


def msl_weights(iteration: int, inner_steps: int, anneal_iterations: int, *, min_weight: float = 0.03) -> Tensor:
    """MAML++'s multi-step-loss weights at meta-iteration ``iteration`` (Antoniou et al. 2019, sec. 4).

    They start uniform (1/K each) and move linearly, over ``anneal_iterations``, towards all weight on
    the last step; the earlier steps keep at least ``min_weight / K``. Returns ``[inner_steps]``,
    summing to 1.

    Example::

        >>> msl_weights(0, 4, 100)
        tensor([0.2500, 0.2500, 0.2500, 0.2500], dtype=torch.float64)
        >>> msl_weights(100, 2, 100)
        tensor([0.0150, 0.9850], dtype=torch.float64)
    """
    k = check_positive_int("inner_steps", inner_steps)
    n = check_positive_int("anneal_iterations", anneal_iterations)
    frac = min(max(iteration, 0) / n, 1.0)
    floor = min_weight / k
    early = max(1.0 / k - frac / k, floor)
    weights = torch.full((k,), early, dtype=torch.float64)
    weights[-1] = 1.0 - early * (k - 1)
    return weights


class MAMLObjective:
    """``objective(params, batch, step)`` for :func:`metatut.meta_train`: :func:`maml_loss` with fixed options
    (its keyword arguments, or ``options=``/``execution=`` objects), plus MAML++'s schedules over meta-iterations.

    * ``first_order_until=N``: first-order meta-gradients for iterations ``< N``, then second order
      (derivative-order annealing);
    * ``msl_anneal_iterations=N``: multi-step loss with :func:`msl_weights` annealed over ``N`` iterations
      (needs ``inner_steps >= 2`` to matter).

    ``objective.options`` is the dict of keyword arguments (it may be replaced).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> objective = MAMLObjective(model, inner_lr=0.01, inner_steps=2, first_order_until=10)
        >>> objective.options_at(3)["first_order"], objective.options_at(10).get("first_order", False)
        (True, False)
    """

    uses_step = True

    def __init__(self, model: nn.Module, *, first_order_until: int = 0, msl_anneal_iterations: int = 0, **options):
        if "inner_lr" not in options and "inner_optimizer" not in options \
                and not isinstance(options.get("options"), MetaOptions):
            raise TypeError("maml_objective needs inner_lr (a number >= 0, a dict of step sizes or 'learned') or "
                            "inner_optimizer")
        split_options(**options)   # validates every option once, here
        check_positive_int("first_order_until", first_order_until, minimum=0)
        check_positive_int("msl_anneal_iterations", msl_anneal_iterations, minimum=0)
        self.model, self.options = model, options
        self.first_order_until, self.msl_anneal_iterations = first_order_until, msl_anneal_iterations

    def options_at(self, step: int | None) -> dict:
        """The keyword arguments :func:`maml_loss` gets at meta-iteration ``step``."""
        options = dict(self.options)
        changes = {}
        if step is not None and step < self.first_order_until:
            changes["first_order"] = True
        if self.msl_anneal_iterations and step is not None:
            meta = options.get("options")
            steps = meta.inner_steps if isinstance(meta, MetaOptions) else options.get("inner_steps", 1)
            changes["step_weights"] = msl_weights(step, steps, self.msl_anneal_iterations)
        if isinstance(options.get("options"), MetaOptions):
            options["options"] = options["options"].replace(**changes) if changes else options["options"]
        else:
            options.update(changes)
        return options

    def __call__(self, params: Params, batch: TaskBatch, step: int | None = None) -> Tensor:
        return maml_loss(self.model, params, batch, **self.options_at(step))

    def __repr__(self) -> str:
        extra = {k: v for k, v in (("first_order_until", self.first_order_until),
                                   ("msl_anneal_iterations", self.msl_anneal_iterations)) if v}
        return f"MAMLObjective({type(self.model).__name__}, {self.options | extra})"


def maml_objective(model: nn.Module, **options) -> MAMLObjective:
    """``objective(params, batch)`` for :func:`metatut.meta_train`: :func:`maml_loss` with fixed options
    (see :class:`MAMLObjective` for MAML++'s schedules).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> objective = maml_objective(model, inner_lr=0.01)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> objective(mt.init_params(model), batch).shape
        torch.Size([])
    """
    return MAMLObjective(model, **options)


def summed_loss_objective(model: nn.Module, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for the joint-training baseline (:func:`summed_task_loss`).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> summed_loss_objective(model, reduction="mean")(mt.init_params(model), batch).shape
        torch.Size([])
    """
    return partial(summed_task_loss, model, **options)


def meta_gradient(objective: Callable[[Params, TaskBatch], Tensor], params: Params,
                  batch: TaskBatch) -> tuple[Tensor, Params]:
    """Return ``(loss, {name: d loss / d param})`` for any objective (detached; each gradient the shape of its
    parameter).

    A parameter the objective does not use has gradient zero (returned as zeros of its shape), e.g. the
    originals of batch-norm weights replaced by per-step copies in ``{**params, **per_step_params(...)}``.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> loss, grads = meta_gradient(maml_objective(model, inner_lr=0.01), mt.init_params(model), batch)
        >>> grads["0.weight"].shape
        torch.Size([8, 1])
    """
    check_params(params)
    names = list(params)
    tensors = [params[n] if params[n].requires_grad else params[n].detach().requires_grad_() for n in names]
    with torch.enable_grad():
        loss = objective(dict(zip(names, tensors, strict=True)), batch)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
    return loss.detach(), dict(zip(names, grads, strict=True))
