"""The meta-training loop: Adam on the meta-parameters, a progress bar, a loss history, a sanity check."""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .accel import autocast, check_precision
from .models import Params
from .progress import progress
from .tasks.base import TaskBatch
from .validate import check_generator, check_positive_int
from .validate import check_params as _check_params

__all__ = ["TrainResult", "StopTraining", "NonFiniteLossError", "meta_train", "cosine_lr"]

Objective = Callable[[Params, TaskBatch], Tensor]
Sampler = Callable[[torch.Generator], TaskBatch]


@dataclass
class TrainResult:
    """What :func:`meta_train` returns: the trained parameters, the optimiser and the loss history ``[steps]``.

    Example::

        >>> import metatut as mt
        >>> result = TrainResult({}, None, torch.tensor([4.0, 2.0, 0.0]), steps=3)
        >>> result.smoothed(window=2)
        tensor([3., 1.])
    """

    params: Params
    optimizer: torch.optim.Optimizer
    losses: Tensor  # [steps] meta-loss per iteration (CPU, float)
    steps: int  # the step count reached (start_step + iterations run)
    extra: dict = field(default_factory=dict)

    def smoothed(self, window: int = 100) -> Tensor:
        """Running mean of the loss history over ``window`` iterations (for plots)."""
        window = max(1, min(window, len(self.losses)))
        kernel = torch.ones(window, dtype=self.losses.dtype) / window
        return torch.nn.functional.conv1d(self.losses.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)


class StopTraining(Exception):
    """Raise from an ``on_step`` hook to end :func:`meta_train` cleanly after the current step.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(4,), seed=0)
        >>> def stop_at_two(step, loss):
        ...     if step == 1:
        ...         raise StopTraining
        >>> result = mt.meta_train(mt.maml_objective(model, inner_lr=0.01), mt.init_params(model),
        ...                        lambda g: mt.SinusoidTasks().sample(2, 5, generator=g), steps=10,
        ...                        generator=mt.make_generator(0), on_step=stop_at_two, progress_bar=False)
        >>> result.steps
        2
    """


class NonFiniteLossError(FloatingPointError):
    """:func:`meta_train` met a NaN or infinite meta-loss or meta-gradient.

    Attributes: ``step`` (the 0-based meta-iteration), ``what`` (``'loss'`` or ``'gradient'``) and ``losses``
    (the loss history ``[up to the bad iteration, included]``, CPU float). When raised during training
    (``stop_on_nonfinite=True``, at the first synchronisation point after iteration ``step``) neither iteration
    ``step`` nor any later one changed anything: the parameters and the optimiser state are exactly those after
    iteration ``step - 1``, all finite, and can be saved or resumed from.

    Example (an objective that becomes NaN at its third iteration)::

        >>> import metatut as mt
        >>> w = torch.zeros(1, requires_grad=True)
        >>> def objective(params, batch, step):
        ...     return params["w"].sum() + (float("nan") if step == 2 else 0.0)
        >>> objective.uses_step = True
        >>> try:
        ...     meta_train(objective, {"w": w}, lambda g: None, steps=5, progress_bar=False)
        ... except NonFiniteLossError as error:
        ...     print(error.step, error.what, len(error.losses))
        2 loss 3
    """

    def __init__(self, step: int, what: str, desc: str = "meta-training", losses: Tensor | None = None):
        self.step, self.what = step, what
        self.losses = losses if losses is not None else torch.empty(0)
        super().__init__(f"{desc}: the {what} became NaN or infinite at step {step}; lower meta_lr or inner_lr, "
                         "or use fewer inner steps")


def cosine_lr(step: int, steps: int, max_lr: float, min_lr: float) -> float:
    """Cosine annealing from ``max_lr`` (step 0) to ``min_lr`` (step ``steps``).

    Example::

        >>> cosine_lr(0, 10, 1.0, 0.0), cosine_lr(5, 10, 1.0, 0.0), cosine_lr(10, 10, 1.0, 0.0)
        (1.0, 0.5, 0.0)
    """
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(step, steps) / steps))


