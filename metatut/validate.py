"""Input validation for the whole package: one place for the checks that turn silent wrong answers into clear errors.

Every check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) whose message
names the argument and says how to fix it, and returns the (normalised) value when it passes. This module imports
nothing from the rest of :mod:`metatut` at import time (the task containers import it), so any module can use it.

The checks of the engine's public entry points, in the order they run: :func:`check_params` (a non-empty dict),
:func:`check_batch` (a :class:`~metatut.TaskBatch`), :func:`check_model_params` (the dict's keys are the model's
parameters), :func:`check_dtype_device` (one device, one floating dtype), then :func:`prepare_loss` (targets
that fit the loss function).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_positive_int", "check_range", "check_generator", "check_n_way", "check_step_size", "check_reduction",
    "check_params", "check_batch", "check_model_params", "check_dtype_device", "check_inputs", "check_adapt_names",
    "check_step_weights", "check_vectorize", "check_bool", "batch_tensors", "prepare_loss", "apply_loss",
    "REDUCTIONS",
]

#: The reductions over tasks that the meta-losses accept.
REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------------ numbers
def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (``bool`` is refused), else raise a clear error.

    Example::

        >>> check_positive_int("steps", 3)
        3
        >>> check_positive_int("steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: steps must be an int >= 1 (got 0)
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum} (got {value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (got {value})")
    return value


def check_range(name: str, bounds) -> tuple[float, float]:
    """Return ``(low, high)`` as floats if ``bounds`` is a pair of finite numbers with ``low <= high``.

    Example::

        >>> check_range("amplitude", (0.1, 5))
        (0.1, 5.0)
    """
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high) of numbers (got {bounds!r})") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{name} must satisfy low <= high with finite low and high (got {bounds!r})")
    return low, high


def check_generator(generator) -> torch.Generator | None:
    """Return ``generator`` if it is a ``torch.Generator`` or None; raise a ``TypeError`` saying how to make one.

    Example::

        >>> check_generator(None) is None
        True
        >>> check_generator(0)
        Traceback (most recent call last):
        ...
        TypeError: generator must be a torch.Generator (e.g. metatut.make_generator(0)) or None (got 0)
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. metatut.make_generator(0)) or None "
                        f"(got {generator!r})")
    return generator


def check_n_way(n_way, name: str = "n_way") -> int:
    """Return ``n_way`` if it is an int >= 2, else raise a clear error: a task of one class has every label 0,
    so its cross-entropy loss and meta-gradient are exactly 0 and nothing is learned.

    Example::

        >>> check_n_way(5)
        5
        >>> check_n_way(1)
        Traceback (most recent call last):
        ...
        ValueError: n_way must be an int >= 2 (with one class every label is 0, ...) (got 1)
    """
    if isinstance(n_way, bool) or not isinstance(n_way, int):
        raise TypeError(f"{name} must be an int >= 2 (got {n_way!r})")
    if n_way < 2:
        raise ValueError(f"{name} must be an int >= 2 (with one class every label is 0, so the loss and "
                         f"meta-gradient are exactly 0) (got {n_way})")
    return n_way


