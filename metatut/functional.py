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
checks against the loop (:data:`VMAP_VERIFIED_LAYERS`); anything else runs the loop. ``vectorize=True``
takes vmap or raises :class:`VectorizeError` (unverified layers such as batch norm, per-step parameters or
buffers, ``checkpoint_steps``): it never falls back to the loop silently.

The public entry points check their inputs before computing: every parameter of the model has a value in
``params`` and every key names one (or is a buffer, a learned step size ``inner_lr.*`` or a per-step copy
``per_step.<k>.<name>``); parameters and data share one device and floating dtype; regression losses
(MSE, L1, ...) get targets of the prediction's shape and float dtype; classification labels (on the CPU)
lie within the model's output width.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .models import Params
from .tasks.base import TaskBatch, check_positive_int

__all__ = [
    "LossFn", "VMAP_VERIFIED_LAYERS", "LEARNED_LR_PREFIX", "can_vectorize", "prefers_vmap", "task_loss", "per_task_losses",
    "summed_task_loss", "inner_step", "adapt", "maml_loss", "maml_objective", "MAMLObjective", "msl_weights",
    "summed_loss_objective", "reptile_loss", "reptile_objective", "learned_inner_lrs", "split_learned_lrs",
    "final_layer_names", "meta_gradient", "adaptation_curve", "PER_STEP_PREFIX", "per_step_params",
    "per_step_buffers", "batch_norm_names", "accumulated_meta_loss", "VectorizeError",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Layer types whose vmap-over-tasks path the tests check against the per-task loop (float64, both orders).
#: Batch norm is not among them: under ``vmap`` PyTorch's batch norm gives a second-order meta-gradient that
#: differs from the loop's by ~1e-2 relative even in float64, while the loop agrees with batch norm written
#: out in elementary operations (``tests/test_accel.py``); so conv4 with batch norm runs the loop.
VMAP_VERIFIED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Identity, nn.Flatten,
    nn.Conv2d, nn.MaxPool2d,
)

_REDUCTIONS = ("mean", "sum")


class VectorizeError(ValueError):
    """``vectorize=True`` was asked for a computation whose vmap path would not give the loop's numbers.

    Raised before anything is computed when the model holds layers outside :data:`VMAP_VERIFIED_LAYERS`
    (e.g. batch norm, whose second-order meta-gradient under ``torch.func.vmap`` differs from the loop's),
    or when per-step parameters, per-step ``buffers`` or ``checkpoint_steps=True`` are used (they run the
    per-task loop only). ``vectorize=False`` or ``'auto'`` run the loop instead. A ``ValueError``.

    Example::

        model = metatut.conv4(5)                     # batch norm: not verified under vmap
        try:
            metatut.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, vectorize=True)
        except metatut.VectorizeError as error:
            print(error)                             # names BatchNorm2d and says to use vectorize=False or 'auto'
    """


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


def _batch_tensors(batch: TaskBatch) -> dict[str, Tensor]:
    return {f"batch.{n}": getattr(batch, n) for n in ("support_x", "support_y", "query_x", "query_y")}


def _check_model_params(model: nn.Module, params: Params) -> None:
    """Every key of ``params`` names one of the model's parameters or buffers (directly or as a per-step copy
    ``per_step.<k>.<name>``; learned step sizes ``inner_lr.*`` are checked where they are used), and every
    parameter of the model has a value: ``functional_call`` would otherwise silently use the module's own
    tensor for a missing one (which is then never trained). A set comparison of names: cheap."""
    model_names = [n for n, _ in model.named_parameters()]
    known = set(model_names) | {n for n, _ in model.named_buffers()}
    present, unknown = set(), []
    for key in params:
        if key.startswith(LEARNED_LR_PREFIX):
            continue
        name = key[len(PER_STEP_PREFIX):].partition(".")[2] if key.startswith(PER_STEP_PREFIX) else key
        if name in known:
            present.add(name)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"params has keys the model does not have: {unknown}; the model's parameters are "
                         f"{model_names} (besides them params may hold buffers, learned step sizes 'inner_lr.*' and "
                         "per-step copies 'per_step.<k>.<name>'); check the spelling")
    missing = [n for n in model_names if n not in present]
    if missing:
        raise ValueError(f"params is missing the model's parameters {missing}: the model would silently use its own "
                         "tensors for them, which are never trained; pass all of them (metatut.init_params(model))")


def _check_dtype_device(params: Params, tensors: dict[str, Tensor]) -> None:
    """One device and one floating dtype for ``params`` and the data ``tensors`` (name -> tensor)."""
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


def _check_inputs(model: nn.Module, params: Params, tensors: dict[str, Tensor]) -> None:
    """The checks of every public entry point that takes a model, its parameters and data."""
    _check_params(params)
    _check_model_params(model, params)
    _check_dtype_device(params, tensors)


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


class _CheckedLoss:
    """``loss_fn`` with the checks that turn silent wrong answers into clear errors, for the losses whose
    contract is known: a regression loss (MSE, L1, ...) needs predictions and targets of one shape (else
    it broadcasts ``[shots, 1]`` against ``[shots]`` to ``[shots, shots]``); a classification loss needs
    labels in ``0..width-1`` (checked where the labels' range is known without a device synchronisation).
    Any other loss is called as it is."""

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


