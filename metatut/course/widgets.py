r"""An interactive explorer of few-shot adaptation on one sinusoid task (ipywidgets + matplotlib).

Pick a task :math:`y = A \sin(x - \varphi)`, draw ``shots`` support points from it, take ``steps``
SGD steps of size :math:`\alpha` from some parameters :math:`\theta` on those points, and look at the
fit before and after. Everything is computed by a pure function, :func:`adaptation_data`, so that the
explorer can be tested without a browser; :func:`adaptation_figure` draws its result and
:func:`adaptation_explorer` puts sliders in front of it::

    from metatut.widgets import adaptation_explorer
    adaptation_explorer(model, {"random init": params})
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import torch
from torch import Tensor, nn

from ..device import make_generator
from ..functional import adapt, adaptation_curve
from ..models import Params, forward
from ..tasks.base import TaskBatch
from ..tasks.regression import SinusoidTasks

__all__ = [
    "AMPLITUDE_RANGE", "PHASE_RANGE", "SHOTS_RANGE", "STEPS_RANGE", "INNER_LR_RANGE", "X_RANGE",
    "DIVERGENCE_FACTOR", "EXPLORER_PLACEHOLDER", "AdaptationData", "adaptation_data", "format_loss", "draw_adaptation",
    "adaptation_figure", "adaptation_png", "adaptation_explorer",
]

#: Allowed values of each setting (inclusive). The sinusoid training tasks use A in [0.1, 5] and
#: phase in [0, pi]; the explorer lets you step outside that range to see what happens there.
AMPLITUDE_RANGE = (0.0, 10.0)
PHASE_RANGE = (0.0, 2 * math.pi)
SHOTS_RANGE = (1, 100)
STEPS_RANGE = (0, 100)
INNER_LR_RANGE = (0.0, 1.0)
#: Inputs of the task: support points are drawn uniformly from it; the fit is scored on a grid over it.
X_RANGE = SinusoidTasks().x_range
#: Adaptation counts as *diverged* when its final loss is not finite or exceeds this many times the loss it
#: started from (or this many times 1e-3, when it started near zero): the title then says "diverged" instead of
#: printing a meaningless 21-digit number.
DIVERGENCE_FACTOR = 1e3
#: The text that stands for the explorer where its live widget cannot be shown (a notebook that was not run,
#: a static viewer): next to it, the same bundle carries a PNG of the explorer's picture.
EXPLORER_PLACEHOLDER = "Adaptation explorer (a picture of its first setting): run the cell to use the explorer"


# --------------------------------------------------------------------------------------------- checks
def _check_number(name: str, value, bounds: tuple[float, float]) -> float:
    low, high = bounds
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [{low:g}, {high:g}] (got {value!r})")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}] (got {value!r})")
    return value


def _check_int(name: str, value, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{low}, {high}] (got {value!r})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}] (got {value})")
    return value


def _check_model_and_params(model, params, name: str = "params") -> Params:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"{name} must be a non-empty dict of name -> tensor (e.g. metatut.init_params(model))")
    expected = dict(model.named_parameters())
    for key, value in params.items():
        if key not in expected:
            raise ValueError(f"{name} has a tensor {key!r} that the model does not have "
                             f"(the model's parameters: {sorted(expected)})")
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(expected[key].shape):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name}[{key!r}] must have shape {tuple(expected[key].shape)} (got {shape})")
    return {k: v.detach() for k, v in params.items()}


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class AdaptationData:
    """Everything the explorer draws for one setting (1-D CPU tensors, detached).

    ``grid_x``/``true_y``: the task's function on a grid over :data:`X_RANGE`; ``support_x``/``support_y``:
    the ``shots`` points adapted on; ``before_y``/``after_y``: the model's predictions on the grid at
    ``params`` and after ``steps`` SGD steps; ``curve[k]``: the mean squared error to the true function on
    the grid after ``k`` steps (``k = 0 .. steps``); ``adapted_params``: the parameters after adaptation.
    """

    amplitude: float
    phase: float
    shots: int
    steps: int
    inner_lr: float
    seed: int
    grid_x: Tensor
    true_y: Tensor
    support_x: Tensor
    support_y: Tensor
    before_y: Tensor
    after_y: Tensor
    curve: Tensor
    adapted_params: Params

    @property
    def loss_before(self) -> float:
        """Mean squared error to the true function (on the grid) before adaptation."""
        return float(self.curve[0])

    @property
    def loss_after(self) -> float:
        """Mean squared error to the true function (on the grid) after ``steps`` steps."""
        return float(self.curve[-1])

    @property
    def diverged(self) -> bool:
        """Whether the final loss is non-finite or above :data:`DIVERGENCE_FACTOR` times the starting loss."""
        return _diverged(self.loss_after, self.loss_before)

    @property
    def curve_diverged(self) -> bool:
        """Whether the loss left that bound at *any* step (it can blow up and come back, e.g. when units die)."""
        return any(_diverged(float(value), self.loss_before) for value in self.curve)


def _diverged(value: float, start: float) -> bool:
    return not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(start, 1e-3)


def format_loss(value: float, start: float | None = None) -> str:
    """A loss for a title: three significant digits, or ``"diverged"``.

    ``"diverged"`` when ``value`` is not finite, or when ``start`` (the loss adaptation started from) is given
    and ``value`` exceeds :data:`DIVERGENCE_FACTOR` times it.

    Example::

        >>> format_loss(4.41609668), format_loss(0.000123456), format_loss(float("nan"))
        ('4.42', '0.000123', 'diverged')
        >>> format_loss(35888928.0, start=4.4), format_loss(35888928.0)
        ('diverged', '3.59e+07')
    """
    value = float(value)
    if not math.isfinite(value) or (start is not None and _diverged(value, float(start))):
        return "diverged"
    return f"{value:.3g}"


def adaptation_data(model: nn.Module, params: Params, amplitude: float, phase: float, shots: int, steps: int,
                    inner_lr: float, seed: int = 0, *, grid_points: int = 200) -> AdaptationData:
    r"""Adapt ``params`` to the task :math:`A \sin(x - \varphi)` from ``shots`` points; return what to plot.

    The support inputs are ``shots`` draws from U(:data:`X_RANGE`) with generator ``seed`` (the first
    ``K`` points stay the same when ``shots`` grows). Adaptation is :func:`metatut.adapt` (``steps`` SGD
    steps of size ``inner_lr`` on the mean squared error); the loss curve is :func:`metatut.adaptation_curve`
    with the grid as query set. ``params`` is not modified. Raises ``TypeError``/``ValueError`` naming the
    argument and its allowed range.
    """
    base = _check_model_and_params(model, params)
    amplitude = _check_number("amplitude", amplitude, AMPLITUDE_RANGE)
    phase = _check_number("phase", phase, PHASE_RANGE)
    shots = _check_int("shots", shots, SHOTS_RANGE)
    steps = _check_int("steps", steps, STEPS_RANGE)
    inner_lr = _check_number("inner_lr", inner_lr, INNER_LR_RANGE)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (got {seed!r})")
    _check_int("grid_points", grid_points, (2, 100_000))

    reference = next(iter(base.values()))
    device, dtype = reference.device, reference.dtype
    low, high = X_RANGE
    generator = make_generator(seed)
    support_x = (low + (high - low) * torch.rand(shots, generator=generator, dtype=torch.float64)).to(device, dtype)
    grid_x = torch.linspace(low, high, grid_points, dtype=dtype, device=device)
    a = torch.tensor(amplitude, dtype=dtype, device=device)
    p = torch.tensor(phase, dtype=dtype, device=device)
    support_y = SinusoidTasks.function(support_x, a, p)
    true_y = SinusoidTasks.function(grid_x, a, p)

    # One task as a TaskBatch: the support points to adapt on, the grid as the query set to score on.
    task = TaskBatch(support_x.view(1, -1, 1), support_y.view(1, -1, 1), grid_x.view(1, -1, 1), true_y.view(1, -1, 1))
    adapted = adapt(model, base, task.support_x, task.support_y, inner_lr=inner_lr, steps=steps)
    adapted = {k: v[0].detach() for k, v in adapted.items()}
    curve = adaptation_curve(model, base, task, inner_lr=inner_lr, steps=steps)[0]
    with torch.no_grad():
        before_y = forward(model, base, grid_x.view(-1, 1)).view(-1)
        after_y = forward(model, adapted, grid_x.view(-1, 1)).view(-1)

    def cpu(t: Tensor) -> Tensor:
        return t.detach().cpu()

    return AdaptationData(amplitude, phase, shots, steps, inner_lr, seed, cpu(grid_x), cpu(true_y), cpu(support_x),
                          cpu(support_y), cpu(before_y), cpu(after_y), cpu(curve), adapted)


# --------------------------------------------------------------------------------------------- figure
def draw_adaptation(data: AdaptationData, *, label: str | None = None, axes=None):
    """Draw ``data`` on two Axes (fit | loss after each step); return the Figure.

    The title gives the losses to three significant digits, or "diverged" (see :func:`format_loss`); when the
    loss curve blows up, its panel switches to a logarithmic scale so that it stays readable.
    """
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    fit_ax, curve_ax = axes
    fig = fit_ax.figure
    fit_ax.plot(data.grid_x, data.true_y, color="0.5", ls="--", lw=1.5, label="true function")
    fit_ax.plot(data.grid_x, data.before_y, color="tab:blue", label="before adaptation")
    fit_ax.plot(data.grid_x, data.after_y, color="tab:orange",
                label=f"after {data.steps} step{'s' if data.steps != 1 else ''}"
                      + (" (diverged)" if data.diverged else ""))
    fit_ax.scatter(data.support_x, data.support_y, color="k", s=22, zorder=3, label=f"support (K={data.shots})")
    fit_ax.set_xlabel("x")
    fit_ax.set_ylabel("y")
    limit = max(1.0, 1.3 * data.amplitude)
    fit_ax.set_ylim(-limit, limit)
    fit_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)
    title = (f"A={data.amplitude:.2f}, φ={data.phase:.2f}, α={data.inner_lr:.3g}: "
             f"MSE {format_loss(data.loss_before)} → {format_loss(data.loss_after, start=data.loss_before)}")
    fit_ax.set_title(f"{label}: {title}" if label else title, fontsize=10)
    curve_ax.plot(range(data.steps + 1), data.curve, marker="o", ms=3, color="tab:orange")
    curve_ax.set_xlabel("SGD steps on the support set")
    curve_ax.set_ylabel("MSE to true function")
    if data.curve_diverged:
        curve_ax.set_yscale("log")  # 1e+20 next to 4.4 on a linear axis is a flat line and a spike
        curve_ax.set_ylabel("MSE to true function (log)")
    else:
        curve_ax.set_ylim(bottom=0)
    curve_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def adaptation_figure(model: nn.Module, params: Params, amplitude: float, phase: float, shots: int, steps: int,
                      inner_lr: float, seed: int = 0, *, label: str | None = None):
    """The explorer's picture for one setting, as a static matplotlib Figure (see :func:`adaptation_data`).

    The Figure carries the numbers it shows as ``figure.adaptation_data``.
    """
    data = adaptation_data(model, params, amplitude, phase, shots, steps, inner_lr, seed)
    fig = draw_adaptation(data, label=label)
    fig.adaptation_data = data
    return fig


def adaptation_png(data: AdaptationData, *, label: str | None = None, dpi: float | None = None) -> bytes:
    """:func:`draw_adaptation`'s picture as PNG bytes, drawn off-screen (pyplot's figures are not touched).

    ``dpi`` defaults to ``matplotlib.rcParams["figure.dpi"]``, as the notebook's inline figures use.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=dpi or plt.rcParams["figure.dpi"])
    FigureCanvasAgg(fig)
    draw_adaptation(data, label=label, axes=fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]}))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- explorer