def check_step_size(name: str, value) -> float:
    """Return a step size (a number or a one-element tensor) as a float if it is finite and >= 0.

    Example::

        >>> check_step_size("inner_lr", torch.tensor(0.5))
        0.5
        >>> check_step_size("inner_lr", -1)
        Traceback (most recent call last):
        ...
        ValueError: inner_lr must be a finite number >= 0 (got -1.0)
    """
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


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is ``'mean'`` or ``'sum'``.

    Example::

        >>> check_reduction("sum")
        'sum'
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (got {reduction!r})")
    return reduction


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is a ``bool``.

    Example::

        >>> check_bool("first_order", True)
        True
    """
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":    # numpy.bool_, without importing numpy
        return bool(value)
    raise TypeError(f"{name} must be True or False (got {value!r})")


def check_vectorize(vectorize):
    """Return ``vectorize`` if it is ``True``, ``False`` or ``'auto'``.

    Example::

        >>> check_vectorize("auto")
        'auto'
    """
    if isinstance(vectorize, str) and vectorize == "auto":
        return vectorize
    if not isinstance(vectorize, bool):
        raise ValueError(f"vectorize must be True, False or 'auto' (got {vectorize!r})")
    return vectorize


# ---------------------------------------------------------------------------------- engine inputs
def check_params(params) -> None:
    """Raise a ``TypeError`` unless ``params`` is a non-empty dict (name -> tensor).

    Example::

        >>> check_params({"w": torch.zeros(2)})
        >>> check_params({})
        Traceback (most recent call last):
        ...
        TypeError: params must be a non-empty dict of name -> tensor (e.g. metatut.init_params(model))
    """
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of name -> tensor (e.g. metatut.init_params(model))")


def check_batch(batch) -> None:
    """Raise a ``TypeError`` unless ``batch`` is a :class:`metatut.TaskBatch`.

    Example::

        >>> check_batch("tasks")
        Traceback (most recent call last):
        ...
        TypeError: batch must be a metatut.TaskBatch (got str)
    """
    from .tasks.base import TaskBatch

    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a metatut.TaskBatch (got {type(batch).__name__})")


def batch_tensors(batch) -> dict[str, Tensor]:
    """``{'batch.support_x': ..., ...}``: a batch's four tensors named for error messages.

    Example::

        >>> import metatut as mt
        >>> sorted(batch_tensors(mt.SinusoidTasks().sample(2, 3)))
        ['batch.query_x', 'batch.query_y', 'batch.support_x', 'batch.support_y']
    """
    return {f"batch.{n}": getattr(batch, n) for n in ("support_x", "support_y", "query_x", "query_y")}


_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_names(model: nn.Module) -> tuple[tuple[str, ...], frozenset[str]]:
    """``(parameter names in order, parameter and buffer names)`` of ``model``, cached per model and recomputed
    when its tree of submodules, parameters or buffers changes (a fingerprint of one cheap walk), so that the
    checks of every call do not walk the model many times.

    Example::

        >>> model = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2))
        >>> module_names(model)[0]
        ('0.weight', '0.bias', '1.weight', '1.bias')
        >>> sorted(module_names(model)[1])[:3]
        ['0.bias', '0.weight', '1.bias']
    """
    return structure_cached(model, "names", _names)


def _names(model: nn.Module) -> tuple[tuple[str, ...], frozenset[str]]:
    parameters = tuple(n for n, _ in model.named_parameters())
    return parameters, frozenset(parameters) | {n for n, _ in model.named_buffers()}


@torch.compiler.disable  # a per-process cache: torch.compile must run it, not trace it (or guard on its contents)
def structure_cached(model: nn.Module, what, compute):
    """``compute(model)``, cached per model under ``what`` (any hashable key) for as long as the model's tree of submodules, parameter
    slots and buffer slots is unchanged (one cheap walk compares a fingerprint): for facts that depend on the
    model's structure only, such as its parameter names or the vmap policy's static verdict.

    Example::

        >>> model = nn.Linear(2, 1)
        >>> structure_cached(model, "demo", lambda m: len(list(m.parameters())))
        2
    """
    fingerprint = tuple((id(m), type(m), tuple(m._parameters), tuple(m._buffers)) for m in model.modules())
    entry = _NAMES.get(model)
    if entry is None or entry[0] != fingerprint:
        entry = (fingerprint, {})
        try:
            _NAMES[model] = entry
        except TypeError:  # a model that cannot be weakly referenced is simply not cached
            pass
    if what not in entry[1]:
        entry[1][what] = compute(model)
    return entry[1][what]


def check_model_params(model: nn.Module, params) -> None:
    """Every key of ``params`` names one of the model's parameters or buffers (directly or as a per-step copy
    ``per_step.<k>.<name>``; learned step sizes ``inner_lr.*`` are checked where they are used), and every
    parameter of the model has a value: ``functional_call`` would otherwise silently use the module's own
    tensor for a missing one (which is then never trained). A set comparison of names: cheap.

    Example::

        >>> model = nn.Linear(2, 1)
        >>> check_model_params(model, {"weight": torch.zeros(1, 2)})
        Traceback (most recent call last):
        ...
        ValueError: params is missing the model's parameters ['bias']: ...
    """
    from .engine.conventions import classify_key

    model_names, known = module_names(model)
    if known.issuperset(params) and all(n in params for n in model_names):  # the common case, one set test
        return
    present, unknown = set(), []
    for key in params:
        kind, _, name = classify_key(key, known)  # the model's own names first: a submodule may be 'per_step'
        if kind == "inner_lr":
            continue
        if name in known:
            present.add(name)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"params has keys the model does not have: {unknown}; the model's parameters are "
                         f"{list(model_names)} (besides them params may hold buffers, learned step sizes 'inner_lr.*' and "
                         "per-step copies 'per_step.<k>.<name>'); check the spelling")
    missing = [n for n in model_names if n not in present]
    if missing:
        raise ValueError(f"params is missing the model's parameters {missing}: the model would silently use its own "
                         "tensors for them, which are never trained; pass all of them (metatut.init_params(model))")


def check_dtype_device(params, tensors: dict[str, Tensor]) -> None:
    """One device and one floating dtype for ``params`` and the data ``tensors`` (name -> tensor).

    Example::

        >>> check_dtype_device({"w": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)})
        Traceback (most recent call last):
        ...
        ValueError: params are torch.float32 but x is torch.float64: use one dtype for both ...
    """
    values = [v for v in params.values() if isinstance(v, Tensor)]
    devices = sorted({str(v.device) for v in values})
    if len(devices) > 1:
        raise ValueError(f"params must all be on one device (got {devices}); move them, e.g. "
                         "metatut.init_params(model, device=...)")
    dtypes = sorted({str(v.dtype) for v in values if v.is_floating_point()})
    if len(dtypes) > 1:
        raise ValueError(f"params must all have one floating dtype (got {dtypes}); cast them, e.g. "
                         "metatut.init_params(model, dtype=...)")
    if not values:
        return
    device = values[0].device
    dtype = next((v.dtype for v in values if v.is_floating_point()), None)
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"params are on {device} but {name} is on {t.device}: put both on one device "
                             "(batch.to(device) or metatut.init_params(model, device=device))")
    for name, t in tensors.items():
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            raise ValueError(f"params are {dtype} but {name} is {t.dtype}: use one dtype for both "
                             f"(batch.to(dtype={dtype}) or metatut.init_params(model, dtype={t.dtype}))")


def check_inputs(model: nn.Module, params, tensors: dict[str, Tensor]) -> None:
    """The checks of every public entry point that takes a model, its parameters and data.

    Example::

        >>> model = nn.Linear(1, 1)
        >>> check_inputs(model, dict(model.named_parameters()), {"x": torch.zeros(3, 1)})
    """
    check_params(params)
    check_model_params(model, params)
    check_dtype_device(params, tensors)


def check_adapt_names(params, adapt_names) -> list[str]:
    """The names of the parameters to adapt: all of ``params`` for None, else a non-empty subset of them.

    Example::

        >>> check_adapt_names({"a": 0, "b": 1}, None)
        ['a', 'b']
        >>> check_adapt_names({"a": 0, "b": 1}, ["b"])
        ['b']
    """
    if adapt_names is None:
        return list(params)
    names = list(adapt_names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"adapt_names must be a non-empty subset of the parameter names {list(params)} "
                         f"(unknown: {unknown})")
    return names


def check_step_weights(step_weights, steps: int) -> Tensor | None:
    """Multi-step-loss weights as a tensor ``[steps]`` (one per inner step), or None.

    Example::

        >>> check_step_weights([0.25, 0.75], 2)
        tensor([0.2500, 0.7500], dtype=torch.float64)
    """
    if step_weights is None:
        return None
    w = step_weights if isinstance(step_weights, Tensor) else torch.tensor(step_weights, dtype=torch.float64)
    if w.shape != (steps,):
        raise ValueError(f"step_weights must have one weight per inner step, shape ({steps},) "
                         f"(got {tuple(w.shape)})")
    return w


# ------------------------------------------------------------------------------------------ losses
_REGRESSION_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
_REGRESSION_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
_CLASSIFICATION_LOSSES = (F.cross_entropy, F.nll_loss)
_CLASSIFICATION_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _loss_kind(fn) -> str | None:
    if any(fn is f for f in _REGRESSION_LOSSES) or isinstance(fn, _REGRESSION_MODULES):
        return "regression"
    if any(fn is f for f in _CLASSIFICATION_LOSSES) or isinstance(fn, _CLASSIFICATION_MODULES):
        return "classification"
    return None


def _loss_name(fn) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return f"torch.nn.functional.{name}" if any(fn is f for f in _REGRESSION_LOSSES + _CLASSIFICATION_LOSSES) \
        else name


class CheckedLoss:
    """``loss_fn`` with the checks that turn silent wrong answers into clear errors, for the losses whose
    contract is known: a regression loss (MSE, L1, ...) needs predictions and targets of one shape (else
    it broadcasts ``[shots, 1]`` against ``[shots]`` to ``[shots, shots]``); a classification loss needs
    labels in ``0..width-1`` (checked where the labels' range is known without a device synchronisation).
    Any other loss is called as it is. Made by :func:`prepare_loss`.

    Example::

        >>> loss = prepare_loss(F.mse_loss, {"y": torch.zeros(3, 1)})
        >>> loss(torch.zeros(3, 1), torch.ones(3, 1), "y")
        tensor(1.)
    """

    def __init__(self, fn, label_ranges: dict[str, tuple[int, int]]):
        self.fn, self.kind, self.label_ranges = fn, _loss_kind(fn), label_ranges

    def __call__(self, prediction: Tensor, target: Tensor, role: str = "targets") -> Tensor:
        if self.kind == "regression" and prediction.shape != target.shape:
            verb = "have" if role == "targets" else "has"
            raise ValueError(
                f"{role} {verb} shape {tuple(target.shape)} per task but the model predicts "
                f"{tuple(prediction.shape)}: with loss_fn={_loss_name(self.fn)} they must be equal (it would "
                "broadcast them to a wrong loss); for targets [tasks, shots] use y.unsqueeze(-1) to make them "
                "[tasks, shots, 1]")
        if self.kind == "classification" and role in self.label_ranges and prediction.dim() >= 2:
            low, high = self.label_ranges[role]
            width = prediction.shape[1]
            if low < 0 or high >= width:
                raise ValueError(f"{role} holds class labels in [{low}, {high}] but the model outputs {width} classes "
                                 f"(labels must be in 0..{width - 1}): build the model with num_classes >= {high + 1} "
                                 "or label each episode's classes 0..n_way-1")
        return self.fn(prediction, target)


def prepare_loss(loss_fn, targets: dict[str, Tensor]) -> CheckedLoss:
    """Check ``targets`` (role -> tensor, e.g. ``{'support_y': ...}``) against ``loss_fn`` and wrap it
    (:class:`CheckedLoss`).

    Example::

        >>> prepare_loss(F.mse_loss, {"support_y": torch.tensor([0, 1])})
        Traceback (most recent call last):
        ...
        ValueError: support_y holds integer class labels (torch.int64) but loss_fn=... is a regression loss: ...
    """
    fn = loss_fn.fn if isinstance(loss_fn, CheckedLoss) else loss_fn
    if not callable(fn):
        raise TypeError(f"loss_fn must be a callable loss(prediction, target) (got {fn!r})")
    kind = _loss_kind(fn)
    ranges = {}
    for role, y in targets.items():
        if kind == "regression" and not (y.is_floating_point() or y.is_complex()):
            raise ValueError(f"{role} holds integer class labels ({y.dtype}) but loss_fn={_loss_name(fn)} is a "
                             "regression loss: pass loss_fn=torch.nn.functional.cross_entropy for classification "
                             "(or float targets for regression)")
        if kind == "classification" and not y.is_floating_point() and y.device.type == "cpu" and y.numel():
            low, high = torch.aminmax(y.detach())
            ranges[role] = (int(low), int(high))
    return CheckedLoss(fn, ranges)


def apply_loss(loss_fn, prediction: Tensor, target: Tensor, role: str) -> Tensor:
    """``loss_fn(prediction, target)``, naming ``role`` in the error of a :class:`CheckedLoss`.

    Example::

        >>> apply_loss(F.mse_loss, torch.zeros(2), torch.ones(2), "y")
        tensor(1.)
    """
    if isinstance(loss_fn, CheckedLoss):
        return loss_fn(prediction, target, role)
    return loss_fn(prediction, target)