def _prepare_loss(loss_fn, targets: dict[str, Tensor]) -> _CheckedLoss:
    """Check ``targets`` (role -> tensor, e.g. ``{'support_y': ...}``) against ``loss_fn`` and wrap it."""
    fn = loss_fn.fn if isinstance(loss_fn, _CheckedLoss) else loss_fn
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
    return _CheckedLoss(fn, ranges)


def _apply_loss(loss_fn, prediction: Tensor, target: Tensor, role: str) -> Tensor:
    if isinstance(loss_fn, _CheckedLoss):
        return loss_fn(prediction, target, role)
    return loss_fn(prediction, target)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def _verified(module: nn.Module) -> bool:
    from .conv import Conv4
    return type(module) in VMAP_VERIFIED_LAYERS or type(module) is Conv4


def can_vectorize(model: nn.Module) -> bool:
    """True when every submodule of ``model`` is a layer whose vmap path the tests verify
    (:data:`VMAP_VERIFIED_LAYERS`); then ``vectorize=True`` gives the loop's meta-gradient, otherwise it
    raises :class:`VectorizeError`."""
    return all(_verified(m) for m in model.modules())


def prefers_vmap(model: nn.Module) -> bool:
    """What ``vectorize='auto'`` picks: vmap for verified models without convolutions.

    For convolutional models vmap turns each convolution into a grouped convolution over tasks, which
    measured 3-4x slower than the per-task loop on a CPU (``bench/RESULTS.md``), so ``'auto'`` keeps the
    loop for them; ``vectorize=True`` still takes the (verified) vmap path.
    """
    return can_vectorize(model) and not any(isinstance(m, nn.Conv2d) for m in model.modules())


def _unverified_layers(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if not _verified(m)})


def _use_vmap(model: nn.Module, vectorize, *, per_step: bool = False, checkpoint_steps: bool = False) -> bool:
    """Whether to take the vmap path. ``vectorize=True`` takes it or raises :class:`VectorizeError`: never a
    silent fall-back to the loop, never vmap where it is not verified to give the loop's numbers."""
    if isinstance(vectorize, str) and vectorize == "auto":
        return prefers_vmap(model) and not per_step and not checkpoint_steps
    if not isinstance(vectorize, bool):
        raise ValueError(f"vectorize must be True, False or 'auto' (got {vectorize!r})")
    if not vectorize:
        return False
    if checkpoint_steps:
        raise VectorizeError("checkpoint_steps=True runs the per-task loop; it cannot be combined with vectorize=True: "
                             "use vectorize=False or 'auto'")
    if per_step:
        raise VectorizeError("vectorize=True cannot run per-step parameters (per_step.<k>.<name>) or per-step buffers "
                             "(buffers=): MAML++'s per-step batch norm runs the per-task loop only; use vectorize=False "
                             "or 'auto'")
    unverified = _unverified_layers(model)
    if unverified:
        raise VectorizeError(f"vectorize=True cannot run this model: its layers {unverified} are not among those whose "
                             "vmap path is verified against the per-task loop (metatut.functional.VMAP_VERIFIED_LAYERS; "
                             "under torch.func.vmap batch norm gives a wrong second-order meta-gradient); use "
                             "vectorize=False or 'auto' (which runs the loop for this model)")
    return True


# ------------------------------------------------------------------------------------- task losses
def _task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn, role: str = "y") -> Tensor:
    return _apply_loss(loss_fn, functional_call(model, params, (x,)), y, role)


def task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """Loss of one task's examples ``x [shots, ...]``, ``y [shots, ...]`` at ``params`` (a scalar)."""
    return _task_loss(model, params, x, y, _prepare_loss(loss_fn, {"y": y}))


def _per_task_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn, vectorize, role: str) -> Tensor:
    if _use_vmap(model, vectorize):
        return vmap(partial(_task_loss, model, loss_fn=loss_fn, role=role), in_dims=(None, 0, 0))(params, x, y)
    return torch.stack([_task_loss(model, params, x[t], y[t], loss_fn, role) for t in range(x.shape[0])])


def per_task_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss,
                    vectorize="auto") -> Tensor:
    """Loss of each task at the same ``params``: ``x [tasks, shots, ...]`` -> ``[tasks]``."""
    _check_inputs(model, params, {"x": x, "y": y})
    loss = _prepare_loss(loss_fn, {"y": y})
    return _per_task_losses(model, params, x, y, loss, vectorize, "y")