def meta_train(objective: Objective, params: Params, sample_tasks: Sampler, *, steps: int,
               meta_lr: float = 1e-3, generator: torch.Generator | None = None,
               optimizer: torch.optim.Optimizer | None = None, lr_schedule: str = "constant",
               min_meta_lr: float = 0.0, start_step: int = 0,
               on_step: Callable[[int, Tensor], None] | None = None,
               after_backward: Callable[[Params], None] | None = None,
               log_every: int = 100, desc: str = "meta-training",
               progress_bar: bool | None = None, check: bool = True, precision: str = "float32",
               stop_on_nonfinite: bool = True, sync_every: int | Callable[[int], bool] | None = None,
               reduce_bad: Callable[[Tensor], Tensor] | None = None) -> TrainResult:
    """Minimise ``objective(params, batch)`` over task batches with Adam (in place on ``params``).

    ``sample_tasks(generator)`` returns a fresh :class:`TaskBatch` each iteration. The loss is kept on
    the device (no host synchronisation per step) except every ``log_every`` steps for the progress bar.
    With ``check=True`` the run ends by checking its own sanity: finite losses, and a final loss no
    higher than the first (a warning otherwise).

    ``stop_on_nonfinite=True`` (independent of ``check``) stops at the first iteration whose loss or
    meta-gradient (after ``after_backward``) is NaN or infinite and raises :class:`NonFiniteLossError` (a
    ``FloatingPointError``) with ``.step`` (that first bad iteration) and ``.what``; the parameters and the
    optimiser state (Adam's step counters included) are exactly those after the last finite iteration. The
    check costs no host synchronisation per step: each iteration computes its finiteness flag on the device,
    and an iteration at or after the first bad one changes nothing (its update is undone on the device).
    The flag is read at the synchronisation points only: every ``sync_every`` steps (default: ``log_every``,
    but every step when an ``on_step`` hook is given, so that the hook only ever sees finite iterations)
    and at the end of the run. ``sync_every`` may also be a function ``sync_every(steps_done) -> bool``
    called after each iteration, before ``on_step``. Between synchronisation points ``on_step`` may be
    called for the iterations after a bad one (their updates discarded). ``reduce_bad`` (e.g. an all-reduce
    MIN across processes) maps the local code of the first bad iteration (an int64 0-dim device tensor)
    to the agreed one at each synchronisation point. ``stop_on_nonfinite=False`` removes the check, and
    then only ``check=True`` reports non-finite losses, after the run.

    ``lr_schedule='cosine'`` anneals the meta learning rate from ``meta_lr`` to ``min_meta_lr`` over
    ``steps`` (MAML++). An objective with the attribute ``uses_step = True`` (e.g.
    :class:`metatut.MAMLObjective`) is called as ``objective(params, batch, step=i)``.

    Resuming: iterations run from ``start_step`` to ``steps``; with the optimiser state and the
    generator state restored, a resumed run ends exactly where an uninterrupted one does.
    ``precision='bfloat16'`` computes the objective under bf16 autocast (:func:`metatut.accel.autocast`;
    parameters, gradients and the optimiser stay float32); backward runs outside the autocast context.
    ``after_backward(params)`` runs between ``backward`` and the optimiser step (e.g. to all-reduce
    gradients across processes); ``on_step(step, loss)`` runs after each step and may raise
    :class:`StopTraining` to end the run after that step.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> result = meta_train(mt.maml_objective(model, inner_lr=0.01), mt.init_params(model),
        ...                     lambda g: mt.SinusoidTasks().sample(4, 5, generator=g), steps=3,
        ...                     generator=mt.make_generator(0), progress_bar=False)
        >>> result.losses.shape, result.steps
        (torch.Size([3]), 3)
    """
    leaves = _check_arguments(params, generator, steps=steps, log_every=log_every, start_step=start_step,
                              meta_lr=meta_lr, lr_schedule=lr_schedule, min_meta_lr=min_meta_lr, precision=precision)
    sync_due = _sync_schedule(sync_every, 1 if on_step is not None else log_every, steps)
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(leaves, lr=meta_lr)
    schedule = (lambda step: cosine_lr(step, steps, meta_lr, min_meta_lr)) if lr_schedule == "cosine" else None
    history = torch.full((steps - start_step,), float("nan"), device=leaves[0].device)
    guard = _NonFiniteGuard(leaves, optimizer, reduce_bad) if stop_on_nonfinite else None
    run = _Run(objective, params, leaves, optimizer, history, start_step, precision, guard)
    done = start_step
    bar = progress(range(start_step, steps), total=steps, initial=start_step, desc=desc, enabled=progress_bar)
    try:
        for step in bar:
            if schedule is not None:
                _set_lr(optimizer, schedule(step))
            loss = run.step(step, sample_tasks(generator), after_backward)
            done = step + 1
            if guard is not None and sync_due(done):
                guard.raise_if_bad(desc, history, start_step)  # one host synchronisation
            if (done % log_every == 0 or done == steps) and not getattr(bar, "disable", False):
                window = history[max(0, done - start_step - log_every): done - start_step]
                bar.set_postfix(loss=f"{window.mean().item():.4f}")
            if on_step is not None:
                try:
                    on_step(step, loss.detach())
                except StopTraining:
                    break
    finally:
        bar.close()
    if guard is not None:
        guard.raise_if_bad(desc, history, start_step)  # the end of the run (a no-op if just synchronised)
    if schedule is not None and done == steps:
        _set_lr(optimizer, schedule(steps))
    losses = history[: done - start_step].float().cpu()
    if check and len(losses):
        _sanity_check(losses, desc, start_step)
    return TrainResult(params=params, optimizer=optimizer, losses=losses, steps=done)


