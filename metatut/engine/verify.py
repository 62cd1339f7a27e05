"""The runtime check behind :func:`metatut.engine.policy.use_vmap` for models it cannot judge statically.

On the first batch (its first two tasks) the MAML meta-loss with one inner step is computed by the per-task loop
and by ``torch.func.vmap`` over tasks, in first and second order, on float64 copies of the model (the model's own
dtype where a float64 copy fails). The losses, the meta-gradients and the buffers after the forward passes must
agree to a relative 1e-9 (1e-4 outside float64); an error raised inside vmap (e.g. a random operation, an
in-place update of a buffer, ``.item()``) fails the check. The user's model, parameters and random-number
state are left untouched.

For the closure form (:class:`~metatut.engine.inner_loop.ClosureProbe`) the closures call the user's model
themselves, so both paths run on that model (float64 parameters passed through the closures, or its own dtype
where that fails); its buffers are saved before and restored after each path, and compared between the paths.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..validate import prepare_loss
from .conventions import split_learned_lrs
from .execution import num_tasks, task_slice
from .inner_loop import ClosureProbe, task_meta_loss, task_objective
from .inner_optimizers import SGD
from .policy import Probe

__all__ = ["vmap_matches_loop", "relative_difference"]

_TOLERANCE = {torch.float64: 1e-9}
_DEFAULT_TOLERANCE = 1e-4


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|`` (Euclidean norms, flattened); 0 when both are 0, infinite when either is not finite.

    Example::

        >>> relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        0.0
    """
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


def _copies(model: nn.Module, probe: Probe, dtype):
    nets = [copy.deepcopy(model) for _ in range(2)]
    theta, _ = split_learned_lrs(probe.params)
    cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype is not None else (lambda t: t)
    if dtype is not None:
        nets = [net.to(dtype) for net in nets]
    params = {k: cast(v.detach()).requires_grad_(v.is_floating_point()) for k, v in theta.items()}
    tasks = min(2, probe.num_tasks)
    data = [cast(t[:tasks]) for t in (probe.support_x, probe.support_y, probe.query_x, probe.query_y)]
    return nets, params, data


def _both_paths(nets, params, data, loss_fn, rate: float, first_order: bool):
    """``[(loss, grads, buffers)]`` of the loop (``nets[0]``) and of vmap (``nets[1]``)."""
    task = partial(task_meta_loss, rates=rate, steps=1, first_order=first_order, adapt_names=list(params),
                   loss_fn=loss_fn, weights=None)
    leaves = [v for v in params.values() if v.requires_grad]
    loop = torch.stack([task(nets[0], params, *(t[i] for t in data), functional=False)
                        for i in range(data[0].shape[0])]).sum()
    out = [(loop, torch.autograd.grad(loop, leaves, allow_unused=True, materialize_grads=True))]
    try:
        vmapped = vmap(lambda p, sx, sy, qx, qy: task(nets[1], p, sx, sy, qx, qy, functional=True),
                       in_dims=(None, 0, 0, 0, 0))(params, *data).sum()
        out.append((vmapped, torch.autograd.grad(vmapped, leaves, allow_unused=True, materialize_grads=True)))
    except Exception as error:  # noqa: BLE001 - any failure under vmap means: run the loop
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return out, f"vmap raised {type(error).__name__}: {first}"
    return out, None


def _compare(out, nets, tolerance: float, order: str, buffers=None) -> str:
    (loop, g_loop), (vm, g_vm) = out
    checks = [("meta-loss", relative_difference(vm, loop))]
    if g_loop:
        checks.append(("meta-gradient", relative_difference(torch.cat([g.flatten() for g in g_vm]),
                                                            torch.cat([g.flatten() for g in g_loop]))))
    if buffers is None:
        buffers = list(zip(nets[1].buffers(), nets[0].buffers(), strict=True))
    buffers = [(a, b) for a, b in buffers if a.is_floating_point()]
    if buffers:
        checks.append(("buffers", max(relative_difference(a, b) for a, b in buffers)))
    for what, rel in checks:
        if not rel <= tolerance:
            return f"its {order} {what} differed from the loop's by {rel:.1e} relative (tolerance {tolerance:.0e})"
    return ""