def adaptation_explorer(model: nn.Module, params_by_name: Mapping[str, Params], *, seed: int = 0,
                        amplitude: float = 2.5, phase: float = 1.0, shots: int = 10, steps: int = 5,
                        inner_lr: float = 0.01):
    """Sliders for amplitude, phase, shots K, steps and step size α, and a menu of parameter sets.

    ``params_by_name`` maps a label (e.g. ``"random init"``) to a parameter dict for ``model``. Returns an
    ``ipywidgets.interactive``: display it in a notebook; ``.result`` holds the :class:`AdaptationData`
    of the current setting, and each control is a child whose ``description`` names it.

    Displayed, it offers the live widget and, in the same output, a PNG of its current picture and the short
    text :data:`EXPLORER_PLACEHOLDER`: a notebook saved with this output shows the picture where the widget
    cannot be rendered (opened without running it, untrusted, on a static viewer), and the live widget once
    the cell runs.
    """
    import ipywidgets as widgets

    if not isinstance(params_by_name, Mapping) or not params_by_name:
        raise TypeError("params_by_name must be a non-empty dict of label -> params "
                        "(e.g. {'random init': metatut.init_params(model)})")
    checked = {}
    for name, params in params_by_name.items():
        if not isinstance(name, str):
            raise TypeError(f"params_by_name keys must be strings (got {name!r})")
        checked[name] = _check_model_and_params(model, params, name=f"params_by_name[{name!r}]")
    # Validate the starting values once, with the same messages as adaptation_data.
    amplitude = _check_number("amplitude", amplitude, AMPLITUDE_RANGE)
    phase = _check_number("phase", phase, PHASE_RANGE)
    shots = _check_int("shots", shots, SHOTS_RANGE)
    steps = _check_int("steps", steps, STEPS_RANGE)
    inner_lr = _check_number("inner_lr", inner_lr, INNER_LR_RANGE)
    if inner_lr == 0:
        raise ValueError("inner_lr must be > 0 to start the explorer (its slider is logarithmic)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (got {seed!r})")

    style = {"description_width": "110px"}
    layout = widgets.Layout(width="460px")
    common = {"continuous_update": False, "style": style, "layout": layout}
    controls = {
        "name": widgets.Dropdown(options=list(checked), value=next(iter(checked)), description="parameters",
                                 style=style, layout=layout),
        "amplitude": widgets.FloatSlider(value=amplitude, min=AMPLITUDE_RANGE[0], max=AMPLITUDE_RANGE[1], step=0.1,
                                         description="amplitude A", **common),
        "phase": widgets.FloatSlider(value=phase, min=PHASE_RANGE[0], max=PHASE_RANGE[1], step=0.05,
                                     description="phase φ", **common),
        "shots": widgets.IntSlider(value=shots, min=SHOTS_RANGE[0], max=SHOTS_RANGE[1], description="shots K",
                                   **common),
        "steps": widgets.IntSlider(value=steps, min=STEPS_RANGE[0], max=STEPS_RANGE[1], description="SGD steps",
                                   **common),
        "inner_lr": widgets.FloatLogSlider(value=inner_lr, base=10, min=-4, max=math.log10(INNER_LR_RANGE[1]),
                                           step=0.1, description="step size α", readout_format=".4f", **common),
    }

    def show(name, amplitude, phase, shots, steps, inner_lr):
        data = adaptation_data(model, checked[name], amplitude, phase, shots, steps, inner_lr, seed)
        fig = draw_adaptation(data, label=name)
        plt.show()  # the inline backend draws the figure into the explorer's output area
        plt.close(fig)
        return data

    return _explorer_class()(show, **controls)


_EXPLORER_CLASS = None


def _explorer_class():
    """``ipywidgets.interactive`` whose display bundle also carries a static picture (built once, lazily)."""
    global _EXPLORER_CLASS
    if _EXPLORER_CLASS is None:
        import ipywidgets as widgets

        class AdaptationExplorer(widgets.interactive):
            """The explorer's widget; its display bundle adds ``image/png`` and a short ``text/plain``."""

            def _repr_mimebundle_(self, **kwargs):
                bundle = super()._repr_mimebundle_(**kwargs)
                if bundle and isinstance(self.result, AdaptationData):
                    name = self.kwargs.get("name")
                    bundle["image/png"] = adaptation_png(self.result, label=name)
                    bundle["text/plain"] = EXPLORER_PLACEHOLDER
                return bundle

        _EXPLORER_CLASS = AdaptationExplorer
    return _EXPLORER_CLASS