def _sync_schedule(sync_every, default: int, steps: int) -> Callable[[int], bool]:
    """``sync_every`` (``None``, a count or a function of the steps done) as a function of the steps done."""
    if callable(sync_every):
        return sync_every
    every = default if sync_every is None else sync_every
    check_positive_int("sync_every", every)
    return lambda done: done % every == 0 or done == steps


def _check_arguments(params: Params, generator, *, steps, log_every, start_step, meta_lr, lr_schedule, min_meta_lr,
                     precision) -> list[Tensor]:
    """Check :func:`meta_train`'s arguments; return the parameters as a list of leaves."""
    _check_params(params)
    check_generator(generator)
    check_positive_int("steps", steps)
    check_positive_int("log_every", log_every)
    check_positive_int("start_step", start_step, minimum=0)
    if start_step > steps:
        raise ValueError(f"start_step must be in [0, steps={steps}] (got {start_step})")
    if not (isinstance(meta_lr, (int, float)) and meta_lr > 0 and math.isfinite(meta_lr)):
        raise ValueError(f"meta_lr must be a finite number > 0 (got {meta_lr!r})")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine' (got {lr_schedule!r})")
    if not (isinstance(min_meta_lr, (int, float)) and 0 <= min_meta_lr <= meta_lr):
        raise ValueError(f"min_meta_lr must be a number in [0, meta_lr={meta_lr}] (got {min_meta_lr!r})")
    leaves = list(params.values())
    if not all(p.is_leaf and p.requires_grad for p in leaves):
        raise ValueError("params must be leaf tensors with requires_grad=True (use metatut.init_params(model))")
    check_precision(precision)
    return leaves


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class _Run:
    """The state one meta-iteration needs (:meth:`step`)."""

    objective: Objective
    params: Params
    leaves: list[Tensor]
    optimizer: torch.optim.Optimizer
    history: Tensor
    start_step: int
    precision: str
    guard: _NonFiniteGuard | None

    def step(self, step: int, batch: TaskBatch, after_backward) -> Tensor:
        """Loss, backward, the non-finite flag and the (guarded) optimiser step of meta-iteration ``step``."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.leaves[0].device, self.precision):
            if getattr(self.objective, "uses_step", False):
                loss = self.objective(self.params, batch, step=step)
            else:
                loss = self.objective(self.params, batch)
        loss.float().backward()
        if after_backward is not None:
            after_backward(self.params)
        self.history[step - self.start_step] = loss.detach()
        if self.guard is None:
            self.optimizer.step()
        else:
            self.guard.flag(step, loss, [p.grad for p in self.leaves if p.grad is not None])
            self.guard.step(step)
        return loss


_NO_BAD_STEP = 2 ** 62  # the code of "no bad iteration yet" (a bad iteration i has code 2 i + (0 loss, 1 gradient))


class _NonFiniteGuard:
    """The sync-free non-finite stop of :func:`meta_train`.

    Each iteration :meth:`flag` folds its finiteness into a device-side int64 ``first`` (the code of the first
    bad iteration: ``2 * step + (0 if the loss else 1)``, or :data:`_NO_BAD_STEP`) and a sticky device-side
    bool ``bad``. :meth:`step` takes the optimiser step, then puts back, with ``torch.where(bad, before,
    after)`` on the device, the parameters and every optimiser state tensor on the parameters' device: an
    iteration at or after the first bad one changes nothing, without reading any flag. What cannot be
    restored on the device (state on another device, e.g. Adam's CPU ``step`` counters, other values, the
    learning rates, state created by the step) is logged on the host per iteration since the last
    synchronisation and restored by :meth:`raise_if_bad`, the only place that reads the flag.
    """

    def __init__(self, leaves: list[Tensor], optimizer: torch.optim.Optimizer,
                 reduce_bad: Callable[[Tensor], Tensor] | None) -> None:
        self.optimizer, self.reduce_bad = optimizer, reduce_bad
        self.device = leaves[0].device
        tracked = {id(p): p for p in leaves}
        for group in optimizer.param_groups:
            tracked.update((id(p), p) for p in group["params"])
        self.tracked = list(tracked.values())
        self.leaves = leaves
        self.first = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=self.device)
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.buffers: dict[tuple[int, str | None], Tensor] = {}
        self.host_log: dict[int, tuple[list[dict], list[tuple], list[tuple]]] = {}

    def flag(self, step: int, loss: Tensor, grads: list[Tensor]) -> None:
        """Fold this iteration's finiteness (loss, then gradients) into ``first`` and ``bad`` (on the device)."""
        loss_ok = torch.isfinite(loss.detach()).all().to(self.device)
        ok = loss_ok
        if grads:
            ok = ok & torch.stack([torch.isfinite(g).all() for g in grads]).all().to(self.device)
        code = torch.where(ok, _NO_BAD_STEP, 2 * step + loss_ok.long())
        torch.minimum(self.first, code, out=self.first)
        self.bad = self.first < _NO_BAD_STEP

    def step(self, step: int) -> None:
        """The optimiser step, undone on the device when ``bad`` (see the class)."""
        optimizer, state = self.optimizer, self.optimizer.state
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        on_device, host, existed = [], [], {}
        for p in self.tracked:
            on_device.append((p, None))
            entries = state[p] if p in state else {}
            existed[id(p)] = set(entries)
            for k, v in entries.items():
                if isinstance(v, Tensor) and v.device == self.device:
                    on_device.append((p, k))
                else:
                    host.append((p, k, v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)))
        current = [self._get(p, k) for p, k in on_device]
        snapshots = [self._buffer(p, k, t) for (p, k), t in zip(on_device, current, strict=True)]
        with torch.no_grad():
            torch._foreach_copy_(snapshots, current)
            optimizer.step()
            for (p, k), before in zip(on_device, snapshots, strict=True):
                after = self._get(p, k)
                after.copy_(torch.where(self.bad, before, after))
        created = [(p, k) for p in self.tracked if p in state for k in state[p] if k not in existed[id(p)]]
        self.host_log[step] = (groups, host, created)

    def raise_if_bad(self, desc: str, history: Tensor, start_step: int) -> None:
        """Read the flag (one host synchronisation); if an iteration was bad, restore what the device could
        not and raise :class:`NonFiniteLossError` naming the first bad iteration. Reads nothing when no
        iteration ran since the last synchronisation (the flags are unchanged)."""
        if not self.host_log:
            return
        first = self.first if self.reduce_bad is None else self.reduce_bad(self.first.clone())
        code = int(first)
        if code >= _NO_BAD_STEP:
            self.host_log.clear()
            return
        step, what = code // 2, ("loss" if code % 2 == 0 else "gradient")
        self._restore_host(step)
        for p in self.tracked:
            p.grad = None
        raise NonFiniteLossError(step, what, desc, history[: step - start_step + 1].detach().float().cpu())

    def _restore_host(self, first: int) -> None:
        state = self.optimizer.state
        for step in sorted(s for s in self.host_log if s >= first):
            for p, k in self.host_log[step][2]:
                if p in state:
                    state[p].pop(k, None)
                    if not state[p]:
                        del state[p]
        if first in self.host_log:
            groups, host, _ = self.host_log[first]
            for group, saved in zip(self.optimizer.param_groups, groups, strict=True):
                group.update(saved)
            for p, k, v in host:
                state[p][k] = v
        self.host_log.clear()

    def _get(self, p: Tensor, key: str | None) -> Tensor:
        return p.detach() if key is None else self.optimizer.state[p][key]

    def _buffer(self, p: Tensor, key: str | None, like: Tensor) -> Tensor:
        buffer = self.buffers.get((id(p), key))
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = self.buffers[(id(p), key)] = torch.empty_like(like)
        return buffer


def _sanity_check(losses: Tensor, desc: str, start_step: int = 0) -> None:
    if not torch.isfinite(losses).all():
        first_bad = int((~torch.isfinite(losses)).nonzero()[0])
        raise NonFiniteLossError(start_step + first_bad, "loss", desc, losses)
    window = max(1, min(50, len(losses) // 10))
    start, end = losses[:window].mean().item(), losses[-window:].mean().item()
    if len(losses) >= 20 and end > start:
        warnings.warn(f"{desc}: the loss did not decrease (first {window} steps: {start:.4f}, "
                      f"last {window}: {end:.4f}); check meta_lr, inner_lr and the objective", stacklevel=3)