def summed_task_loss(model: nn.Module, params: Params, batch: TaskBatch, *, loss_fn: LossFn = F.mse_loss,
                     reduction: str = "sum", use: str = "both", vectorize="auto") -> Tensor:
    r"""The joint-training objective :math:`L(\theta) = \sum_t L_t(\theta)` (no adaptation).

    ``use`` picks the examples each task contributes: ``'support'``, ``'query'`` or ``'both'``
    (all of the task's labelled examples: a baseline trained this way sees as much data as MAML).
    ``reduction='mean'`` divides by the number of tasks.
    """
    _check_params(params)
    _check_batch(batch)
    _check_inputs(model, params, _batch_tensors(batch))
    _check_reduction(reduction)
    if use == "support":
        x, y = batch.support_x, batch.support_y
    elif use == "query":
        x, y = batch.query_x, batch.query_y
    elif use == "both":
        x, y = torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)
    else:
        raise ValueError(f"use must be one of ('support', 'query', 'both') (got {use!r})")
    loss = _prepare_loss(loss_fn, {"targets": y})
    return _reduce(_per_task_losses(model, params, x, y, loss, vectorize, "targets"), reduction)


# ------------------------------------------------------------------------------- inner step sizes
#: Keys of learned inner step sizes inside a parameter dict: ``inner_lr.<name>`` (shared by all inner
#: steps) or ``inner_lr.step<k>.<name>`` (step ``k`` only, as in MAML++).
LEARNED_LR_PREFIX = "inner_lr."


def learned_inner_lrs(params: Params, *, init: float = 0.01, granularity: str = "parameter",
                      steps: int | None = None) -> Params:
    """Learnable inner step sizes for ``params``, to be meta-learned together with them.

    ``granularity='parameter'``: one step size per scalar parameter (Meta-SGD, Li et al. 2017);
    ``granularity='tensor'``: one per parameter tensor (per layer). ``steps=k`` gives each of ``k``
    inner steps its own step sizes (MAML++'s per-layer per-step rates, Antoniou et al. 2019).
    Returns ``{'inner_lr.<name>' or 'inner_lr.step<k>.<name>': tensor}``; merge it into the
    parameter dict (``{**params, **lrs}``) and use ``inner_lr='learned'``.
    """
    _check_params(params)
    init = _check_step_size("init", init)
    if granularity not in ("parameter", "tensor"):
        raise ValueError(f"granularity must be 'parameter' or 'tensor' (got {granularity!r})")
    keys = [""] if steps is None else [f"step{k}." for k in range(check_positive_int("steps", steps))]
    out = {}
    for prefix in keys:
        for name, p in params.items():
            shape = p.shape if granularity == "parameter" else ()
            out[f"{LEARNED_LR_PREFIX}{prefix}{name}"] = torch.full(shape, init, dtype=p.dtype, device=p.device,
                                                                   requires_grad=True)
    return out


def split_learned_lrs(params: Params) -> tuple[Params, Params]:
    """Split a parameter dict into ``(model parameters, learned inner step sizes)``."""
    theta = {k: v for k, v in params.items() if not k.startswith(LEARNED_LR_PREFIX)}
    lrs = {k: v for k, v in params.items() if k.startswith(LEARNED_LR_PREFIX)}
    return theta, lrs


def _resolve_inner_lr(inner_lr, params: Params):
    """Return ``(theta, rates)``: the model parameters and a dict of step sizes (or one float)."""
    if isinstance(inner_lr, str):
        if inner_lr != "learned":
            raise ValueError(f"inner_lr must be a number >= 0, a dict of tensors or 'learned' (got {inner_lr!r})")
        theta, rates = split_learned_lrs(params)
        if not rates:
            raise ValueError("inner_lr='learned' needs learned step sizes in params: "
                             "params = {**params, **metatut.learned_inner_lrs(params)}")
        return theta, rates
    if isinstance(inner_lr, dict):
        return params, {k if k.startswith(LEARNED_LR_PREFIX) else LEARNED_LR_PREFIX + k: v
                        for k, v in inner_lr.items()}
    return params, _check_step_size("inner_lr", inner_lr)


def _rate(rates, name: str, step: int):
    if not isinstance(rates, dict):
        return rates
    for key in (f"{LEARNED_LR_PREFIX}step{step}.{name}", f"{LEARNED_LR_PREFIX}{name}"):
        if key in rates:
            return rates[key]
    raise KeyError(f"no inner step size for parameter {name!r} at inner step {step} "
                   f"(expected key {LEARNED_LR_PREFIX}{name!r} or {LEARNED_LR_PREFIX}step{step}.{name!r})")


def _check_adapt_names(params: Params, adapt_names) -> list[str]:
    if adapt_names is None:
        return list(params)
    names = list(adapt_names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"adapt_names must be a non-empty subset of the parameter names {list(params)} "
                         f"(unknown: {unknown})")
    return names


