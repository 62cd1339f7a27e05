"""The meta-training loop: Adam on the meta-parameters, a progress bar, a loss history, a sanity check."""
from __future__ import annotations

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
    (the loss history ``[iterations run, the bad one included]``, CPU float). When raised during training
    (``stop_on_nonfinite=True``) the optimiser step of iteration ``step`` was not taken: the parameters and the
    optimiser state are those after iteration ``step - 1``, all finite, and can be saved or resumed from.

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
               stop_on_nonfinite: bool = True) -> TrainResult:
    """Minimise ``objective(params, batch)`` over task batches with Adam (in place on ``params``).

    ``sample_tasks(generator)`` returns a fresh :class:`TaskBatch` each iteration. The loss is kept on
    the device (no host synchronisation per step) except every ``log_every`` steps for the progress bar.
    With ``check=True`` the run ends by checking its own sanity: finite losses, and a final loss no
    higher than the first (a warning otherwise).

    ``stop_on_nonfinite=True`` (independent of ``check``) stops at the first iteration whose loss or
    meta-gradient (after ``after_backward``) is NaN or infinite, *before* its optimiser step, and raises
    :class:`NonFiniteLossError` (a ``FloatingPointError``) with ``.step`` and ``.what``; the parameters and the
    optimiser state stay those of the last finite iteration. The check reads one flag per iteration from
    the device (one host synchronisation per step; ``stop_on_nonfinite=False`` removes it, and then only
    ``check=True`` reports non-finite losses, after the run).

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
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(leaves, lr=meta_lr)
    schedule = (lambda step: cosine_lr(step, steps, meta_lr, min_meta_lr)) if lr_schedule == "cosine" else None
    history = torch.full((steps - start_step,), float("nan"), device=leaves[0].device)
    run = _Run(objective, params, leaves, optimizer, history, start_step, desc, precision, stop_on_nonfinite)
    done = start_step
    bar = progress(range(start_step, steps), total=steps, initial=start_step, desc=desc, enabled=progress_bar)
    try:
        for step in bar:
            if schedule is not None:
                _set_lr(optimizer, schedule(step))
            loss = run.step(step, sample_tasks(generator), after_backward)
            done = step + 1
            if done % log_every == 0 or done == steps:
                window = history[max(0, done - start_step - log_every): done - start_step]
                bar.set_postfix(loss=f"{window.mean().item():.4f}")
            if on_step is not None:
                try:
                    on_step(step, loss.detach())
                except StopTraining:
                    break
    finally:
        bar.close()
    if schedule is not None and done == steps:
        _set_lr(optimizer, schedule(steps))
    losses = history[: done - start_step].float().cpu()
    if check and len(losses):
        _sanity_check(losses, desc, start_step)
    return TrainResult(params=params, optimizer=optimizer, losses=losses, steps=done)


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
    desc: str
    precision: str
    stop_on_nonfinite: bool

    def step(self, step: int, batch: TaskBatch, after_backward) -> Tensor:
        """Loss, backward, the non-finite check and the optimiser step of meta-iteration ``step``."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.leaves[0].device, self.precision):
            if getattr(self.objective, "uses_step", False):
                loss = self.objective(self.params, batch, step=step)
            else:
                loss = self.objective(self.params, batch)
        loss.float().backward()
        if after_backward is not None:
            after_backward(self.params)
        index = step - self.start_step
        self.history[index] = loss.detach()
        if self.stop_on_nonfinite:
            _stop_if_nonfinite(loss, self.leaves, step, self.desc, self.history[: index + 1])
        self.optimizer.step()
        return loss


def _stop_if_nonfinite(loss: Tensor, leaves: list[Tensor], step: int, desc: str, history: Tensor) -> None:
    """Raise :class:`NonFiniteLossError` (before the optimiser step) when the loss or a gradient is not finite.

    One flag is computed on the device and read once: a single host synchronisation per step."""
    grads = [p.grad for p in leaves if p.grad is not None]
    flags = torch.stack([torch.isfinite(loss.detach()).all(), *(torch.isfinite(g).all() for g in grads)])
    if bool(flags.all()):
        return
    what = "loss" if not bool(flags[0]) else "gradient"
    for p in leaves:
        p.grad = None
    raise NonFiniteLossError(step, what, desc, history.detach().float().cpu())


def _sanity_check(losses: Tensor, desc: str, start_step: int = 0) -> None:
    if not torch.isfinite(losses).all():
        first_bad = int((~torch.isfinite(losses)).nonzero()[0])
        raise NonFiniteLossError(start_step + first_bad, "loss", desc, losses)
    window = max(1, min(50, len(losses) // 10))
    start, end = losses[:window].mean().item(), losses[-window:].mean().item()
    if len(losses) >= 20 and end > start:
        warnings.warn(f"{desc}: the loss did not decrease (first {window} steps: {start:.4f}, "
                      f"last {window}: {end:.4f}); check meta_lr, inner_lr and the objective", stacklevel=3)
