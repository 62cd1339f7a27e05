"""Regression task families: sinusoids (MAML paper, section 5.1) and linear regression (closed forms)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import TaskBatch, check_generator, check_positive_int, check_range

__all__ = ["SinusoidTasks", "LinearTasks"]


def _uniform(shape, bounds, generator, device, dtype) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, device=device, dtype=dtype)


def _generator_device(generator: torch.Generator | None, device) -> torch.device:
    check_generator(generator)
    if generator is not None:
        if device is not None and torch.device(device).type != generator.device.type:
            raise ValueError(f"generator lives on {generator.device} but device={device!r} was asked for; "
                             "make the generator on the sampling device (metatut.make_generator(seed, device))")
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


@dataclass(frozen=True)
class SinusoidTasks:
    """Sinusoid regression tasks y = A sin(x - phi), as in Finn et al. (2017), section 5.1.

    Amplitude A ~ U[0.1, 5.0], phase phi ~ U[0, pi], inputs x ~ U[-5, 5]; support and query points are
    drawn independently from the same task. Loss: mean squared error.

    Example::

        >>> import metatut as mt
        >>> batch = SinusoidTasks().sample(4, 10, 15, generator=mt.make_generator(0))
        >>> batch.support_x.shape, batch.query_y.shape, batch.info["amplitude"].shape
        (torch.Size([4, 10, 1]), torch.Size([4, 15, 1]), torch.Size([4]))
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        check_range("amplitude", self.amplitude)
        check_range("phase", self.phase)
        check_range("x_range", self.x_range)

    @staticmethod
    def function(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """The task's true function; ``amplitude`` and ``phase`` broadcast against ``x``."""
        return amplitude * torch.sin(x - phase)

    def sample(self, num_tasks: int, shots: int, query_shots: int | None = None, *,
               generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        """Draw ``num_tasks`` tasks with ``shots`` support and ``query_shots`` query points each.

        Returns a :class:`TaskBatch` with x and y shaped ``[num_tasks, shots, 1]`` and
        ``info['amplitude']``, ``info['phase']`` shaped ``[num_tasks]``. Sampling happens on the
        generator's device.
        """
        check_positive_int("num_tasks", num_tasks)
        check_positive_int("shots", shots)
        query_shots = shots if query_shots is None else check_positive_int("query_shots", query_shots)
        dev = _generator_device(generator, device)
        amp = _uniform((num_tasks, 1, 1), self.amplitude, generator, dev, dtype)
        phase = _uniform((num_tasks, 1, 1), self.phase, generator, dev, dtype)
        x = _uniform((num_tasks, shots + query_shots, 1), self.x_range, generator, dev, dtype)
        y = self.function(x, amp, phase)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:],
                         {"amplitude": amp.view(-1), "phase": phase.view(-1)})


@dataclass(frozen=True)
class LinearTasks:
    """Linear-regression tasks y = x . w + b + noise, with w ~ N(0, I), b ~ N(0, 1), x ~ N(0, I).

    With a linear model and squared error, adaptation and the MAML meta-gradient have closed forms,
    which the tests and notebooks use as an independent reference.

    Example::

        >>> import metatut as mt
        >>> batch = LinearTasks(dim=3).sample(2, 5, generator=mt.make_generator(0))
        >>> batch.support_x.shape, batch.support_y.shape, batch.info["weight"].shape
        (torch.Size([2, 5, 3]), torch.Size([2, 5, 1]), torch.Size([2, 3]))
    """

    dim: int = 1
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("dim", self.dim)
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0 (got {self.noise_std})")

    def sample(self, num_tasks: int, shots: int, query_shots: int | None = None, *,
               generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        """Return a :class:`TaskBatch` with x ``[num_tasks, shots, dim]`` and y ``[num_tasks, shots, 1]``;
        ``info['weight'] [num_tasks, dim]`` and ``info['bias'] [num_tasks]`` hold the true parameters."""
        check_positive_int("num_tasks", num_tasks)
        check_positive_int("shots", shots)
        query_shots = shots if query_shots is None else check_positive_int("query_shots", query_shots)
        dev = _generator_device(generator, device)
        w = torch.randn((num_tasks, self.dim, 1), generator=generator, device=dev, dtype=dtype)
        b = torch.randn((num_tasks, 1, 1), generator=generator, device=dev, dtype=dtype)
        x = torch.randn((num_tasks, shots + query_shots, self.dim), generator=generator, device=dev, dtype=dtype)
        y = x @ w + b
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator, device=dev, dtype=dtype)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:],
                         {"weight": w.squeeze(-1), "bias": b.view(-1)})