def final_layer_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the last submodule that owns parameters (ANIL's "head")."""
    owners = [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError("the model has no parameters")
    prefix, module = owners[-1]
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]


#: Keys of per-step parameters inside a parameter dict: ``per_step.<k>.<name>`` is the value of parameter
#: ``name`` while the model is evaluated at inner step ``k`` (MAML++'s per-step batch-norm weights and biases).
PER_STEP_PREFIX = "per_step."


def batch_norm_names(model: nn.Module, *, buffers: bool = False) -> list[str]:
    """Names of the batch-norm layers' weights and biases (``buffers=True``: their running statistics)."""
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            tensors = module.named_buffers(recurse=False) if buffers else module.named_parameters(recurse=False)
            out += [f"{prefix}.{n}" if prefix else n for n, t in tensors if t is not None]
    return out


def per_step_params(params: Params, names, steps: int) -> Params:
    """Learnable per-step copies of ``params[name]`` for each name: one for each of the model's evaluations
    at inner steps ``0..steps`` (MAML++'s per-step batch-norm weights and biases, "BNWB", Antoniou et al.
    2019, sec. 4). Returns ``{'per_step.<k>.<name>': tensor}``; merge it into the parameter dict. The
    copies replace ``params[name]`` everywhere in :func:`maml_loss`, are meta-learned, and are not adapted
    in the inner loop.
    """
    _check_params(params)
    check_positive_int("steps", steps, minimum=0)
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"names must be a non-empty subset of the parameter names (unknown: {unknown})")
    return {f"{PER_STEP_PREFIX}{k}.{n}": params[n].detach().clone().requires_grad_(True)
            for k in range(steps + 1) for n in names}


def per_step_buffers(model: nn.Module, steps: int) -> dict[int, Params]:
    """Per-step copies of the model's batch-norm running statistics (MAML++'s "BNRS"): ``{k: {name: tensor}}``
    for inner steps ``0..steps``. Pass them as ``buffers=`` to :func:`maml_loss` (in training mode each
    step's forward pass updates its own copy) and to :func:`adaptation_curve` (in ``model.eval()`` mode
    each step normalises with its own statistics). Needs batch norm with running statistics, e.g.
    ``conv4(..., batch_norm='running')``.
    """
    check_positive_int("steps", steps, minimum=0)
    names = batch_norm_names(model, buffers=True)
    if not names:
        raise ValueError("the model has no batch-norm running statistics (use batch_norm='running')")
    current = dict(model.named_buffers())
    return {k: {n: current[n].detach().clone() for n in names} for k in range(steps + 1)}


def _step_overrides(theta: Params, steps: int, buffers) -> tuple[Params, list[Params] | None]:
    """Split per-step parameters off ``theta`` and combine them with per-step ``buffers`` into one dict of
    replacements for each of the evaluations at inner steps ``0..steps``."""
    per_step = {k: v for k, v in theta.items() if k.startswith(PER_STEP_PREFIX)}
    if not per_step and not buffers:
        return theta, None
    overrides: list[Params] = [{} for _ in range(steps + 1)]
    replaced = set()
    for key, value in per_step.items():
        index, _, name = key[len(PER_STEP_PREFIX):].partition(".")
        if not index.isdigit() or int(index) > steps:
            raise ValueError(f"per-step parameter {key!r} does not name an inner step in 0..{steps}")
        overrides[int(index)][name] = value
        replaced.add(name)
    for k in range(steps + 1):
        missing = replaced - set(overrides[k])
        if missing:
            raise ValueError(f"per-step parameters for inner step {k} are missing: {sorted(missing)} "
                             f"(make them with per_step_params(params, names, steps={steps}))")
    if buffers:
        if not isinstance(buffers, dict) or set(buffers) != set(range(steps + 1)):
            raise ValueError(f"buffers must map each inner step 0..{steps} to a dict of tensors "
                             "(metatut.per_step_buffers(model, steps))")
        for k in range(steps + 1):
            overrides[k].update(buffers[k])
    theta = {k: v for k, v in theta.items() if k not in per_step and k not in replaced}
    return theta, overrides


# -------------------------------------------------------------------------------------- inner loop
def _sgd_step(model, params: Params, x, y, *, rates, step: int, first_order: bool, adapt_names, loss_fn,
              functional: bool, fixed: Params | None = None) -> Params:
    """theta_{k+1} = theta_k - rate * grad L_S(theta_k) on the parameters in ``adapt_names``.

    ``functional=True`` uses ``torch.func.grad`` (runs under ``vmap``); ``False`` uses
    ``torch.autograd.grad`` with ``create_graph=not first_order`` (the per-task reference).
    """
    fixed = fixed or {}
    if functional:
        def support_loss(sub):
            return _apply_loss(loss_fn, functional_call(model, {**params, **fixed, **sub}, (x,)), y, "support_y")
        grads = grad(support_loss)({n: params[n] for n in adapt_names})
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
    else:
        with torch.enable_grad():
            inputs = {n: params[n] if params[n].requires_grad else params[n].detach().requires_grad_()
                      for n in adapt_names}
            loss = _apply_loss(loss_fn, functional_call(model, {**params, **fixed, **inputs}, (x,)), y, "support_y")
            grads = dict(zip(adapt_names, torch.autograd.grad(loss, list(inputs.values()),
                                                              create_graph=not first_order), strict=True))
            params = {**params, **inputs}
    new = dict(params)
    for n in adapt_names:
        new[n] = params[n] - _rate(rates, n, step) * grads[n]
    return new


