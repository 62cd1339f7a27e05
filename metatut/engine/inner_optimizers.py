r"""Pluggable inner optimisers: the update rule of MAML's inner loop, differentiable end to end.

An inner optimiser is an object with two methods (:class:`InnerOptimizer`):

* ``init(params) -> state``: the optimiser state for the parameters being adapted (a pytree of tensors);
* ``update(grads, state, params, step) -> (new_params, new_state)``: one step, built from out-of-place tensor
  operations only, so that the meta-gradient flows through it (second order) and it runs under ``torch.func.vmap``
  (where the state is per task: it lives inside the vmapped function).

``params`` and ``grads`` are dicts ``{name: tensor}`` of the adapted parameters (the parameters' shapes); ``step``
is the inner step ``0, 1, ...``. :func:`sgd` (the default; ``inner_lr=`` is its shorthand), :func:`sgd_momentum`
and :func:`adam` are built in; a TorchOpt ``GradientTransformation`` (e.g. ``torchopt.adam(0.1)``) is accepted
through an adapter (:func:`as_inner_optimizer`; TorchOpt is optional and imported only when used).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ..models import Params
from ..validate import check_step_size
from .conventions import resolve_inner_lr, step_size

__all__ = ["InnerOptimizer", "SGD", "SGDMomentum", "Adam", "sgd", "sgd_momentum", "adam", "as_inner_optimizer",
           "TorchOptAdapter", "resolve_optimizer", "inner_sgd", "inner_sgd_momentum", "inner_adam"]


def _rates(lr, name: str = "lr"):
    """A number (checked) or a dict of per-tensor rates keyed as :func:`step_size` reads them."""
    if isinstance(lr, dict):
        return resolve_inner_lr(lr, {})[1]
    return check_step_size(name, lr)


class InnerOptimizer:
    """The inner-optimiser protocol (subclass it, or give any object these two methods).

    ``init(params) -> state`` and ``update(grads, state, params, step) -> (new_params, new_state)``, both on dicts
    ``{name: tensor}`` of the adapted parameters; ``update`` must be differentiable (out-of-place tensor ops).
    ``resolve(params) -> (theta, optimizer)`` (optional) lets an optimiser read meta-learned values from the full
    parameter dict before the inner loop starts (:func:`sgd` with ``lr='learned'`` takes the ``inner_lr.*``
    step sizes there); the default removes those keys from the parameters.

    Example::

        >>> class HalfStep(InnerOptimizer):
        ...     def init(self, params):
        ...         return ()
        ...     def update(self, grads, state, params, step):
        ...         return {n: p - 0.5 * grads[n] for n, p in params.items()}, state
        >>> opt = HalfStep()
        >>> opt.update({"w": torch.ones(2)}, opt.init({}), {"w": torch.zeros(2)}, 0)[0]["w"]
        tensor([-0.5000, -0.5000])
    """

    def init(self, params: Params) -> Any:
        raise NotImplementedError

    def update(self, grads: Params, state: Any, params: Params, step: int) -> tuple[Params, Any]:
        raise NotImplementedError

    def resolve(self, params: Params) -> tuple[Params, InnerOptimizer]:
        """``(theta, optimizer)``: the model's parameters (learned step sizes removed) and the optimiser to run."""
        from .conventions import split_learned_lrs

        return split_learned_lrs(params)[0], self


class SGD(InnerOptimizer):
    r""":math:`\theta_{k+1} = \theta_k - \alpha \nabla L_S(\theta_k)`; ``lr`` a number, a dict of per-tensor (or
    parameter-shaped) rates, or ``'learned'`` (Meta-SGD/MAML++: the ``inner_lr.*`` tensors of the parameter dict,
    :func:`metatut.learned_inner_lrs`). Stateless. Made by :func:`sgd`.

    Example::

        >>> opt = SGD(0.1)
        >>> opt.update({"w": torch.ones(1)}, opt.init({}), {"w": torch.zeros(1)}, 0)[0]
        {'w': tensor([-0.1000])}
    """

    def __init__(self, lr=0.01, *, name: str = "lr"):
        if isinstance(lr, str) and lr != "learned":
            raise ValueError(f"{name} must be a number >= 0, a dict of step sizes or 'learned' (got {lr!r})")
        self.lr = lr
        self._rates = lr if isinstance(lr, str) else _rates(lr, name)

    def resolve(self, params: Params) -> tuple[Params, SGD]:
        theta, rates = resolve_inner_lr(self.lr, params) if isinstance(self.lr, str) else (
            InnerOptimizer.resolve(self, params)[0], self._rates)
        bound = SGD.__new__(SGD)
        bound.lr, bound._rates = self.lr, rates
        return theta, bound

    def init(self, params: Params) -> tuple:
        return ()

    def update(self, grads: Params, state, params: Params, step: int) -> tuple[Params, tuple]:
        if isinstance(self._rates, str):
            raise ValueError("sgd(lr='learned') reads its step sizes from the parameter dict: call resolve(params) "
                             "first (the engine does)")
        return {n: p - step_size(self._rates, n, step) * grads[n] for n, p in params.items()}, state

    def __repr__(self) -> str:
        return f"sgd(lr={self.lr!r})"