def _check(model: nn.Module, probe: Probe, dtype) -> str | None:
    nets, params, data = _copies(model, probe, dtype)
    loss_fn = prepare_loss(probe.loss_fn, {"support_y": data[1], "query_y": data[3]})
    rate = probe.inner_lr if isinstance(probe.inner_lr, (int, float)) and not isinstance(probe.inner_lr, bool) \
        else 0.01
    tolerance = _TOLERANCE.get(dtype or next(iter(params.values())).dtype, _DEFAULT_TOLERANCE)
    for first_order, order in ((False, "second-order"), (True, "first-order")):
        try:
            out, failure = _both_paths(nets, params, data, loss_fn, rate, first_order)
        except Exception:  # noqa: BLE001 - the loop itself failed on this copy: undecided
            return None
        if failure:
            return failure
        why = _compare(out, nets, tolerance, order)
        if why:
            return why
    return ""


def _first_tensor(tree) -> Tensor:
    return next(t for t in tree_flatten(tree)[0] if isinstance(t, Tensor))


def _restore(model: nn.Module, saved: list[Tensor]) -> None:
    with torch.no_grad():
        for b, value in zip(model.buffers(), saved, strict=True):
            b.copy_(value)


def _closure_paths(model, params, tasks, losses, rate: float, first_order: bool, saved):
    """Like :func:`_both_paths` for closures, on the user's ``model``: ``(out, failure, buffer pairs)``."""
    task = partial(task_objective, losses=losses, optimizer=SGD(rate), steps=1, first_order=first_order,
                   adapt_names=list(params), weights=None)
    leaves = [v for v in params.values() if v.requires_grad]
    _restore(model, saved)
    loop = torch.stack([task(model, params, task_slice(tasks, i), functional=False)
                        for i in range(num_tasks(tasks))]).sum()
    out = [(loop, torch.autograd.grad(loop, leaves, allow_unused=True, materialize_grads=True))]
    after_loop = [b.detach().clone() for b in model.buffers()]
    _restore(model, saved)
    try:
        vmapped = vmap(lambda p, t: task(model, p, t, functional=True), in_dims=(None, 0))(params, tasks).sum()
        out.append((vmapped, torch.autograd.grad(vmapped, leaves, allow_unused=True, materialize_grads=True)))
    except Exception as error:  # noqa: BLE001 - any failure under vmap means: run the loop
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return out, f"vmap raised {type(error).__name__}: {first}", []
    return out, None, list(zip(model.buffers(), after_loop, strict=True))


def _closure_check(model: nn.Module, probe: ClosureProbe, dtype) -> str | None:
    theta, _ = split_learned_lrs(probe.params)
    cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype is not None else (lambda t: t)
    params = {k: cast(v.detach()).requires_grad_(v.is_floating_point()) for k, v in theta.items()}
    tasks = tree_map(lambda t: cast(t[:2]) if isinstance(t, Tensor) else t, probe.tasks)
    rate = probe.inner_lr if isinstance(probe.inner_lr, (int, float)) and not isinstance(probe.inner_lr, bool) \
        else 0.01
    tolerance = _TOLERANCE.get(dtype or next(iter(params.values())).dtype, _DEFAULT_TOLERANCE)
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        for first_order, order in ((False, "second-order"), (True, "first-order")):
            try:
                out, failure, buffers = _closure_paths(model, params, tasks, probe.losses, rate, first_order, saved)
            except Exception:  # noqa: BLE001 - the loop itself failed (e.g. float64 through a float32 closure)
                return None
            if failure:
                return failure
            why = _compare(out, None, tolerance, order, buffers=buffers)
            if why:
                return why
        return ""
    finally:
        _restore(model, saved)


def vmap_matches_loop(model: nn.Module, probe: Probe) -> str | None:
    """Check vmap against the loop for ``model`` on ``probe``'s first two tasks (see the module docstring).

    Returns ``''`` when they agree, a sentence saying how they differ when they do not, and None when the
    check could not run (the loop itself failed on the copies: the real call will then raise its own error).

    Example::

        >>> import metatut as mt
        >>> class Scaled(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.scale = nn.Linear(1, 1), nn.Parameter(torch.ones(1))
        ...     def forward(self, x):
        ...         return self.scale * self.lin(x)
        >>> model = Scaled()
        >>> batch = mt.SinusoidTasks().sample(2, 4, generator=mt.make_generator(0))
        >>> probe = Probe(mt.init_params(model), batch.support_x, batch.support_y, batch.query_x, batch.query_y,
        ...               loss_fn=torch.nn.functional.mse_loss)
        >>> vmap_matches_loop(model, probe)
        ''
    """
    closures = isinstance(probe, ClosureProbe)
    device = (_first_tensor(probe.tasks) if closures else probe.support_x).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        for dtype in (torch.float64, None):
            try:
                why = _closure_check(model, probe, dtype) if closures else _check(model, probe, dtype)
            except Exception:  # noqa: BLE001 - e.g. a model that cannot be copied or cast: try the next dtype
                why = None
            if why is not None:
                return why
    return None