def _trajectory(model, params, x, y, *, rates, steps, first_order, adapt_names, loss_fn, functional,
                checkpoint_steps=False, overrides=None) -> list[Params]:
    """[theta_0, theta_1, ..., theta_steps] for one task; ``overrides[k]`` replaces tensors at step ``k``."""
    path = [params]
    for k in range(steps):
        fixed = overrides[k] if overrides else None
        if checkpoint_steps and not functional:
            names = list(params)

            # Bind this step's index, overrides and names now: the recomputation in the backward pass runs
            # after the loop has moved on (a closure over the loop variables would see the last step's).
            def step_fn(*tensors, _k=k, _fixed=fixed, _names=names):
                out = _sgd_step(model, dict(zip(_names, tensors, strict=True)), x, y, rates=rates, step=_k,
                                first_order=first_order, adapt_names=adapt_names, loss_fn=loss_fn, functional=False,
                                fixed=_fixed)
                return tuple(out[n] for n in _names)

            params = dict(zip(names, torch.utils.checkpoint.checkpoint(step_fn, *params.values(),
                                                                       use_reentrant=False), strict=True))
        else:
            params = _sgd_step(model, params, x, y, rates=rates, step=k, first_order=first_order,
                               adapt_names=adapt_names, loss_fn=loss_fn, functional=functional, fixed=fixed)
        path.append(params)
    return path


def inner_step(model: nn.Module, params: Params, x: Tensor, y: Tensor, inner_lr: float, *,
               create_graph: bool = True, loss_fn: LossFn = F.mse_loss) -> Params:
    r"""One SGD step on one task's support set: :math:`\theta' = \theta - \alpha \nabla L_S(\theta)`.

    ``x [shots, ...]``, ``y [shots, ...]``. ``create_graph=True`` keeps the step differentiable
    (second-order MAML); ``False`` treats the gradient as a constant (first-order MAML).
    Returns a new dict; ``params`` is not modified.
    """
    _check_inputs(model, params, {"x": x, "y": y})
    loss = _prepare_loss(loss_fn, {"support_y": y})
    theta, rates = _resolve_inner_lr(inner_lr, params)
    return _sgd_step(model, theta, x, y, rates=rates, step=0, first_order=not create_graph,
                     adapt_names=list(theta), loss_fn=loss, functional=False)


def adapt(model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, *, inner_lr, steps: int = 1,
          first_order: bool = False, adapt_names=None, buffers=None, loss_fn: LossFn = F.mse_loss,
          vectorize="auto") -> Params:
    """Adapt ``params`` to each task with ``steps`` SGD steps of size ``inner_lr`` on its support set.

    ``support_x [tasks, shots, ...]``, ``support_y [tasks, shots, ...]``. Returns a dict whose tensors
    have a leading task dimension: ``{name: [tasks, *param.shape]}``. The result stays differentiable
    with respect to ``params`` (fully for ``first_order=False``; through the identity path only for
    ``first_order=True``). ``inner_lr`` is a number, a dict of step sizes, or ``'learned'``;
    ``adapt_names`` restricts adaptation to some parameters (ANIL: the head). Per-step parameters and
    ``buffers`` (MAML++) are used as in :func:`maml_loss` and are not part of the result.
    """
    _check_inputs(model, params, {"support_x": support_x, "support_y": support_y})
    loss_fn = _prepare_loss(loss_fn, {"support_y": support_y})
    check_positive_int("steps", steps, minimum=0)
    theta, rates = _resolve_inner_lr(inner_lr, params)
    theta, overrides = _step_overrides(theta, steps, buffers)
    names = _check_adapt_names(theta, adapt_names)
    options = dict(rates=rates, steps=steps, first_order=first_order, adapt_names=names, loss_fn=loss_fn,
                   overrides=overrides)
    if _use_vmap(model, vectorize, per_step=overrides is not None):
        with torch.enable_grad():
            return vmap(lambda p, x, y: _trajectory(model, p, x, y, functional=True, **options)[-1],
                        in_dims=(None, 0, 0))(theta, support_x, support_y)
    adapted = [_trajectory(model, theta, support_x[t], support_y[t], functional=False, **options)[-1]
               for t in range(support_x.shape[0])]
    return {k: torch.stack([a[k] for a in adapted]) for k in theta}


# --------------------------------------------------------------------------------------- meta-loss
def _check_step_weights(step_weights, steps: int):
    if step_weights is None:
        return None
    w = step_weights if isinstance(step_weights, Tensor) else torch.tensor(step_weights, dtype=torch.float64)
    if w.shape != (steps,):
        raise ValueError(f"step_weights must have one weight per inner step, shape ({steps},) "
                         f"(got {tuple(w.shape)})")
    return w


