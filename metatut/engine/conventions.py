"""The MAML family's naming conventions inside a parameter dict.

A parameter dict maps the model's parameter names to tensors. Three kinds of extra keys carry the family's
additions, so that they are meta-learned by the same optimiser as the parameters:

* ``inner_lr.<name>`` / ``inner_lr.step<k>.<name>``: learned inner step sizes (Meta-SGD; MAML++'s per-step
  rates), made by :func:`learned_inner_lrs` and used with ``inner_lr='learned'``;
* ``per_step.<k>.<name>``: the value of parameter ``name`` while the model is evaluated at inner step ``k``
  (MAML++'s per-step batch-norm weights and biases), made by :func:`per_step_params`;
* per-step buffers (not in the dict, passed as ``buffers=``): :func:`per_step_buffers`.

:func:`final_layer_names` (ANIL's head) and :func:`batch_norm_names` name the parameters the options select.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..models import Params
from ..validate import check_params, check_positive_int, check_step_size

__all__ = ["LEARNED_LR_PREFIX", "PER_STEP_PREFIX", "learned_inner_lrs", "split_learned_lrs", "resolve_inner_lr",
           "step_size", "final_layer_names", "batch_norm_names", "per_step_params", "per_step_buffers",
           "step_overrides", "at_step", "updates_running_stats"]

#: Keys of learned inner step sizes inside a parameter dict: ``inner_lr.<name>`` (shared by all inner
#: steps) or ``inner_lr.step<k>.<name>`` (step ``k`` only, as in MAML++).
LEARNED_LR_PREFIX = "inner_lr."

#: Keys of per-step parameters inside a parameter dict: ``per_step.<k>.<name>`` is the value of parameter
#: ``name`` while the model is evaluated at inner step ``k`` (MAML++'s per-step batch-norm weights and biases).
PER_STEP_PREFIX = "per_step."


def learned_inner_lrs(params: Params, *, init: float = 0.01, granularity: str = "parameter",
                      steps: int | None = None) -> Params:
    """Learnable inner step sizes for ``params``, to be meta-learned together with them.

    ``granularity='parameter'``: one step size per scalar parameter (Meta-SGD, Li et al. 2017);
    ``granularity='tensor'``: one per parameter tensor (per layer). ``steps=k`` gives each of ``k``
    inner steps its own step sizes (MAML++'s per-layer per-step rates, Antoniou et al. 2019).
    Returns ``{'inner_lr.<name>' or 'inner_lr.step<k>.<name>': tensor}`` (shape of the parameter, or ``[]``);
    merge it into the parameter dict (``{**params, **lrs}``) and use ``inner_lr='learned'``.

    Example::

        >>> import torch
        >>> lrs = learned_inner_lrs({"w": torch.zeros(2, 3)}, granularity="tensor", steps=2)
        >>> sorted(lrs), lrs["inner_lr.step0.w"].shape
        (['inner_lr.step0.w', 'inner_lr.step1.w'], torch.Size([]))
    """
    check_params(params)
    init = check_step_size("init", init)
    if granularity not in ("parameter", "tensor"):
        raise ValueError(f"granularity must be 'parameter' or 'tensor' (got {granularity!r})")
    keys = [""] if steps is None else [f"step{k}." for k in range(check_positive_int("steps", steps))]
    out = {}
    for prefix in keys:
        for name, p in params.items():
            shape = p.shape if granularity == "parameter" else ()
            out[f"{LEARNED_LR_PREFIX}{prefix}{name}"] = p.new_full(shape, init).requires_grad_(True)
    return out


def split_learned_lrs(params: Params) -> tuple[Params, Params]:
    """Split a parameter dict into ``(model parameters, learned inner step sizes)``.

    Example::

        >>> theta, lrs = split_learned_lrs({"w": 1, "inner_lr.w": 0.1})
        >>> theta, lrs
        ({'w': 1}, {'inner_lr.w': 0.1})
    """
    theta = {k: v for k, v in params.items() if not k.startswith(LEARNED_LR_PREFIX)}
    lrs = {k: v for k, v in params.items() if k.startswith(LEARNED_LR_PREFIX)}
    return theta, lrs


def resolve_inner_lr(inner_lr, params: Params):
    """Return ``(theta, rates)``: the model parameters and a dict of step sizes (or one float).

    Example::

        >>> resolve_inner_lr(0.1, {"w": 1})
        ({'w': 1}, 0.1)
        >>> resolve_inner_lr({"w": 0.5}, {"w": 1})
        ({'w': 1}, {'inner_lr.w': 0.5})
    """
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
    return params, check_step_size("inner_lr", inner_lr)


def step_size(rates, name: str, step: int):
    """The step size of parameter ``name`` at inner step ``step`` (per-step key first, then the shared one).

    Example::

        >>> step_size({"inner_lr.step1.w": 0.2, "inner_lr.w": 0.1}, "w", 1)
        0.2
        >>> step_size(0.05, "w", 0)
        0.05
    """
    if not isinstance(rates, dict):
        return rates
    for key in (f"{LEARNED_LR_PREFIX}step{step}.{name}", f"{LEARNED_LR_PREFIX}{name}"):
        if key in rates:
            return rates[key]
    raise KeyError(f"no inner step size for parameter {name!r} at inner step {step} "
                   f"(expected key {LEARNED_LR_PREFIX}{name!r} or {LEARNED_LR_PREFIX}step{step}.{name!r})")


def final_layer_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the last submodule that owns parameters (ANIL's "head").

    Example::

        >>> final_layer_names(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)))
        ['2.weight', '2.bias']
    """
    owners = [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError("the model has no parameters")
    prefix, module = owners[-1]
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]


def batch_norm_names(model: nn.Module, *, buffers: bool = False) -> list[str]:
    """Names of the batch-norm layers' weights and biases (``buffers=True``: their running statistics).

    Example::

        >>> batch_norm_names(nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2)))
        ['1.weight', '1.bias']
    """
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
    copies replace ``params[name]`` everywhere in :func:`metatut.maml_loss`, are meta-learned, and are not
    adapted in the inner loop.

    Example::

        >>> import torch
        >>> sorted(per_step_params({"b": torch.zeros(3)}, ["b"], steps=1))
        ['per_step.0.b', 'per_step.1.b']
    """
    check_params(params)
    check_positive_int("steps", steps, minimum=0)
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"names must be a non-empty subset of the parameter names (unknown: {unknown})")
    return {f"{PER_STEP_PREFIX}{k}.{n}": params[n].detach().clone().requires_grad_(True)
            for k in range(steps + 1) for n in names}


def per_step_buffers(model: nn.Module, steps: int) -> dict[int, Params]:
    """Per-step copies of the model's batch-norm running statistics (MAML++'s "BNRS"): ``{k: {name: tensor}}``
    for inner steps ``0..steps``. Pass them as ``buffers=`` to :func:`metatut.maml_loss` (in training mode
    each step's forward pass updates its own copy) and to :func:`metatut.adaptation_curve` (in ``model.eval()``
    mode each step normalises with its own statistics). Needs batch norm with running statistics, e.g.
    ``conv4(..., batch_norm='running')``.

    Example::

        >>> buffers = per_step_buffers(nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2)), steps=1)
        >>> sorted(buffers), sorted(buffers[0])
        ([0, 1], ['1.num_batches_tracked', '1.running_mean', '1.running_var'])
    """
    check_positive_int("steps", steps, minimum=0)
    names = batch_norm_names(model, buffers=True)
    if not names:
        raise ValueError("the model has no batch-norm running statistics (use batch_norm='running')")
    current = dict(model.named_buffers())
    return {k: {n: current[n].detach().clone() for n in names} for k in range(steps + 1)}


def step_overrides(theta: Params, steps: int, buffers) -> tuple[Params, list[Params] | None]:
    """Split per-step parameters off ``theta`` and combine them with per-step ``buffers`` into one dict of
    replacements for each of the evaluations at inner steps ``0..steps``: ``(theta, overrides or None)``.

    Example::

        >>> theta, overrides = step_overrides({"w": 1, "per_step.0.b": 2, "per_step.1.b": 3}, 1, None)
        >>> theta, overrides
        ({'w': 1}, [{'b': 2}, {'b': 3}])
    """
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


def at_step(overrides, k: int) -> dict[str, Tensor]:
    """The replacements at inner step ``k`` (``{}`` without per-step tensors).

    Example::

        >>> at_step(None, 3), at_step([{"b": 1}, {"b": 2}], 1)
        ({}, {'b': 2})
    """
    return overrides[k] if overrides else {}


def updates_running_stats(model: nn.Module) -> bool:
    """True when a forward pass of ``model`` updates batch-norm running statistics (training mode).

    Example::

        >>> updates_running_stats(nn.BatchNorm1d(2)), updates_running_stats(nn.BatchNorm1d(2).eval())
        (True, False)
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
               for m in model.modules())
