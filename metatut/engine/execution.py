"""Ways of running the per-task computation; every one gives the loop's numbers (up to the order of summation).

* :func:`over_tasks`: the per-task loop (the reference) or ``torch.func.vmap`` over tasks (in chunks);
* :func:`accumulated_meta_loss`: the loop in threads and/or differentiating each task as soon as its loss
  exists (per-task backward), handing the accumulated gradient to a later ``backward()`` through a custom
  autograd Function (:class:`_PrecomputedGradient`);
* :func:`checkpointed`: gradient checkpointing of one inner step (recomputed in the backward pass).

What to compute for one task comes in as a function; :class:`~metatut.engine.options.ExecutionOptions` says how.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..models import Params
from ..validate import check_positive_int, check_reduction
from .options import ExecutionOptions

__all__ = ["TaskFn", "batched_tasks", "tasks_batched", "over_tasks", "run_meta_loss", "accumulated_meta_loss", "checkpointed", "reduce", "num_tasks",
           "task_slice"]

#: ``task_fn(model, params, support_x, support_y, query_x, query_y, functional)`` -> one task's value.
TaskFn = Callable[..., Tensor]


_BATCHED: contextvars.ContextVar[bool] = contextvars.ContextVar("metatut_batched_tasks", default=False)


@contextlib.contextmanager
def batched_tasks() -> Iterator[None]:
    """While inside, layers that compute differently on the batched-tasks path (e.g.
    :class:`metatut.TaskBatchNorm2d`, batch norm written in elementary operations, exact in second order under
    ``torch.func.vmap``) take it; :func:`over_tasks` enters it for ``use_vmap=True``. Nests; restored on exit.

    Example::

        >>> with batched_tasks():
        ...     print(tasks_batched())
        True
        >>> tasks_batched()
        False
    """
    token = _BATCHED.set(True)
    try:
        yield
    finally:
        _BATCHED.reset(token)


def tasks_batched(x: Tensor | None = None) -> bool:
    """True on the batched-tasks path: inside :func:`batched_tasks` (the engine's vmap over tasks), or when
    ``x`` is a tensor wrapped by a ``torch.func`` transform (a user's own ``vmap``/``grad``).

    Example::

        >>> tasks_batched(torch.zeros(2))
        False
        >>> torch.func.vmap(lambda t: torch.tensor(tasks_batched(t)))(torch.zeros(3))
        tensor([True, True, True])
    """
    if _BATCHED.get():
        return True
    return x is not None and torch._C._functorch.is_functorch_wrapped_tensor(x)


def reduce(losses: Tensor, reduction: str) -> Tensor:
    """Mean or sum of per-task values ``[tasks]``.

    Example::

        >>> reduce(torch.tensor([1.0, 3.0]), "mean")
        tensor(2.)
    """
    return losses.mean() if reduction == "mean" else losses.sum()


def num_tasks(tasks) -> int:
    """The leading (task) dimension of a pytree of tensors (a tensor, a tuple, a dict, a named tuple, ...).

    Example::

        >>> num_tasks({"ids": torch.zeros(3, 5, 7, dtype=torch.long), "lengths": torch.ones(3, 5)})
        3
    """
    return next(t for t in tree_flatten(tasks)[0] if isinstance(t, Tensor)).shape[0]


def task_slice(tasks, index: int):
    """Task ``index`` of a pytree of tensors with a leading task dimension (``t[index]`` for each tensor; other
    leaves, e.g. None, as they are).

    Example::

        >>> task_slice({"x": torch.arange(6).view(3, 2)}, 1)
        {'x': tensor([2, 3])}
    """
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, tasks)


def over_tasks(model: nn.Module, task_fn: TaskFn, params, tensors: tuple, *, use_vmap: bool,
               chunk_size: int | None = None) -> Tensor:
    """``task_fn`` for each task, stacked: ``tensors`` are ``[tasks, ...]`` each (or pytrees of such tensors, e.g.
    a dict; ``task_fn`` then gets one task's slice of each); returns ``[tasks, ...]``.

    ``use_vmap=True`` runs ``torch.func.vmap`` over the leading dimension (``chunk_size`` tasks at a time,
    ``functional=True``) inside :func:`batched_tasks` (the batched path: e.g. conv4's batch norm is then
    computed in elementary operations, exact in second order); ``False`` the per-task loop (``functional=False``).

    Example::

        >>> model = nn.Linear(1, 1)
        >>> params = dict(model.named_parameters())
        >>> def fn(net, p, x, functional):
        ...     return torch.func.functional_call(net, p, (x,)).sum()
        >>> x = torch.ones(3, 2, 1)
        >>> torch.allclose(over_tasks(model, fn, params, (x,), use_vmap=True),
        ...                over_tasks(model, fn, params, (x,), use_vmap=False))
        True
    """
    if use_vmap:
        with batched_tasks():
            return vmap(lambda p, *t: task_fn(model, p, *t, functional=True), in_dims=(None, *[0] * len(tensors)),
                        chunk_size=chunk_size)(params, *tensors)
    return torch.stack([task_fn(model, params, *(task_slice(t, i) for t in tensors), functional=False)
                        for i in range(num_tasks(tensors[0]))])


def run_meta_loss(model: nn.Module, task_fn: TaskFn, theta: Params, batch, params: Params, *,
                  execution: ExecutionOptions, use_vmap: bool, reduction: str) -> Tensor:
    """The reduced per-task ``task_fn`` over ``batch``'s tasks, run as ``execution`` says (vmap, the loop, task
    threads or per-task backward; ``params``: the leaves the threaded paths differentiate). A
    :class:`~metatut.TaskBatch` gives ``task_fn`` its four tensors (``sx, sy, qx, qy``); any other pytree of tensors
    with a leading task dimension is given as one argument, one task's slice of it.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(4,), seed=0)
        >>> params = mt.init_params(model)
        >>> batch = mt.SinusoidTasks().sample(2, 3, generator=mt.make_generator(0))
        >>> def fn(net, p, sx, sy, qx, qy, functional):
        ...     return ((torch.func.functional_call(net, p, (qx,)) - qy) ** 2).mean()
        >>> run_meta_loss(model, fn, params, batch, params, execution=ExecutionOptions(), use_vmap=True,
        ...               reduction="mean").shape
        torch.Size([])
    """
    from ..tasks.base import TaskBatch

    tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y) if isinstance(batch, TaskBatch) \
        else (batch,)
    if not use_vmap and execution.threaded:
        def one_task(net: nn.Module, t: int) -> Tensor:
            return task_fn(net, theta, *(task_slice(x, t) for x in tensors), functional=False)
        return accumulated_meta_loss(model, one_task, num_tasks(tensors[0]), params, workers=execution.task_workers,
                                     per_task=execution.per_task_backward, reduction=reduction)
    losses = over_tasks(model, task_fn, theta, tensors, use_vmap=use_vmap, chunk_size=execution.vmap_chunk_size)
    return reduce(losses, reduction)


def checkpointed(step_fn: Callable, params):
    """``step_fn(params)`` under gradient checkpointing: its intermediate values are not stored but recomputed
    in the backward pass (less memory, more time). ``params`` and the result are pytrees (a dict of tensors, or
    e.g. ``(params, optimizer state)``). ``step_fn`` must bind everything it reads that may change
    later (loop variables), since it runs again after the caller has moved on.

    Example::

        >>> w = torch.tensor([2.0], requires_grad=True)
        >>> out = checkpointed(lambda p: {"w": p["w"] ** 2}, {"w": w})
        >>> torch.autograd.grad(out["w"].sum(), w)
        (tensor([4.]),)
    """
    leaves, spec = tree_flatten(params)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    out_spec = []

    def flat(*tensors):
        full = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            full[i] = t
        out_leaves, structure = tree_flatten(step_fn(tree_unflatten(full, spec)))
        out_spec[:] = [structure]
        return tuple(out_leaves)

    values = torch.utils.checkpoint.checkpoint(flat, *(leaves[i] for i in where), use_reentrant=False)
    return tree_unflatten(list(values), out_spec[0])


class _PrecomputedGradient(torch.autograd.Function):
    """``value`` whose gradient with respect to ``leaves`` is ``grads`` (already computed), scaled by the
    incoming gradient. Differentiable once: asking for a graph of this backward is an error."""

    @staticmethod
    def forward(ctx, value, count, *tensors):
        ctx.count = count
        ctx.save_for_backward(*tensors[count:])
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("a meta-loss from task_workers > 1 or per_task_backward=True is differentiable once; "
                               "use task_workers=1 and per_task_backward=False to differentiate it again "
                               "(create_graph=True)")
        grads = [grad_output * g for g in ctx.saved_tensors]
        return (None, None, *grads, *([None] * ctx.count))


def _share_losses(task_loss_fn, net, share, leaves, *, differentiate: bool, per_task: bool):
    """``(losses [share], summed gradient or None)`` of one worker's tasks."""
    if not differentiate:
        with torch.no_grad():
            return torch.stack([task_loss_fn(net, t) for t in share]), None
    with torch.enable_grad():
        if not per_task:
            losses = torch.stack([task_loss_fn(net, t) for t in share])
            return losses.detach(), torch.autograd.grad(losses.sum(), leaves, materialize_grads=True)
        losses, total = [], None
        for t in share:
            loss = task_loss_fn(net, t)
            grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
            total = list(grads) if total is None else [a + b for a, b in zip(total, grads, strict=True)]
            losses.append(loss.detach())
        return torch.stack(losses), total


def _in_threads(run, workers: int) -> list:
    """``[run(0), ..., run(workers - 1)]``, in threads when ``workers > 1`` (intra-op threads set to 1 meanwhile)."""
    if workers == 1:
        return [run(0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metatut-task") as pool:
            return list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(threads)


def accumulated_meta_loss(model: nn.Module, task_loss_fn: Callable[[nn.Module, int], Tensor], num_tasks: int,
                          params: Params, *, workers: int = 1, per_task: bool = True,
                          reduction: str = "mean") -> Tensor:
    """Sum or mean of ``task_loss_fn(model, t)`` over ``t < num_tasks``, differentiated as it is computed.

    The gradient with respect to ``params`` is accumulated here (``torch.autograd.grad``) and handed to a
    later ``backward()`` by the returned loss (a scalar), which is therefore differentiable once.
    ``per_task=True`` differentiates each task as soon as its loss exists, so only one task's graph is alive
    at a time (memory of one task, not of the meta-batch); ``False`` differentiates each worker's share at once.

    ``workers > 1`` splits the tasks into contiguous shares computed in that many threads (PyTorch
    releases the GIL inside its kernels, so the shares run in parallel on a CPU); intra-op threads are
    set to 1 while they run and restored afterwards. ``functional_call`` swaps tensors into the module it
    is given, so each thread gets its own copy of ``model`` (models with buffers, which would then be
    updated in a copy only, are refused). The gradient equals the loop's up to the order of summation.

    Example::

        >>> w = torch.tensor(2.0, requires_grad=True)
        >>> loss = accumulated_meta_loss(nn.Identity(), lambda net, t: w * (t + 1), 3, {"w": w}, workers=2)
        >>> loss.backward(); loss.item(), w.grad.item()
        (4.0, 2.0)
    """
    check_reduction(reduction)
    check_positive_int("workers", workers)
    workers = min(workers, num_tasks)
    if workers > 1 and any(True for _ in model.buffers()):
        raise ValueError("task_workers > 1 needs a model without buffers (e.g. batch norm with batch statistics); "
                         "this one has running statistics: use task_workers=1")
    leaves = [p for p in params.values() if isinstance(p, Tensor) and p.requires_grad]
    differentiate = torch.is_grad_enabled() and bool(leaves)
    shares = [range(i * num_tasks // workers, (i + 1) * num_tasks // workers) for i in range(workers)]
    copies = [model] + [copy.deepcopy(model) for _ in range(workers - 1)]
    results = _in_threads(lambda i: _share_losses(task_loss_fn, copies[i], shares[i], leaves,
                                                  differentiate=differentiate, per_task=per_task), workers)
    value = reduce(torch.cat([losses for losses, _ in results]), reduction)
    if not differentiate:
        return value
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    grads = [sum(r[1][i] for r in results) * scale for i in range(len(leaves))]
    return _PrecomputedGradient.apply(value, len(leaves), *leaves, *grads)