def _updates_running_stats(model: nn.Module) -> bool:
    """True when a forward pass of ``model`` updates batch-norm running statistics (training mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
               for m in model.modules())


def _at_step(overrides, k: int) -> Params:
    return overrides[k] if overrides else {}


def _task_meta_loss(model, params, sx, sy, qx, qy, *, weights, functional, loss_fn, overrides=None, **options):
    path = _trajectory(model, params, sx, sy, functional=functional, loss_fn=loss_fn, overrides=overrides, **options)
    if weights is None:
        return _apply_loss(loss_fn, functional_call(model, {**path[-1], **_at_step(overrides, len(path) - 1)}, (qx,)),
                           qy, "query_y")
    losses = torch.stack([_apply_loss(loss_fn, functional_call(model, {**p, **_at_step(overrides, k)}, (qx,)), qy,
                                      "query_y")
                          for k, p in enumerate(path) if k > 0])
    return (weights.to(losses) * losses).sum()


def maml_loss(model: nn.Module, params: Params, batch: TaskBatch, *, inner_lr, inner_steps: int = 1,
              first_order: bool = False, adapt_names=None, step_weights=None, checkpoint_steps: bool = False,
              buffers=None, loss_fn: LossFn = F.mse_loss, reduction: str = "mean", vectorize="auto",
              vmap_chunk_size: int | None = None, task_workers: int = 1, per_task_backward: bool = False) -> Tensor:
    r"""The MAML meta-loss :math:`\frac{1}{T}\sum_t L_{Q_t}(\mathrm{adapt}_t(\theta))` (``reduction='mean'``).

    Differentiate it with respect to ``params`` (``.backward()`` or ``torch.autograd.grad``) to get
    the second-order meta-gradient, or the first-order one with ``first_order=True``.
    ``inner_steps=0`` makes it the summed-task loss on the query sets. Options of the MAML family:

    * ``inner_lr``: a number; a dict ``{name: step size}`` (scalar or parameter-shaped); or
      ``'learned'`` to read step sizes from ``params`` (Meta-SGD, MAML++; see :func:`learned_inner_lrs`);
    * ``adapt_names``: adapt only these parameters in the inner loop (ANIL: :func:`final_layer_names`);
    * ``step_weights [inner_steps]``: multi-step loss :math:`\sum_k w_k L_Q(\theta_k)` (MAML++);
    * ``checkpoint_steps``: recompute each inner step in the backward pass instead of storing it
      (gradient checkpointing: less memory, more time; per-task loop only; refused while batch norm
      updates running statistics, which the recomputation would update twice: use ``model.eval()``);
    * per-step parameters ``per_step.<k>.<name>`` in ``params`` (:func:`per_step_params`) replace
      ``name`` while the model is evaluated at inner step ``k``, and ``buffers={k: {name: tensor}}``
      (:func:`per_step_buffers`) gives each step its own batch-norm running statistics (MAML++'s per-step
      batch norm; per-task loop only).

    ``vectorize``: ``'auto'`` (:func:`prefers_vmap`), ``True`` (vmap over tasks; :class:`VectorizeError` where
    that path is not verified: batch norm, per-step parameters or buffers, ``checkpoint_steps``) or ``False``
    (the per-task loop, the reference). ``vmap_chunk_size=c`` runs the vmap path ``c`` tasks at a time, bounding memory.
    ``per_task_backward=True`` differentiates each task as soon as its loss is built and frees its graph
    (memory of one task instead of the whole meta-batch, as the training command does), and
    ``task_workers=w`` runs the per-task loop in ``w`` threads, each differentiating its share of the tasks
    (:func:`accumulated_meta_loss`); with either, the loss returned is differentiable once.
    """
    _check_params(params)
    _check_batch(batch)
    _check_inputs(model, params, _batch_tensors(batch))
    loss_fn = _prepare_loss(loss_fn, {"support_y": batch.support_y, "query_y": batch.query_y})
    _check_reduction(reduction)
    check_positive_int("inner_steps", inner_steps, minimum=0)
    if vmap_chunk_size is not None:
        check_positive_int("vmap_chunk_size", vmap_chunk_size)
    theta, rates = _resolve_inner_lr(inner_lr, params)
    theta, overrides = _step_overrides(theta, inner_steps, buffers)
    names = _check_adapt_names(theta, adapt_names)
    weights = _check_step_weights(step_weights, inner_steps)
    use_vmap = _use_vmap(model, vectorize, per_step=overrides is not None, checkpoint_steps=checkpoint_steps)
    if checkpoint_steps and inner_steps and _updates_running_stats(model):
        raise ValueError("checkpoint_steps=True cannot be used while batch norm updates running statistics (the "
                         "model's own, or per-step buffers=): recomputing each inner step in the backward pass would "
                         "update them a second time. Use checkpoint_steps=False, or model.eval() (running statistics "
                         "are then only read)")
    options = dict(rates=rates, steps=inner_steps, first_order=first_order, adapt_names=names, loss_fn=loss_fn,
                   weights=weights, overrides=overrides)
    if use_vmap:
        losses = vmap(lambda p, sx, sy, qx, qy: _task_meta_loss(model, p, sx, sy, qx, qy, functional=True, **options),
                      in_dims=(None, 0, 0, 0, 0), chunk_size=vmap_chunk_size)(theta, batch.support_x, batch.support_y, batch.query_x,
                                                  batch.query_y)
    else:
        def one_task(net: nn.Module, t: int) -> Tensor:
            return _task_meta_loss(net, theta, batch.support_x[t], batch.support_y[t], batch.query_x[t],
                                   batch.query_y[t], functional=False, checkpoint_steps=checkpoint_steps, **options)
        check_positive_int("task_workers", task_workers)
        if task_workers > 1 or per_task_backward:
            return accumulated_meta_loss(model, one_task, batch.num_tasks, params, workers=task_workers,
                                         per_task=per_task_backward, reduction=reduction)
        losses = torch.stack([one_task(model, t) for t in range(batch.num_tasks)])
    return _reduce(losses, reduction)


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


def accumulated_meta_loss(model: nn.Module, task_loss_fn: Callable[[nn.Module, int], Tensor], num_tasks: int,
                          params: Params, *, workers: int = 1, per_task: bool = True,
                          reduction: str = "mean") -> Tensor:
    """Sum or mean of ``task_loss_fn(model, t)`` over ``t < num_tasks``, differentiated as it is computed.

    The gradient with respect to ``params`` is accumulated here (``torch.autograd.grad``) and handed to a
    later ``backward()`` by the returned loss, which is therefore differentiable once. ``per_task=True``
    differentiates each task as soon as its loss exists, so only one task's graph is alive at a time
    (memory of one task, not of the meta-batch); ``False`` differentiates each worker's share at once.

    ``workers > 1`` splits the tasks into contiguous shares computed in that many threads (PyTorch
    releases the GIL inside its kernels, so the shares run in parallel on a CPU); intra-op threads are
    set to 1 while they run and restored afterwards. ``functional_call`` swaps tensors into the module it
    is given, so each thread gets its own copy of ``model`` (models with buffers, which would then be
    updated in a copy only, are refused). The gradient equals the loop's up to the order of summation.
    """
    _check_reduction(reduction)
    check_positive_int("workers", workers)
    workers = min(workers, num_tasks)
    if workers > 1 and any(True for _ in model.buffers()):
        raise ValueError("task_workers > 1 needs a model without buffers (e.g. batch norm with batch statistics); "
                         "this one has running statistics: use task_workers=1")
    leaves = [p for p in params.values() if isinstance(p, Tensor) and p.requires_grad]
    differentiate = torch.is_grad_enabled() and bool(leaves)
    shares = [range(i * num_tasks // workers, (i + 1) * num_tasks // workers) for i in range(workers)]
    copies = [model] + [copy.deepcopy(model) for _ in range(workers - 1)]

    def run(worker: int):
        net, share = copies[worker], shares[worker]
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

    if workers == 1:
        results = [run(0)]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metatut-task") as pool:
                results = list(pool.map(run, range(workers)))
        finally:
            torch.set_num_threads(threads)
    value = _reduce(torch.cat([losses for losses, _ in results]), reduction)
    if not differentiate:
        return value
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    grads = [sum(r[1][i] for r in results) * scale for i in range(len(leaves))]
    return _PrecomputedGradient.apply(value, len(leaves), *leaves, *grads)


def msl_weights(iteration: int, inner_steps: int, anneal_iterations: int, *, min_weight: float = 0.03) -> Tensor:
    """MAML++'s multi-step-loss weights at meta-iteration ``iteration`` (Antoniou et al. 2019, sec. 4).

    They start uniform (1/K each) and move linearly, over ``anneal_iterations``, towards all weight on
    the last step; the earlier steps keep at least ``min_weight / K``. Returns ``[inner_steps]``,
    summing to 1.
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
    """``objective(params, batch, step)`` for :func:`metatut.meta_train`: :func:`maml_loss` with fixed options,
    plus MAML++'s schedules over meta-iterations.

    * ``first_order_until=N``: first-order meta-gradients for iterations ``< N``, then second order
      (derivative-order annealing);
    * ``msl_anneal_iterations=N``: multi-step loss with :func:`msl_weights` annealed over ``N`` iterations
      (needs ``inner_steps >= 2`` to matter).
    """

    uses_step = True

    def __init__(self, model: nn.Module, *, first_order_until: int = 0, msl_anneal_iterations: int = 0, **options):
        if "inner_lr" not in options:
            raise TypeError("maml_objective needs inner_lr (a number >= 0, a dict of step sizes or 'learned')")
        if not isinstance(options["inner_lr"], (str, dict)):
            _check_step_size("inner_lr", options["inner_lr"])
        check_positive_int("first_order_until", first_order_until, minimum=0)
        check_positive_int("msl_anneal_iterations", msl_anneal_iterations, minimum=0)
        self.model, self.options = model, options
        self.first_order_until, self.msl_anneal_iterations = first_order_until, msl_anneal_iterations

    def options_at(self, step: int | None) -> dict:
        """The keyword arguments :func:`maml_loss` gets at meta-iteration ``step``."""
        options = dict(self.options)
        if step is not None and step < self.first_order_until:
            options["first_order"] = True
        if self.msl_anneal_iterations and step is not None:
            options["step_weights"] = msl_weights(step, options.get("inner_steps", 1), self.msl_anneal_iterations)
        return options

    def __call__(self, params: Params, batch: TaskBatch, step: int | None = None) -> Tensor:
        return maml_loss(self.model, params, batch, **self.options_at(step))

    def __repr__(self) -> str:
        extra = {k: v for k, v in (("first_order_until", self.first_order_until),
                                   ("msl_anneal_iterations", self.msl_anneal_iterations)) if v}
        return f"MAMLObjective({type(self.model).__name__}, {self.options | extra})"


