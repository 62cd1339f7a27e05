"""The MAML family's meta-parameters: the model's parameters, learned inner step sizes and per-step copies.

The recommended form is :class:`MetaParams`: a ``dict`` (so optimisers, :func:`metatut.meta_train` and
checkpoints see one flat dict of tensors) that keeps three kinds of tensors apart:

* ``meta_params.model``: the model's own parameters, under their own names (any name a module can have,
  including a submodule called ``per_step`` or ``inner_lr``);
* ``meta_params.inner_lrs``: learned inner step sizes ``{step or None: {name: tensor}}`` (Meta-SGD; MAML++'s
  per-step rates), used with ``inner_lr='learned'``; flat keys ``inner_lr:<name>`` and ``inner_lr:step<k>:<name>``;
* ``meta_params.per_step``: ``{k: {name: tensor}}``, the value of parameter ``name`` while the model is evaluated
  at inner step ``k`` (MAML++'s per-step batch-norm weights and biases); flat keys ``per_step:<k>:<name>``.

``nn.Module`` names cannot contain ``'.'`` but may contain ``':'``: :class:`MetaParams` refuses parameter names
with ``':'`` (its separator), and so does the engine for a model whose names contain it when the parameters use
the ``':'`` keys.

The legacy form, a plain dict with ``inner_lr.<name>``, ``inner_lr.step<k>.<name>`` and ``per_step.<k>.<name>``
keys (:func:`learned_inner_lrs` and :func:`per_step_params` still return these), keeps working: the engine reads
such a key as a step size or a per-step copy only when it is not one of the model's own parameter or buffer
names, so a submodule called ``per_step`` or ``inner_lr`` is the model's own. Without a model at hand (e.g.
:meth:`MetaParams.from_flat` without ``model=``), a legacy key is read as a step size or a copy when the name it
refers to is also a key of the dict.

Per-step buffers (not in the dict, passed as ``buffers=``): :func:`per_step_buffers`.
:func:`final_layer_names` (ANIL's head) and :func:`batch_norm_names` name the parameters the options select.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from ..models import Params
from ..validate import check_params, check_positive_int, check_step_size

__all__ = ["MetaParams", "SEPARATOR", "LEARNED_LR_PREFIX", "PER_STEP_PREFIX", "learned_inner_lrs",
           "split_learned_lrs", "resolve_inner_lr", "step_size", "final_layer_names", "batch_norm_names",
           "per_step_params", "per_step_buffers", "step_overrides", "at_step", "updates_running_stats",
           "classify_key", "model_names"]

#: The separator of :class:`MetaParams`' flat keys (``inner_lr:step0:0.weight``, ``per_step:1:bn.weight``);
#: a module may name a parameter with it, so :class:`MetaParams` refuses such names.
SEPARATOR = ":"

#: Legacy keys of learned inner step sizes inside a plain parameter dict: ``inner_lr.<name>`` (shared by all
#: inner steps) or ``inner_lr.step<k>.<name>`` (step ``k`` only, as in MAML++). Prefer :class:`MetaParams`.
LEARNED_LR_PREFIX = "inner_lr."

#: Legacy keys of per-step parameters inside a plain parameter dict: ``per_step.<k>.<name>`` is the value of
#: parameter ``name`` while the model is evaluated at inner step ``k``. Prefer :class:`MetaParams`.
PER_STEP_PREFIX = "per_step."

_MODEL, _LR, _PER_STEP = "model", "inner_lr", "per_step"
_LR_KEY, _PER_STEP_KEY = _LR + SEPARATOR, _PER_STEP + SEPARATOR
_FLAT_LR = re.compile(r"inner_lr:(?:step(\d+):)?(.+)", re.S)
_FLAT_PER_STEP = re.compile(r"per_step:(\d+):(.+)", re.S)
_LEGACY_STEP = re.compile(r"step(\d+)\.(.+)", re.S)
_LEGACY_PER_STEP = re.compile(r"per_step\.(\d+)\.(.+)", re.S)


# --------------------------------------------------------------------------------------------- keys
def _lr_key(name: str, step: int | None) -> str:
    return f"{_LR_KEY}{name}" if step is None else f"{_LR_KEY}step{step}{SEPARATOR}{name}"


def _legacy_lr_key(name: str, step: int | None) -> str:
    return f"{LEARNED_LR_PREFIX}{name}" if step is None else f"{LEARNED_LR_PREFIX}step{step}.{name}"


def _per_step_key(step: int, name: str) -> str:
    return f"{_PER_STEP_KEY}{step}{SEPARATOR}{name}"


def _structured(key: str):
    """``(kind, step, name)`` of a ``':'`` key, ``None`` for any other key; ``ValueError`` if malformed."""
    if key.startswith(_LR_KEY):
        match = _FLAT_LR.fullmatch(key)
        if not match:
            raise ValueError(f"malformed learned step size key {key!r}: expected 'inner_lr:<name>' or "
                             "'inner_lr:step<k>:<name>'")
        return _LR, None if match[1] is None else int(match[1]), match[2]
    if key.startswith(_PER_STEP_KEY):
        match = _FLAT_PER_STEP.fullmatch(key)
        if not match:
            raise ValueError(f"malformed per-step key {key!r}: expected 'per_step:<k>:<name>'")
        return _PER_STEP, int(match[1]), match[2]
    return None


def _legacy_readings(key: str) -> list[tuple[str, int | None, str]]:
    """The ways a legacy key can be read: ``inner_lr.step1.w`` is step 1's rate of ``w`` or the shared rate of
    a parameter ``step1.w``."""
    if key.startswith(LEARNED_LR_PREFIX):
        rest = key[len(LEARNED_LR_PREFIX):]
        match = _LEGACY_STEP.fullmatch(rest)
        return ([(_LR, int(match[1]), match[2])] if match else []) + ([(_LR, None, rest)] if rest else [])
    match = _LEGACY_PER_STEP.fullmatch(key)
    return [(_PER_STEP, int(match[1]), match[2])] if match else []


def classify_key(key: str, names=None, keys=None) -> tuple[str, int | None, str]:
    """What a key of a parameter dict holds: ``('model', None, name)``, ``('inner_lr', step or None, name)``
    (a learned step size of parameter ``name``) or ``('per_step', k, name)`` (parameter ``name`` at step ``k``).

    ``':'`` keys (:class:`MetaParams`) are unambiguous. A legacy key (``inner_lr.*``, ``per_step.<k>.*``) is
    the model's own when it is one of ``names`` (the model's parameter and buffer names); without ``names`` it
    is a step size or a copy when the name it refers to is in ``keys`` (the dict's keys); with neither, when it
    has the legacy form.

    Example::

        >>> classify_key("inner_lr:step1:0.weight"), classify_key("per_step:2:bn.bias")
        (('inner_lr', 1, '0.weight'), ('per_step', 2, 'bn.bias'))
        >>> classify_key("per_step.0.weight", names={"per_step.0.weight", "per_step.0.bias"})  # a submodule's
        ('model', None, 'per_step.0.weight')
        >>> classify_key("inner_lr.step0.w", names={"w"}), classify_key("inner_lr.w", keys={"w", "inner_lr.w"})
        (('inner_lr', 0, 'w'), ('inner_lr', None, 'w'))
    """
    if names is not None and key in names:
        return _MODEL, None, key
    parsed = _structured(key)
    if parsed is not None:
        return parsed
    readings = _legacy_readings(key)
    known = names if names is not None else keys
    if known is not None:
        fitting = [r for r in readings if r[2] in known]
        if fitting:
            return fitting[0]
        if names is None:
            return _MODEL, None, key
    return readings[0] if readings else (_MODEL, None, key)


def model_names(model: nn.Module) -> set[str]:
    """The names of ``model``'s parameters and buffers (what :func:`classify_key` calls ``names``).

    Example::

        >>> sorted(model_names(nn.BatchNorm1d(2)))
        ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    from ..validate import module_names

    return set(module_names(model)[1])


def _check_separator(names: Iterable[str], what: str) -> None:
    bad = sorted(n for n in names if SEPARATOR in n)
    if bad:
        raise ValueError(f"{what} {bad[:5]} contain {SEPARATOR!r}, the separator of metatut.MetaParams' keys "
                         f"(inner_lr{SEPARATOR}<name>, per_step{SEPARATOR}<k>{SEPARATOR}<name>); rename the submodules "
                         f"or parameters so that their names have no {SEPARATOR!r}")


#: Every key that is not a model tensor starts with one of these (structured or legacy form).
_SPECIAL_PREFIXES = (_LR_KEY, _PER_STEP_KEY, LEARNED_LR_PREFIX, PER_STEP_PREFIX)


def _split(params: Mapping, model: nn.Module | None):
    """``[(key, kind, step, name, value)]`` for every entry of ``params``, read with the model's names when given
    (:func:`classify_key`); without them, a :class:`MetaParams`' keys other than its ``':'`` keys are its model
    parameters (whatever they look like), and a plain dict's legacy keys are read as :func:`classify_key` says."""
    keys = params.keys()
    if not any(k.startswith(_SPECIAL_PREFIXES) for k in keys):  # the common case: only the model's own tensors
        return [(k, _MODEL, None, k, v) for k, v in params.items()]
    if model is None:
        if isinstance(params, MetaParams):
            return [(k, *(_structured(k) or (_MODEL, None, k)), v) for k, v in params.items()]
        return [(k, *classify_key(k, None, keys), v) for k, v in params.items()]
    names = model_names(model)
    if any(k.startswith((_LR_KEY, _PER_STEP_KEY)) for k in keys):
        _check_separator(names, "the model's parameter or buffer names")
    return [(k, *classify_key(k, names), v) for k, v in params.items()]


# ----------------------------------------------------------------------------------------- MetaParams
def _nested(mapping: Mapping) -> bool:
    return bool(mapping) and all(k is None or (isinstance(k, int) and not isinstance(k, bool)) for k in mapping)


class MetaParams(dict):
    """Meta-parameters: the model's parameters, learned inner step sizes and per-step copies, kept apart.

    A ``dict`` of flat keys to tensors, so that ``torch.optim.Adam(meta_params.values())``,
    :func:`metatut.meta_train`, :func:`metatut.save_checkpoint` and every function that takes ``params`` use it
    as they use :func:`metatut.init_params`' dict. The flat keys are the model's own parameter names,
    ``inner_lr:<name>`` (a rate shared by all inner steps), ``inner_lr:step<k>:<name>`` (step ``k``'s rate) and
    ``per_step:<k>:<name>`` (parameter ``name`` at inner step ``k``); ``':'`` never occurs in the model's names,
    so a submodule named ``per_step`` or ``inner_lr`` is just a submodule. The structure:

    * :attr:`model`: ``{name: tensor}``, the model's parameters (theta);
    * :attr:`inner_lrs`: ``{step or None: {name: tensor}}``, learned step sizes (``None``: shared by all steps);
    * :attr:`per_step`: ``{k: {name: tensor}}``, MAML++'s per-step copies (they replace ``model[name]`` at step
      ``k`` everywhere, are meta-learned, and are not adapted in the inner loop).

    ``inner_lrs`` and ``per_step`` take that nested form, or the flat dicts :func:`learned_inner_lrs` and
    :func:`per_step_params` return; :meth:`with_learned_lrs` and :meth:`with_per_step` build them.
    :meth:`from_flat` rebuilds the structure from a flat dict (this form, or the legacy ``inner_lr.*`` /
    ``per_step.*`` keys). The tensors are the caller's, not copies. Use ``inner_lr='learned'`` to adapt with the
    learned step sizes.

    Example::

        >>> import torch, metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> meta = mt.MetaParams(mt.init_params(model)).with_learned_lrs(init=0.01, granularity="tensor", steps=2)
        >>> list(meta)[:5]
        ['0.weight', '0.bias', '2.weight', '2.bias', 'inner_lr:step0:0.weight']
        >>> sorted(meta.inner_lrs), sorted(meta.inner_lrs[1]) == sorted(meta.model)
        ([0, 1], True)
        >>> optimizer = torch.optim.Adam(meta.values(), lr=1e-3)     # one flat list of tensors
        >>> batch = mt.SinusoidTasks().sample(3, 5, generator=mt.make_generator(0))
        >>> mt.maml_loss(model, meta, batch, inner_lr="learned", inner_steps=2).shape
        torch.Size([])
        >>> mt.MetaParams.from_flat(dict(meta)) == meta                # flat view -> structure
        True
    """

    def __init__(self, model: Mapping[str, Tensor], *, inner_lrs: Mapping | None = None,
                 per_step: Mapping | None = None):
        super().__init__()
        if isinstance(model, MetaParams):
            if len(model.model) != len(model):
                raise TypeError("MetaParams(meta_params, ...) takes the model's parameters only: pass "
                                "meta_params.model, or add to meta_params with with_learned_lrs/with_per_step")
            model = model.model
        if not isinstance(model, Mapping):
            raise TypeError(f"MetaParams needs the model's parameters as a dict name -> tensor "
                            f"(got {type(model).__name__})")
        theta = dict(model)
        bad = [k for k in theta if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"parameter names must be non-empty strings (got {bad[:5]})")
        _check_separator(theta, "parameter names")
        self.update(theta)
        for step, name, value in self._pieces(inner_lrs, theta, _LR):
            self[_lr_key(name, step)] = value
        for step, name, value in self._pieces(per_step, theta, _PER_STEP):
            self[_per_step_key(step, name)] = value

    @staticmethod
    def _pieces(pieces: Mapping | None, theta: dict, kind: str):
        """``[(step, name, tensor)]`` of ``inner_lrs`` or ``per_step`` in any of their accepted forms."""
        if pieces is None:
            return []
        if not isinstance(pieces, Mapping):
            raise TypeError(f"{kind} must be a dict (got {type(pieces).__name__})")
        if _nested(pieces):
            out = [(step, name, value) for step, group in pieces.items() for name, value in dict(group).items()]
            if kind == _PER_STEP and any(step is None or step < 0 for step, _, _ in out):
                raise ValueError("per_step must map inner steps 0, 1, ... to dicts name -> tensor")
        else:
            out = []
            for key, value in pieces.items():
                readings = [r for r in ([_structured(key)] if _structured(key) else _legacy_readings(key))
                            if r[0] == kind and r[2] in theta]
                if readings:
                    out.append((readings[0][1], readings[0][2], value))
                elif kind == _LR and key in theta:
                    out.append((None, key, value))
                else:
                    raise ValueError(f"{kind} key {key!r} names none of the parameters")
        unknown = sorted({name for _, name, _ in out if name not in theta})
        if unknown:
            raise ValueError(f"{kind} names parameters that are not in the model's parameters: {unknown[:5]}")
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Tensor], *, model: nn.Module | None = None) -> MetaParams:
        """The :class:`MetaParams` of a flat dict: its own flat view, or a legacy dict with ``inner_lr.*`` and
        ``per_step.<k>.*`` keys. Pass ``model=`` to read legacy keys exactly (a key that is one of the model's
        parameter or buffer names is the model's own); without it a legacy key is a step size or a copy when the
        parameter it refers to is also in ``flat`` (for a :class:`MetaParams`, only its ``':'`` keys are).
        Keeps the order of ``flat`` (an optimiser's state, which is by position, still fits) and its tensors.

        Example::

            >>> import torch
            >>> legacy = {"w": torch.zeros(2), "inner_lr.w": torch.ones(2), "per_step.0.w": torch.zeros(2)}
            >>> meta = MetaParams.from_flat(legacy)
            >>> list(meta), meta.inner_lrs[None]["w"] is legacy["inner_lr.w"]
            (['w', 'inner_lr:w', 'per_step:0:w'], True)
        """
        if not isinstance(flat, Mapping):
            raise TypeError(f"from_flat needs a dict of flat keys -> tensors (got {type(flat).__name__})")
        entries = _split(flat, model)
        if any(kind != _MODEL for _, kind, _, _, _ in entries):
            _check_separator([k for k, kind, _, _, _ in entries if kind == _MODEL], "parameter names")
        out = cls.__new__(cls)
        for key, kind, step, name, value in entries:
            flat_key = key if kind == _MODEL else _lr_key(name, step) if kind == _LR else _per_step_key(step, name)
            if flat_key in out:
                raise ValueError(f"{key!r} and another key both hold {flat_key!r}")
            dict.__setitem__(out, flat_key, value)
        return out

    def _entries(self):
        return _split(self, None)

    @property
    def model(self) -> dict[str, Tensor]:
        """The model's parameters ``{name: tensor}`` (theta)."""
        return {k: v for k, kind, _, _, v in self._entries() if kind == _MODEL}

    @property
    def inner_lrs(self) -> dict[int | None, dict[str, Tensor]]:
        """Learned inner step sizes ``{step or None: {name: tensor}}`` (``None``: shared by all inner steps)."""
        out: dict = {}
        for _, kind, step, name, value in self._entries():
            if kind == _LR:
                out.setdefault(step, {})[name] = value
        return out

    @property
    def per_step(self) -> dict[int, dict[str, Tensor]]:
        """MAML++'s per-step copies ``{k: {name: tensor}}``."""
        out: dict = {}
        for _, kind, step, name, value in self._entries():
            if kind == _PER_STEP:
                out.setdefault(step, {})[name] = value
        return out

    def with_learned_lrs(self, *, init: float = 0.01, granularity: str = "parameter", steps: int | None = None,
                         names=None) -> MetaParams:
        """A new :class:`MetaParams` (same tensors) with learned step sizes added (:func:`learned_inner_lrs`'s
        options; ``names``: only these parameters, the others are not adapted with ``inner_lr='learned'``).

        Example::

            >>> import torch
            >>> meta = MetaParams({"w": torch.zeros(2, 3)}).with_learned_lrs(granularity="tensor")
            >>> list(meta), meta["inner_lr:w"].shape
            (['w', 'inner_lr:w'], torch.Size([]))
        """
        theta = self.model
        chosen = theta if names is None else {n: theta[n] for n in _known(names, theta, "names")}
        lrs = learned_inner_lrs(chosen, init=init, granularity=granularity, steps=steps)
        return self._extended(inner_lrs=lrs)

    def with_per_step(self, names, steps: int) -> MetaParams:
        """A new :class:`MetaParams` (same tensors) with per-step copies of parameters ``names`` for inner
        steps ``0..steps`` (:func:`per_step_params`).

        Example::

            >>> import torch
            >>> list(MetaParams({"w": torch.zeros(2), "b": torch.zeros(2)}).with_per_step(["b"], steps=1))
            ['w', 'b', 'per_step:0:b', 'per_step:1:b']
        """
        return self._extended(per_step=per_step_params(self.model, names, steps))

    def _extended(self, **pieces) -> MetaParams:
        out = MetaParams.from_flat(self)
        added = MetaParams(self.model, **pieces)
        for key, value in added.items():
            if key not in out:
                dict.__setitem__(out, key, value)
            elif key not in self.model:
                raise ValueError(f"{key!r} is already in these meta-parameters")
        return out

    def __repr__(self) -> str:
        lrs, copies = self.inner_lrs, self.per_step
        parts = [f"model={len(self.model)} tensors"]
        if lrs:
            parts.append("inner_lrs={" + ", ".join(f"{k}: {len(v)}" for k, v in lrs.items()) + "}")
        if copies:
            parts.append("per_step={" + ", ".join(f"{k}: {len(v)}" for k, v in copies.items()) + "}")
        return f"MetaParams({', '.join(parts)})"


