"""The two option objects of the meta-loss: *what* to compute and *how* to run it.

:class:`MetaOptions` holds the algorithm (MAML and its family: step sizes, number of inner steps, order,
which parameters adapt, multi-step-loss weights, per-step buffers, the loss and the reduction over tasks);
:class:`ExecutionOptions` holds the execution (vmap or the per-task loop, vmap chunks, task threads, per-task
backward, gradient checkpointing). Two settings of :class:`ExecutionOptions` give the same numbers up to the
order of summation; two settings of :class:`MetaOptions` give different meta-losses.

Both are frozen dataclasses, validated once in ``__post_init__``; the engine passes them down instead of a
dict of keyword arguments. :func:`split_options` turns :func:`metatut.maml_loss`'s keyword arguments into the
pair.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..validate import (
    check_bool,
    check_positive_int,
    check_reduction,
    check_step_size,
    check_step_weights,
    check_vectorize,
)

__all__ = ["MetaOptions", "ExecutionOptions", "split_options", "META_FIELDS", "EXECUTION_FIELDS"]


@dataclass(frozen=True, eq=False)
class MetaOptions:
    """What the meta-loss computes (see :func:`metatut.maml_loss` for each field's meaning).

    ``inner_lr``: a number >= 0, a dict ``{name: step size}`` or ``'learned'`` (SGD's step sizes), or instead
    ``inner_optimizer``: an inner optimiser (:func:`metatut.inner_adam`, a TorchOpt transformation, ...);
    ``inner_steps``: an int >= 0;
    ``first_order``: drop the Hessian term; ``adapt_names``: the parameters the inner loop adapts (None: all);
    ``step_weights``: multi-step-loss weights ``[inner_steps]`` (kept as a float64 tensor); ``buffers``:
    per-step batch-norm statistics ``{k: {name: tensor}}``; ``loss_fn(prediction, target)``; ``reduction``
    over tasks, ``'mean'`` or ``'sum'``; ``inner_loss``/``outer_loss``: the closure form, functions of
    ``(params, task)`` (or ``(params, task, meta_params)``) returning a scalar, both or neither (they replace
    ``loss_fn``).

    Example::

        >>> options = MetaOptions(inner_lr=0.01, inner_steps=2, step_weights=[0.5, 0.5])
        >>> options.step_weights
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> MetaOptions(inner_lr=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: inner_lr must be a finite number >= 0 (got -1.0)
    """

    inner_lr: Any = None
    inner_steps: int = 1
    first_order: bool = False
    adapt_names: tuple[str, ...] | None = None
    step_weights: Tensor | None = None
    buffers: dict | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss
    reduction: str = "mean"
    inner_optimizer: Any = None
    inner_loss: Callable | None = None
    outer_loss: Callable | None = None

    def __post_init__(self) -> None:
        from .inner_optimizers import as_inner_optimizer

        if self.inner_optimizer is not None or self.inner_lr is None:
            object.__setattr__(self, "inner_optimizer", as_inner_optimizer(self.inner_optimizer, inner_lr=self.inner_lr))
        elif isinstance(self.inner_lr, str):
            if self.inner_lr != "learned":
                raise ValueError("inner_lr must be a number >= 0, a dict of tensors or 'learned' "
                                 f"(got {self.inner_lr!r})")
        elif not isinstance(self.inner_lr, dict):
            check_step_size("inner_lr", self.inner_lr)
        check_positive_int("inner_steps", self.inner_steps, minimum=0)
        check_bool("first_order", self.first_order)
        if self.adapt_names is not None:
            object.__setattr__(self, "adapt_names", tuple(self.adapt_names))
        object.__setattr__(self, "step_weights", check_step_weights(self.step_weights, self.inner_steps))
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be a callable loss(prediction, target) (got {self.loss_fn!r})")
        check_reduction(self.reduction)
        if (self.inner_loss is None) != (self.outer_loss is None):
            raise TypeError("pass both inner_loss and outer_loss (functions of (params, task)) or neither (then the "
                            "batch is a metatut.TaskBatch scored with loss_fn(model(x), y))")
        for name in ("inner_loss", "outer_loss"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a function {name}(params, task) -> scalar tensor "
                                f"(got {getattr(self, name)!r})")
        if self.inner_loss is not None and self.loss_fn is not F.mse_loss:
            raise TypeError("loss_fn is not used with inner_loss/outer_loss: compute the loss inside the closures")

    @property
    def closures(self) -> bool:
        """True for the closure form (``inner_loss``/``outer_loss`` given).

        Example::

            >>> MetaOptions(inner_lr=0.1).closures
            False
        """
        return self.inner_loss is not None

    def replace(self, **changes) -> MetaOptions:
        """A copy with ``changes`` (validated again).

        Example::

            >>> MetaOptions(inner_lr=0.1).replace(first_order=True).first_order
            True
        """
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ExecutionOptions:
    """How the meta-loss is computed; every setting gives the same numbers (up to the order of summation).

    ``vectorize``: ``'auto'``, ``True`` (vmap over tasks or :class:`metatut.VectorizeError`) or ``False`` (the
    per-task loop); ``vmap_chunk_size``: tasks per vmap call (None: all); ``task_workers``: threads for the
    per-task loop; ``per_task_backward``: differentiate each task as soon as its loss exists;
    ``checkpoint_steps``: recompute each inner step in the backward pass (per-task loop only).

    Example::

        >>> ExecutionOptions(vectorize=False, task_workers=2)
        ExecutionOptions(vectorize=False, vmap_chunk_size=None, task_workers=2, per_task_backward=False, checkpoint_steps=False)
        >>> ExecutionOptions(vmap_chunk_size=0)
        Traceback (most recent call last):
        ...
        ValueError: vmap_chunk_size must be an int >= 1 (got 0)
    """

    vectorize: bool | str = "auto"
    vmap_chunk_size: int | None = None
    task_workers: int = 1
    per_task_backward: bool = False
    checkpoint_steps: bool = False

    def __post_init__(self) -> None:
        check_vectorize(self.vectorize)
        if self.vmap_chunk_size is not None:
            check_positive_int("vmap_chunk_size", self.vmap_chunk_size)
        check_positive_int("task_workers", self.task_workers)
        check_bool("per_task_backward", self.per_task_backward)
        check_bool("checkpoint_steps", self.checkpoint_steps)
        if self.vectorize is True and self.task_workers > 1:
            from .policy import VectorizeError

            raise VectorizeError(f"task_workers={self.task_workers} runs the per-task loop in threads; it cannot be "
                                 "combined with vectorize=True (vmap computes all tasks at once): use one of them, or "
                                 "vectorize='auto'")

    @property
    def threaded(self) -> bool:
        """True when the loop differentiates as it goes (task threads or per-task backward).

        Example::

            >>> ExecutionOptions(per_task_backward=True).threaded
            True
        """
        return self.task_workers > 1 or self.per_task_backward


#: The keyword arguments of :func:`metatut.maml_loss` that belong to each object.
META_FIELDS = tuple(f.name for f in dataclasses.fields(MetaOptions))
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(ExecutionOptions))


def _is_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and isinstance(value, (bool, int, str))
                                and value == default)


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _build(cls, given, kwargs: dict, name: str):
    if given is None:
        return cls(**kwargs)
    if not isinstance(given, cls):
        raise TypeError(f"{name} must be a metatut.{cls.__name__} (got {type(given).__name__})")
    defaults = _defaults(cls)
    both = [k for k, v in kwargs.items() if not (v is None and k not in defaults) and not _is_default(v, defaults.get(k))]
    if both:
        raise TypeError(f"pass {both} either as keywords or inside {name}=metatut.{cls.__name__}(...), not both")
    return given


def split_options(options: MetaOptions | None = None, execution: ExecutionOptions | None = None,
                  **kwargs) -> tuple[MetaOptions, ExecutionOptions]:
    """``(MetaOptions, ExecutionOptions)`` from :func:`metatut.maml_loss`'s keyword arguments, or the ready
    objects ``options``/``execution`` (keywords left at their defaults; a keyword given with another value as
    well as an object is an error, not a silent choice).

    Example::

        >>> meta, run = split_options(inner_lr=0.1, inner_steps=3, vectorize=False)
        >>> meta.inner_steps, run.vectorize
        (3, False)
        >>> split_options(MetaOptions(inner_lr=0.1), inner_steps=2)
        Traceback (most recent call last):
        ...
        TypeError: pass ['inner_steps'] either as keywords or inside options=metatut.MetaOptions(...), not both
    """
    unknown = sorted(set(kwargs) - set(META_FIELDS) - set(EXECUTION_FIELDS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; the algorithm's are {list(META_FIELDS)} and the execution's "
                        f"{list(EXECUTION_FIELDS)}")
    meta_kw = {k: v for k, v in kwargs.items() if k in META_FIELDS}
    run_kw = {k: v for k, v in kwargs.items() if k in EXECUTION_FIELDS}
    if options is None and meta_kw.get("inner_lr") is None and meta_kw.get("inner_optimizer") is None:
        raise TypeError("maml_loss needs inner_lr (a number >= 0, a dict of step sizes or 'learned'), "
                        "inner_optimizer (e.g. metatut.inner_adam(lr=0.01)) or options=metatut.MetaOptions(...)")
    return _build(MetaOptions, options, meta_kw, "options"), _build(ExecutionOptions, execution, run_kw, "execution")