def maml_objective(model: nn.Module, **options) -> MAMLObjective:
    """``objective(params, batch)`` for :func:`metatut.meta_train`: :func:`maml_loss` with fixed options
    (see :class:`MAMLObjective` for MAML++'s schedules)."""
    return MAMLObjective(model, **options)


def summed_loss_objective(model: nn.Module, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for the joint-training baseline (:func:`summed_task_loss`)."""
    return partial(summed_task_loss, model, **options)


def reptile_loss(model: nn.Module, params: Params, batch: TaskBatch, *, inner_lr: float, inner_steps: int = 5,
                 use: str = "both", loss_fn: LossFn = F.mse_loss, vectorize="auto") -> Tensor:
    r"""A surrogate whose gradient is Reptile's update direction :math:`\theta - \frac{1}{T}\sum_t \theta'_t`.

    Reptile (Nichol et al. 2018) runs ``inner_steps`` plain SGD steps on each task's data (``use``:
    ``'support'`` or ``'both'``, support and query together), then moves θ towards the adapted
    parameters. The surrogate :math:`\tfrac12\lVert\theta - \mathrm{sg}(\bar\theta')\rVert^2` has exactly that
    gradient, so :func:`meta_train` with ``torch.optim.SGD(lr=ε)`` performs
    :math:`\theta \leftarrow \theta + \varepsilon(\bar\theta' - \theta)`; with Adam it is Reptile with Adam.
    """
    _check_params(params)
    _check_batch(batch)
    _check_inputs(model, params, _batch_tensors(batch))
    check_positive_int("inner_steps", inner_steps)
    if use == "both":
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1)
    elif use == "support":
        x, y = batch.support_x, batch.support_y
    else:
        raise ValueError(f"use must be 'support' or 'both' (got {use!r})")
    detached = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        adapted = adapt(model, detached, x, y, inner_lr=inner_lr, steps=inner_steps, first_order=True,
                        loss_fn=loss_fn, vectorize=vectorize)
    target = {k: v.detach().mean(0) for k, v in adapted.items()}
    return 0.5 * sum(((params[k] - target[k]) ** 2).sum() for k in params)


def reptile_objective(model: nn.Module, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for :func:`metatut.meta_train`: :func:`reptile_loss` with fixed options."""
    _check_step_size("inner_lr", options.get("inner_lr"))
    return partial(reptile_loss, model, **options)


def meta_gradient(objective: Callable[[Params, TaskBatch], Tensor], params: Params,
                  batch: TaskBatch) -> tuple[Tensor, Params]:
    """Return ``(loss, {name: d loss / d param})`` for any objective (detached results).

    A parameter the objective does not use has gradient zero (returned as zeros of its shape), e.g. the
    originals of batch-norm weights replaced by per-step copies in ``{**params, **per_step_params(...)}``.
    """
    _check_params(params)
    names = list(params)
    tensors = [params[n] if params[n].requires_grad else params[n].detach().requires_grad_() for n in names]
    with torch.enable_grad():
        loss = objective(dict(zip(names, tensors, strict=True)), batch)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
    return loss.detach(), dict(zip(names, grads, strict=True))


# --------------------------------------------------------------------------------------- evaluation
def adaptation_curve(model: nn.Module, params: Params, batch: TaskBatch, *, inner_lr, steps: int,
                     adapt_names=None, buffers=None, loss_fn: LossFn = F.mse_loss, vectorize="auto",
                     chunk_size: int | None = None) -> Tensor:
    """Query loss of each task after 0, 1, ..., ``steps`` SGD steps on its support set.

    Returns a detached tensor ``[tasks, steps + 1]``. Used at test time: no meta-gradient is kept.
    ``inner_lr`` and ``adapt_names`` are as in :func:`maml_loss` (e.g. ``'learned'`` for Meta-SGD).
    """
    _check_params(params)
    _check_batch(batch)
    _check_inputs(model, params, _batch_tensors(batch))
    loss_fn = _prepare_loss(loss_fn, {"support_y": batch.support_y, "query_y": batch.query_y})
    check_positive_int("steps", steps, minimum=0)
    theta, rates = _resolve_inner_lr(inner_lr, {k: v.detach() for k, v in params.items()})
    theta, overrides = _step_overrides(theta, steps, buffers)
    names = _check_adapt_names(theta, adapt_names)

    def curve(p, sx, sy, qx, qy, functional):
        path = _trajectory(model, p, sx, sy, rates=rates, steps=steps, first_order=True, adapt_names=names,
                           loss_fn=loss_fn, functional=functional, overrides=overrides)
        return torch.stack([_apply_loss(loss_fn, functional_call(model, {**q, **_at_step(overrides, k)}, (qx,)), qy,
                                        "query_y").detach()
                            for k, q in enumerate(path)])

    with torch.no_grad():
        if _use_vmap(model, vectorize, per_step=overrides is not None):
            return vmap(partial(curve, functional=True), in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size)(
                theta, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return torch.stack([curve(theta, batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t],
                                  functional=False) for t in range(batch.num_tasks)])