def _known(names, params: Mapping, what: str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"{what} must be a non-empty subset of the parameter names (unknown: {unknown})")
    return names


# --------------------------------------------------------------------------------- learned step sizes
def learned_inner_lrs(params: Params, *, init: float = 0.01, granularity: str = "parameter",
                      steps: int | None = None) -> Params:
    """Learnable inner step sizes for ``params``, to be meta-learned together with them.

    ``granularity='parameter'``: one step size per scalar parameter (Meta-SGD, Li et al. 2017);
    ``granularity='tensor'``: one per parameter tensor (per layer). ``steps=k`` gives each of ``k``
    inner steps its own step sizes (MAML++'s per-layer per-step rates, Antoniou et al. 2019).
    Returns the legacy flat dict ``{'inner_lr.<name>' or 'inner_lr.step<k>.<name>': tensor}`` (shape of the
    parameter, or ``[]``): pass it as ``MetaParams(params, inner_lrs=...)`` (recommended; or use
    :meth:`MetaParams.with_learned_lrs`), or merge it into the parameter dict (``{**params, **lrs}``), and use
    ``inner_lr='learned'``. For a :class:`MetaParams`, the step sizes are those of its model parameters.

    Example::

        >>> import torch
        >>> lrs = learned_inner_lrs({"w": torch.zeros(2, 3)}, granularity="tensor", steps=2)
        >>> sorted(lrs), lrs["inner_lr.step0.w"].shape
        (['inner_lr.step0.w', 'inner_lr.step1.w'], torch.Size([]))
        >>> sorted(MetaParams({"w": torch.zeros(2, 3)}, inner_lrs=lrs))
        ['inner_lr:step0:w', 'inner_lr:step1:w', 'w']
    """
    if isinstance(params, MetaParams):
        params = params.model
    check_params(params)
    init = check_step_size("init", init)
    if granularity not in ("parameter", "tensor"):
        raise ValueError(f"granularity must be 'parameter' or 'tensor' (got {granularity!r})")
    step_list = [None] if steps is None else list(range(check_positive_int("steps", steps)))
    out = {}
    for step in step_list:
        for name, p in params.items():
            shape = p.shape if granularity == "parameter" else ()
            out[_legacy_lr_key(name, step)] = p.new_full(shape, init).requires_grad_(True)
    return out