class SGDMomentum(InnerOptimizer):
    r"""SGD with heavy-ball momentum, PyTorch's convention (no dampening): :math:`b_{k+1} = \mu b_k + g_k`,
    :math:`\theta_{k+1} = \theta_k - \alpha b_{k+1}` (Nesterov: :math:`\theta_k - \alpha (g_k + \mu b_{k+1})`).
    State: ``{name: b}``, zeros at the start of each task. Made by :func:`sgd_momentum`.

    Example::

        >>> opt = SGDMomentum(0.1, momentum=0.9)
        >>> p, s = opt.update({"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)}), {"w": torch.zeros(1)}, 0)
        >>> opt.update({"w": torch.ones(1)}, s, p, 1)[0]["w"]
        tensor([-0.2900])
    """

    def __init__(self, lr, momentum: float = 0.9, nesterov: bool = False):
        self.lr, self._rates = lr, _rates(lr)
        self.momentum = check_step_size("momentum", momentum)
        self.nesterov = bool(nesterov)

    def init(self, params: Params) -> Params:
        return {n: torch.zeros_like(p) for n, p in params.items()}

    def update(self, grads: Params, state: Params, params: Params, step: int) -> tuple[Params, Params]:
        buf = {n: self.momentum * state[n] + grads[n] for n in params}
        direction = {n: grads[n] + self.momentum * buf[n] for n in params} if self.nesterov else buf
        return {n: p - step_size(self._rates, n, step) * direction[n] for n, p in params.items()}, buf

    def __repr__(self) -> str:
        return f"sgd_momentum(lr={self.lr!r}, momentum={self.momentum}, nesterov={self.nesterov})"


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` with derivative 0 where ``v == 0`` (a gradient element that is exactly zero would otherwise
    give ``inf * 0 = nan`` in the second-order meta-gradient)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class Adam(InnerOptimizer):
    r"""Adam (Kingma & Ba 2015) with bias correction: :math:`m_{k+1} = \beta_1 m_k + (1-\beta_1) g_k`,
    :math:`v_{k+1} = \beta_2 v_k + (1-\beta_2) g_k^2`, :math:`\theta_{k+1} = \theta_k - \alpha\,\hat m /
    (\sqrt{\hat v} + \epsilon)` with :math:`\hat m = m_{k+1}/(1-\beta_1^{k+1})`, :math:`\hat v = v_{k+1}/
    (1-\beta_2^{k+1})`. State: ``{'m': {...}, 'v': {...}}``, zeros at the start of each task. Made by :func:`adam`.

    Example::

        >>> opt = Adam(0.1)
        >>> opt.update({"w": torch.tensor([2.0])}, opt.init({"w": torch.zeros(1)}), {"w": torch.zeros(1)}, 0)[0]
        {'w': tensor([-0.1000])}
    """

    def __init__(self, lr, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self._rates = lr, _rates(lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1) (got {betas!r})")
        self.betas = (float(b1), float(b2))
        self.eps = check_step_size("eps", eps)

    def init(self, params: Params) -> dict[str, Params]:
        return {"m": {n: torch.zeros_like(p) for n, p in params.items()},
                "v": {n: torch.zeros_like(p) for n, p in params.items()}}

    def update(self, grads: Params, state, params: Params, step: int):
        b1, b2 = self.betas
        m = {n: b1 * state["m"][n] + (1 - b1) * grads[n] for n in params}
        v = {n: b2 * state["v"][n] + (1 - b2) * grads[n] * grads[n] for n in params}
        c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
        new = {n: p - step_size(self._rates, n, step) * (m[n] / c1) / (_safe_sqrt(v[n] / c2) + self.eps)
               for n, p in params.items()}
        return new, {"m": m, "v": v}

    def __repr__(self) -> str:
        return f"adam(lr={self.lr!r}, betas={self.betas}, eps={self.eps})"


def sgd(lr=0.01) -> SGD:
    """Plain SGD for the inner loop (the default; ``inner_lr=x`` means ``inner_optimizer=sgd(x)``).

    ``lr``: a number >= 0; a dict ``{name: step size}`` (scalar or parameter-shaped); or ``'learned'`` to read
    the step sizes from the parameter dict (Meta-SGD; :func:`metatut.learned_inner_lrs`).

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> params = mt.init_params(model)
        >>> a = mt.maml_loss(model, params, batch, inner_optimizer=sgd(0.01))
        >>> torch.equal(a, mt.maml_loss(model, params, batch, inner_lr=0.01))
        True
    """
    return SGD(lr)


def sgd_momentum(lr, momentum: float = 0.9, nesterov: bool = False) -> SGDMomentum:
    """SGD with momentum for the inner loop (:class:`SGDMomentum`); ``lr`` a number or a dict of per-tensor rates.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> mt.maml_loss(model, mt.init_params(model), batch, inner_steps=3,
        ...              inner_optimizer=sgd_momentum(0.01, momentum=0.9)).shape
        torch.Size([])
    """
    return SGDMomentum(lr, momentum, nesterov)


def adam(lr, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Adam:
    """Adam for the inner loop (:class:`Adam`); ``lr`` a number or a dict of per-tensor rates.

    Example::

        >>> import metatut as mt
        >>> model = mt.mlp(hidden=(8,), seed=0)
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> mt.maml_loss(model, mt.init_params(model), batch, inner_steps=2, inner_optimizer=adam(0.01)).shape
        torch.Size([])
    """
    return Adam(lr, betas, eps)


class TorchOptAdapter(InnerOptimizer):
    """A TorchOpt ``GradientTransformation`` (``init(params)``, ``update(updates, state, *, params, inplace)``)
    as an inner optimiser: ``update`` runs with ``inplace=False`` and the updates are added to the parameters
    (``torchopt.apply_updates(..., inplace=False)`` when TorchOpt is installed). Made by :func:`as_inner_optimizer`.

    Example::

        >>> from typing import NamedTuple
        >>> class Halve(NamedTuple):      # a GradientTransformation-like pair of functions
        ...     init: object
        ...     update: object
        >>> tx = Halve(lambda p: (), lambda g, s, *, params=None, inplace=True: ({n: -0.5 * v for n, v in g.items()}, s))
        >>> opt = TorchOptAdapter(tx)
        >>> opt.update({"w": torch.ones(1)}, opt.init({}), {"w": torch.zeros(1)}, 0)[0]
        {'w': tensor([-0.5000])}
    """

    def __init__(self, transformation):
        self.transformation = transformation

    def init(self, params: Params):
        return self.transformation.init(params)

    def update(self, grads: Params, state, params: Params, step: int):
        updates, state = self.transformation.update(grads, state, params=params, inplace=False)
        try:
            import torchopt
        except ImportError:
            return {n: p + updates[n] for n, p in params.items()}, state
        return dict(torchopt.apply_updates(params, updates, inplace=False)), state

    def __repr__(self) -> str:
        return f"TorchOptAdapter({self.transformation!r})"


def _is_gradient_transformation(obj) -> bool:
    if type(obj).__module__.split(".")[0] == "torchopt":
        return True
    try:
        return "inplace" in inspect.signature(obj.update).parameters
    except (TypeError, ValueError):
        return False


def as_inner_optimizer(obj=None, *, inner_lr=None) -> InnerOptimizer:
    """The inner optimiser for ``obj``: an :class:`InnerOptimizer` as it is, a TorchOpt ``GradientTransformation``
    (or any object with ``init`` and an ``update(..., inplace=...)``) wrapped in :class:`TorchOptAdapter`, any other
    object with ``init`` and ``update(grads, state, params, step)`` as it is; None: ``sgd(inner_lr)``.

    Example::

        >>> as_inner_optimizer(inner_lr=0.1)
        sgd(lr=0.1)
        >>> as_inner_optimizer("adam")
        Traceback (most recent call last):
        ...
        TypeError: inner_optimizer must have init(params) and update(grads, state, params, step) ...
    """
    if obj is None:
        if inner_lr is None:
            raise TypeError("the inner loop needs inner_lr (a number >= 0, a dict of step sizes or 'learned') or "
                            "inner_optimizer (e.g. metatut.inner_adam(lr=0.01))")
        return SGD(inner_lr, name="inner_lr")
    if inner_lr is not None:
        raise TypeError("pass inner_lr or inner_optimizer, not both (inner_lr=x is inner_optimizer=metatut.inner_sgd(x))")
    if isinstance(obj, InnerOptimizer):
        return obj
    if not (callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))):
        raise TypeError("inner_optimizer must have init(params) and update(grads, state, params, step) (e.g. "
                        f"metatut.inner_adam(lr=0.01), or a torchopt GradientTransformation) (got {obj!r})")
    return TorchOptAdapter(obj) if _is_gradient_transformation(obj) else obj


def resolve_optimizer(optimizer, params: Params) -> tuple[Params, Any]:
    """``(theta, optimizer)``: ``optimizer.resolve(params)`` where it has one, else the parameters without learned
    step sizes (``inner_lr.*``) and the optimiser as it is.

    Example::

        >>> theta, opt = resolve_optimizer(sgd("learned"), {"w": torch.zeros(1), "inner_lr.w": torch.ones(1)})
        >>> list(theta), opt.update({"w": torch.ones(1)}, (), theta, 0)[0]
        (['w'], {'w': tensor([-1.])})
    """
    resolve = getattr(optimizer, "resolve", None)
    if callable(resolve):
        return resolve(params)
    return InnerOptimizer.resolve(optimizer, params)


#: The names :mod:`metatut` exports them under (next to ``torch.optim``'s, they say what they are for).
inner_sgd, inner_sgd_momentum, inner_adam = sgd, sgd_momentum, adam
