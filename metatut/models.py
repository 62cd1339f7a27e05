"""Models used in the course, and the bridge between an ``nn.Module`` and a dict of parameters.

A model is a module plus a dict of parameters; it is evaluated with
``torch.func.functional_call(module, params, (x,))`` so that the same module can run with the
meta-parameters theta or with any adapted parameters theta'. Any ``nn.Module`` works.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .validate import check_positive_int

__all__ = ["Params", "mlp", "init_params", "forward", "functional_model", "count_parameters"]

Params = dict[str, Tensor]


def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1, *,
        seed: int | None = None) -> nn.Sequential:
    """The MAML paper's regression network: ``in -> 40 -> ReLU -> 40 -> ReLU -> out`` by default.

    Input ``[..., in_features]``, output ``[..., out_features]``: for regression tasks, points
    ``[tasks, shots, 1]`` give predictions ``[tasks, shots, 1]``. ``seed`` makes the initialisation
    reproducible without touching the global RNG.

    Example::

        >>> model = mlp(seed=0)
        >>> x = torch.linspace(-5.0, 5.0, 4 * 10).reshape(4, 10, 1)  # [tasks, shots, 1]
        >>> model(x).shape                                            # [tasks, shots, 1]
        torch.Size([4, 10, 1])
        >>> torch.equal(mlp(seed=0)[0].weight, model[0].weight)      # same seed, same initialisation
        True
        >>> mlp(2, hidden=(8,), out_features=3)
        Sequential(
          (0): Linear(in_features=2, out_features=8, bias=True)
          (1): ReLU()
          (2): Linear(in_features=8, out_features=3, bias=True)
        )
    """
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    sizes = [in_features, *[check_positive_int("hidden width", h) for h in hidden], out_features]
    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    if seed is None:
        return build()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None (got {seed!r})")
    with torch.random.fork_rng(devices=[]):  # PyTorch's default initialisation, without touching the global RNG
        torch.manual_seed(seed)
        return build()


def init_params(model: nn.Module, *, device=None, dtype: torch.dtype | None = None) -> Params:
    """A fresh dict of trainable leaf tensors copied from ``model``'s parameters (name -> tensor).

    The copies require grad and share nothing with the module, so the module stays a stateless
    template. Use ``dict(model.named_parameters())`` instead if you want training to update the module.
    ``device`` and ``dtype`` move and cast the copies (e.g. ``dtype=torch.float64`` for gradient checks).

    Example::

        >>> model = mlp(hidden=(8,), seed=0)
        >>> params = init_params(model)
        >>> {name: tuple(p.shape) for name, p in params.items()}
        {'0.weight': (8, 1), '0.bias': (8,), '2.weight': (1, 8), '2.bias': (1,)}
        >>> params["0.weight"].requires_grad, params["0.weight"] is model[0].weight
        (True, False)
        >>> init_params(model, dtype=torch.float64)["2.bias"].dtype
        torch.float64
    """
    return {name: p.detach().to(device=device, dtype=dtype).clone().requires_grad_(p.requires_grad)
            for name, p in model.named_parameters()}


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Evaluate ``model`` at ``params`` (any subset of its parameter names; the rest come from the module).

    ``x`` is whatever the module takes (``[tasks, shots, 1]`` or ``[shots, 1]`` for :func:`mlp`); the
    output has the module's output shape.

    Example::

        >>> model = mlp(hidden=(8,), seed=0)
        >>> params = init_params(model)
        >>> x = torch.randn(5, 1)                                   # [shots, 1]
        >>> torch.equal(forward(model, params, x), model(x))      # same values as the module's own
        True
        >>> zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        >>> forward(model, zeros, x).flatten()                    # other parameters, same module
        tensor([0., 0., 0., 0., 0.])
        >>> forward(model, {"2.bias": torch.tensor([1.0])}, x).shape  # a subset: the rest from the module
        torch.Size([5, 1])
    """
    return functional_call(model, params, (x,))


def functional_model(model: nn.Module):
    """Return ``f(params, x)``: the model as a pure function of its parameters and input.

    ``f`` composes with ``torch.func`` transforms (``grad``, ``vmap``) over ``params`` or ``x``.

    Example::

        >>> model = mlp(hidden=(8,), seed=0)
        >>> f = functional_model(model)
        >>> params = init_params(model)
        >>> x = torch.randn(3, 5, 1)                    # [tasks, shots, 1]
        >>> f(params, x).shape                          # [tasks, shots, 1]
        torch.Size([3, 5, 1])
        >>> grads = torch.func.grad(lambda p: f(p, x).pow(2).mean())(params)
        >>> {name: tuple(g.shape) for name, g in grads.items()}
        {'0.weight': (8, 1), '0.bias': (8,), '2.weight': (1, 8), '2.bias': (1,)}
    """
    def f(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))
    f.__doc__ = f"{type(model).__name__} as a pure function f(params, x)."
    return f


def count_parameters(params: Params) -> int:
    """Total number of scalars in a parameter dict.

    Example::

        >>> count_parameters(init_params(mlp()))  # 1*40 + 40  +  40*40 + 40  +  40*1 + 1
        1761
        >>> count_parameters({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
        16
    """
    return sum(p.numel() for p in params.values())