def split_learned_lrs(params: Params, *, model: nn.Module | None = None) -> tuple[Params, Params]:
    """Split a parameter dict into ``(everything else, learned inner step sizes)``, each keyed as in ``params``.

    Pass ``model=`` to read legacy ``inner_lr.*`` keys exactly (:func:`classify_key`).

    Example::

        >>> theta, lrs = split_learned_lrs({"w": 1, "inner_lr.w": 0.1})
        >>> theta, lrs
        ({'w': 1}, {'inner_lr.w': 0.1})
        >>> split_learned_lrs({"w": 1, "inner_lr:step0:w": 0.1})
        ({'w': 1}, {'inner_lr:step0:w': 0.1})
    """
    entries = _split(params, model)
    theta = {k: v for k, kind, _, _, v in entries if kind != _LR}
    lrs = {k: v for k, kind, _, _, v in entries if kind == _LR}
    return theta, lrs


def resolve_inner_lr(inner_lr, params: Params, *, model: nn.Module | None = None):
    """Return ``(theta, rates)``: ``params`` without learned step sizes, and the step sizes, either one float or a
    dict keyed ``inner_lr.<name>`` / ``inner_lr.step<k>.<name>`` (what :func:`step_size` reads). ``inner_lr`` is
    a number, ``'learned'`` (the step sizes in ``params``: :class:`MetaParams` or legacy keys) or a dict of step
    sizes by parameter name. Pass ``model=`` to read legacy keys exactly (:func:`classify_key`).

    Example::

        >>> resolve_inner_lr(0.1, {"w": 1})
        ({'w': 1}, 0.1)
        >>> resolve_inner_lr({"w": 0.5}, {"w": 1})
        ({'w': 1}, {'inner_lr.w': 0.5})
        >>> resolve_inner_lr("learned", {"w": 1, "inner_lr:step0:w": 0.5})
        ({'w': 1}, {'inner_lr.step0.w': 0.5})
    """
    entries = _split(params, model)
    theta = {k: v for k, kind, _, _, v in entries if kind != _LR}
    if isinstance(inner_lr, str):
        if inner_lr != "learned":
            raise ValueError(f"inner_lr must be a number >= 0, a dict of tensors or 'learned' (got {inner_lr!r})")
        rates = {_legacy_lr_key(name, step): v for _, kind, step, name, v in entries if kind == _LR}
        if not rates:
            raise ValueError("inner_lr='learned' needs learned step sizes in params: "
                             "params = metatut.MetaParams(params).with_learned_lrs() "
                             "(or {**params, **metatut.learned_inner_lrs(params)})")
        return theta, rates
    if isinstance(inner_lr, dict):
        names = model_names(model) if model is not None else set(theta)
        rates = {}
        for key, value in inner_lr.items():
            kind, step, name = classify_key(key, names)
            rates[_legacy_lr_key(name, step) if kind == _LR else _legacy_lr_key(key, None)] = value
        return theta, rates
    return theta, check_step_size("inner_lr", inner_lr)


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
    for key in (_legacy_lr_key(name, step), _legacy_lr_key(name, None)):
        if key in rates:
            return rates[key]
    raise KeyError(f"no inner step size for parameter {name!r} at inner step {step} (give it one: "
                   f"{_lr_key(name, None)!r} or {_lr_key(name, step)!r} in MetaParams, or {name!r} in an inner_lr "
                   "dict)")


