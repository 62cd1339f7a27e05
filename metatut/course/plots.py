"""Small plotting helpers shared by the notebooks (matplotlib; each returns the Axes it drew on), and
:func:`display_path`, which prints a path without the machine it runs on."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from ..models import Params, forward
from ..tasks.base import TaskBatch

__all__ = ["plot_sinusoid_task", "plot_predictions", "plot_loss_histories", "plot_adaptation_curves", "display_path"]

#: The source checkout this package runs from (the folder with pyproject.toml), or None when installed.
_CHECKOUT = Path(__file__).resolve().parents[2]
if not (_CHECKOUT / "pyproject.toml").is_file():
    _CHECKOUT = None


def display_path(path) -> str:
    """``path`` as a notebook should print it: without the absolute location of the machine that ran it.

    Inside the source checkout: ``<checkout>/`` and the path relative to it; under the home folder: ``~/...``;
    anything else as it is. Committed notebook outputs then read the same on every machine.

    Example::

        >>> from pathlib import Path
        >>> display_path(Path.home() / ".cache" / "metatut")
        '~/.cache/metatut'
        >>> display_path("relative/folder")
        'relative/folder'
    """
    path = Path(os.fspath(path)).expanduser()
    if not path.is_absolute():
        return path.as_posix()
    resolved = path.resolve()
    home = Path.home().resolve()
    for base, name in ((_CHECKOUT, "<checkout>"), (home if home != Path(home.anchor) else None, "~")):
        if base is not None and resolved.is_relative_to(base):
            rest = resolved.relative_to(base).as_posix()
            return name if rest == "." else f"{name}/{rest}"
    return path.as_posix()


def _axes(ax):
    return ax if ax is not None else plt.figure(figsize=(6, 3.6)).gca()


def plot_sinusoid_task(batch: TaskBatch, index: int = 0, *, ax=None, x_range=(-5.0, 5.0), true_fn: bool = True,
                       label_prefix: str = ""):
    """Scatter task ``index``'s support (filled) and query (hollow) points, with its true sinusoid."""
    ax = _axes(ax)
    if true_fn and "amplitude" in batch.info and "phase" in batch.info:
        x = torch.linspace(*x_range, 200)
        a, p = batch.info["amplitude"][index].cpu(), batch.info["phase"][index].cpu()
        ax.plot(x, a * torch.sin(x - p), color="0.6", lw=1.5, ls="--", label=f"{label_prefix}true function")
    ax.scatter(batch.support_x[index, :, 0].cpu(), batch.support_y[index, :, 0].cpu(), color="k", s=22, zorder=3,
               label=f"{label_prefix}support ({batch.shots} shots)")
    ax.scatter(batch.query_x[index, :, 0].cpu(), batch.query_y[index, :, 0].cpu(), facecolors="none",
               edgecolors="k", s=22, zorder=3, label=f"{label_prefix}query")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return ax


def plot_predictions(model: nn.Module, curves: Mapping[str, Params], *, ax=None, x_range=(-5.0, 5.0), **style):
    """Plot ``model`` evaluated at each parameter dict of ``curves`` (label -> params) over ``x_range``.

    A parameter dict may carry a leading task dimension of size 1 (as :func:`metatut.adapt` returns).
    """
    ax = _axes(ax)
    x = torch.linspace(*x_range, 200).unsqueeze(-1)
    for label, params in curves.items():
        first = next(iter(params.values()))
        ref = dict(model.named_parameters())
        p = {k: (v[0] if v.dim() == ref[k].dim() + 1 else v).detach().cpu() for k, v in params.items()}
        with torch.no_grad():
            y = forward(model, p, x.to(first.dtype))
        ax.plot(x[:, 0], y[:, 0], label=label, **style)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return ax


def plot_loss_histories(histories: Mapping[str, Tensor], *, window: int = 100, ax=None, logy: bool = True):
    """Running mean (over ``window`` iterations) of each loss history (label -> ``[steps]``)."""
    ax = _axes(ax)
    for label, losses in histories.items():
        losses = torch.as_tensor(losses, dtype=torch.float64).flatten().cpu()
        w = max(1, min(window, len(losses)))
        smooth = torch.nn.functional.conv1d(losses.view(1, 1, -1), torch.ones(1, 1, w, dtype=losses.dtype) / w)
        ax.plot(torch.arange(w, len(losses) + 1), smooth.view(-1), label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"training loss (running mean of {window})")
    ax.legend()
    return ax


def plot_adaptation_curves(curves: Mapping[str, Tensor], *, ax=None, logy: bool = False,
                           ylabel: str = "query MSE"):
    """Mean query loss against the number of test-time SGD steps, with a 95% CI band.

    ``curves`` maps a label to a ``[tasks, steps + 1]`` tensor (as :func:`metatut.adaptation_curve` returns).
    """
    ax = _axes(ax)
    for label, curve in curves.items():
        c = torch.as_tensor(curve, dtype=torch.float64).cpu()
        steps = torch.arange(c.shape[1])
        mean = c.mean(0)
        half = 1.96 * c.std(0, unbiased=True) / math.sqrt(c.shape[0])
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=label)
        ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("gradient steps at test time")
    ax.set_ylabel(ylabel)
    ax.legend()
    return ax
