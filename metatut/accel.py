"""Speed switches for meta-training: mixed precision, ``torch.compile``, and the device fallback.

Each switch is a named option (``precision``, ``compile``) that :mod:`metatut.cli` records in a run's
``config.json``; both are off by default.

* ``precision='bfloat16'``: the meta-loss is computed under ``torch.autocast`` in bfloat16 (matrix
  multiplications and convolutions in bf16; parameters, gradients and the meta-optimiser stay float32).
  On a CPU this pays only where the cores have bf16 units (AVX512-BF16 or AMX); :func:`bf16_supported`
  tells. The price is precision: ``bench/RESULTS.md`` gives the meta-gradient's relative error.
* ``compile=True``: ``torch.compile`` of the meta-loss. It works where the second derivative is taken
  *inside* the compiled graph (the vmap path, both orders) and for first-order MAML; the per-task loop
  in second order would need double backward through compiled code, which ``torch.compile`` does not
  support: :func:`compile_objective` says so instead of failing mid-run.
* Apple MPS: where the MPS backend lacks double backward for an operation of the model,
  :func:`maml_device` falls back to the CPU with a warning that names the reason.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .device import pick_device

__all__ = ["PRECISIONS", "check_precision", "bf16_supported", "autocast", "supports_double_backward",
           "maml_device", "compile_objective"]

PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise a ``ValueError`` naming them.

    Example::

        >>> check_precision("bfloat16")
        'bfloat16'
        >>> check_precision("fp16")
        Traceback (most recent call last):
        ...
        ValueError: precision must be one of ('float32', 'bfloat16') (got 'fp16')
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    return precision


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """True when ``device`` computes bfloat16 matrix products natively (CUDA compute >= 8.0; CPU with
    AVX512-BF16 or AMX as oneDNN reports; MPS: assumed, as on macOS 14 and later).

    Example::

        >>> isinstance(bf16_supported("cpu"), bool)
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return device.type == "mps"


def autocast(device: str | torch.device, precision: str = "float32"):
    """A context manager for the forward pass (inner loop included) at ``precision``.

    ``'float32'`` does nothing; ``'bfloat16'`` is ``torch.autocast(device.type, dtype=torch.bfloat16)``.
    Call ``backward`` (or the optimiser) outside the context, as PyTorch recommends.

    Example::

        >>> a = torch.ones(2, 2)
        >>> with autocast("cpu", "float32"):
        ...     (a @ a).dtype
        torch.float32
        >>> with autocast("cpu", "bfloat16"):
        ...     (a @ a).dtype
        torch.bfloat16
    """
    check_precision(precision)
    if precision == "float32":
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16)


_DOUBLE_BACKWARD: dict[str, bool | str] = {}


def supports_double_backward(device: str | torch.device) -> bool | str:
    """True when conv -> batch norm -> max-pool -> linear can be differentiated twice on ``device``.

    Runs a tiny probe once per device type and caches the answer; returns the error message
    (a str, which is falsy only when empty) when it fails, so callers can say why.

    Example::

        >>> supports_double_backward("cpu")
        True
    """
    device = torch.device(device)
    if device.type not in _DOUBLE_BACKWARD:
        try:
            x = torch.randn(2, 1, 6, 6, device=device)
            w = torch.randn(2, 1, 3, 3, device=device, requires_grad=True)
            v = torch.randn(2, 2, device=device, requires_grad=True)
            h = F.batch_norm(F.conv2d(x, w, padding=1), None, None, training=True)
            h = F.max_pool2d(F.relu(h), 2).mean(dim=(2, 3))
            (g,) = torch.autograd.grad((h @ v).square().sum(), w, create_graph=True)
            torch.autograd.grad(g.square().sum(), v)
            _DOUBLE_BACKWARD[device.type] = True
        except (RuntimeError, NotImplementedError) as error:  # pragma: no cover - device specific
            _DOUBLE_BACKWARD[device.type] = str(error).splitlines()[0] or type(error).__name__
    return _DOUBLE_BACKWARD[device.type]


def maml_device(prefer: str | torch.device | None = None, *, second_order: bool = True) -> torch.device:
    """:func:`metatut.pick_device`, falling back to the CPU (with a warning saying why) when the device
    cannot take second-order MAML's double backward (some operations on Apple MPS).

    Example::

        >>> maml_device("cpu")
        device(type='cpu')
    """
    device = pick_device(prefer)
    if second_order and device.type != "cpu":
        answer = supports_double_backward(device)
        if answer is not True:
            warnings.warn(f"{device.type} cannot differentiate this network twice ({answer}); second-order MAML "
                          "runs on the CPU instead. Use first_order=True to stay on the device.", RuntimeWarning,
                          stacklevel=2)
            return torch.device("cpu")
    return device


def compile_objective(objective: Callable, *, enabled: bool, vectorized: bool = True,
                      first_order: bool = False) -> Callable:
    """``torch.compile(objective)`` when ``enabled``; the objective unchanged otherwise.

    ``vectorized`` says whether the objective runs the vmap path (then both orders compile, since the
    inner gradient is traced into the graph); the per-task loop compiles only in first order.
    Raises a ``ValueError`` for the combination that cannot work, before any compilation starts.

    Example::

        >>> objective = lambda params, batch: 0.0
        >>> compile_objective(objective, enabled=False) is objective
        True
        >>> compile_objective(objective, enabled=True, vectorized=False)
        Traceback (most recent call last):
        ...
        ValueError: compile=True needs the vmap path or first-order MAML: ...
    """
    if not enabled:
        return objective
    if not vectorized and not first_order:
        raise ValueError("compile=True needs the vmap path or first-order MAML: the per-task loop in second order "
                         "differentiates twice through compiled code, which torch.compile does not support")
    compiled = torch.compile(objective)
    if getattr(objective, "uses_step", False):  # metatut.meta_train then passes step=... (MAMLObjective)
        compiled.uses_step = True
    return compiled