# ------------------------------------------------------------------------------- layers and per-step copies
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
    2019, sec. 4). Returns the legacy flat dict ``{'per_step.<k>.<name>': tensor}``: pass it as
    ``MetaParams(params, per_step=...)`` (recommended; or use :meth:`MetaParams.with_per_step`), or merge it
    into the parameter dict. The copies replace ``params[name]`` everywhere in :func:`metatut.maml_loss`, are
    meta-learned, and are not adapted in the inner loop.

    Example::

        >>> import torch
        >>> sorted(per_step_params({"b": torch.zeros(3)}, ["b"], steps=1))
        ['per_step.0.b', 'per_step.1.b']
    """
    if isinstance(params, MetaParams):
        params = params.model
    check_params(params)
    check_positive_int("steps", steps, minimum=0)
    names = _known(names, params, "names")
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


def step_overrides(theta: Params, steps: int, buffers, *, model: nn.Module | None = None
                   ) -> tuple[Params, list[Params] | None]:
    """Split per-step parameters off ``theta`` and combine them with per-step ``buffers`` into one dict of
    replacements for each of the evaluations at inner steps ``0..steps``: ``(theta, overrides or None)``.
    Pass ``model=`` to read legacy ``per_step.*`` keys exactly (:func:`classify_key`).

    Example::

        >>> theta, overrides = step_overrides({"w": 1, "b": 0, "per_step.0.b": 2, "per_step.1.b": 3}, 1, None)
        >>> theta, overrides
        ({'w': 1}, [{'b': 2}, {'b': 3}])
        >>> step_overrides({"w": 1, "b": 0, "per_step:0:b": 2}, 0, None)
        ({'w': 1}, [{'b': 2}])
    """
    entries = [e for e in _split(theta, model) if e[1] == _PER_STEP]
    if not entries and not buffers:
        return theta, None
    overrides: list[Params] = [{} for _ in range(steps + 1)]
    replaced = set()
    for key, _, index, name, value in entries:
        if index > steps:
            raise ValueError(f"per-step parameter {key!r} does not name an inner step in 0..{steps}")
        overrides[index][name] = value
        replaced.add(name)
    for k in range(steps + 1):
        missing = replaced - set(overrides[k])
        if missing:
            raise ValueError(f"per-step parameters for inner step {k} are missing: {sorted(missing)} "
                             f"(make them with MetaParams(params).with_per_step(names, steps={steps}))")
    if buffers:
        if not isinstance(buffers, dict) or set(buffers) != set(range(steps + 1)):
            raise ValueError(f"buffers must map each inner step 0..{steps} to a dict of tensors "
                             "(metatut.per_step_buffers(model, steps))")
        for k in range(steps + 1):
            overrides[k].update(buffers[k])
    per_step = {key for key, *_ in entries}
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
