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

from .tasks.base import check_positive_int

__all__ = ["Params", "mlp", "init_params", "forward", "functional_model", "count_parameters"]

Params = dict[str, Tensor]


def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1, *,
        seed: int | None = None) -> nn.Sequential:
    """The MAML paper's regression network: ``in -> 40 -> ReLU -> 40 -> ReLU -> out`` by default.

    Input ``[..., in_features]``, output ``[..., out_features]``. ``seed`` makes the initialisation
    reproducible without touching the global RNG.
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
    """
    return {name: p.detach().to(device=device, dtype=dtype).clone().requires_grad_(p.requires_grad)
            for name, p in model.named_parameters()}


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Evaluate ``model`` at ``params`` (any subset of its parameter names; the rest come from the module)."""
    return functional_call(model, params, (x,))


def functional_model(model: nn.Module):
    """Return ``f(params, x)``: the model as a pure function of its parameters and input."""
    def f(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))
    f.__doc__ = f"{type(model).__name__} as a pure function f(params, x)."
    return f


def count_parameters(params: Params) -> int:
    """Total number of scalars in a parameter dict."""
    return sum(p.numel() for p in params.values())
