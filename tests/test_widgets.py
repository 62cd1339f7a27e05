"""Headless tests of the adaptation explorer (metatut.widgets): data, figure, sliders and argument checks."""
import math

import matplotlib

matplotlib.use("Agg")  # this module only: draw without a display

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import metatut as mt  # noqa: E402
from metatut.widgets import (  # noqa: E402
    DIVERGENCE_FACTOR, EXPLORER_PLACEHOLDER, AdaptationData, adaptation_data, adaptation_explorer, adaptation_figure,
    format_loss,
)

ipywidgets = pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def model():
    return mt.mlp(hidden=(16, 16), seed=0)


@pytest.fixture(scope="module")
def params(model):
    return mt.init_params(model)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def controls(explorer):
    """The explorer's controls by their description."""
    return {w.description: w for w in explorer.children if getattr(w, "description", "")}


def support_points(shots, seed):
    generator = mt.make_generator(seed)
    x = -5.0 + 10.0 * torch.rand(shots, generator=generator, dtype=torch.float64)
    return x.float()


def test_data_matches_adapt_on_the_same_task(model, params):
    data = adaptation_data(model, params, amplitude=2.0, phase=0.5, shots=7, steps=3, inner_lr=0.02, seed=4)
    assert isinstance(data, AdaptationData)
    x = support_points(7, seed=4)
    y = 2.0 * torch.sin(x - 0.5)
    torch.testing.assert_close(data.support_x, x)
    torch.testing.assert_close(data.support_y, y)
    adapted = mt.adapt(model, params, x.view(1, -1, 1), y.view(1, -1, 1), inner_lr=0.02, steps=3)
    grid = data.grid_x.view(-1, 1)
    expected_after = mt.forward(model, {k: v[0] for k, v in adapted.items()}, grid).view(-1)
    expected_before = mt.forward(model, params, grid).view(-1)
    torch.testing.assert_close(data.after_y, expected_after.detach())
    torch.testing.assert_close(data.before_y, expected_before.detach())
    torch.testing.assert_close(data.true_y, 2.0 * torch.sin(data.grid_x - 0.5))
    # The loss curve scores the same predictions against the true function on the grid.
    assert data.curve.shape == (4,)
    assert data.loss_before == pytest.approx(float(((data.before_y - data.true_y) ** 2).mean()), rel=1e-4)
    assert data.loss_after == pytest.approx(float(((data.after_y - data.true_y) ** 2).mean()), rel=1e-4)


def test_data_does_not_modify_params(model, params):
    before = {k: v.detach().clone() for k, v in params.items()}
    adaptation_data(model, params, 3.0, 1.0, 10, 5, 0.05, 0)
    for k in params:
        torch.testing.assert_close(params[k].detach(), before[k])


def test_more_shots_keep_the_first_points(model, params):
    few = adaptation_data(model, params, 1.0, 0.0, 5, 0, 0.01, seed=3)
    many = adaptation_data(model, params, 1.0, 0.0, 9, 0, 0.01, seed=3)
    torch.testing.assert_close(many.support_x[:5], few.support_x)


def test_zero_steps_leave_the_fit_unchanged(model, params):
    data = adaptation_data(model, params, 1.5, 2.0, 10, 0, 0.1, 0)
    torch.testing.assert_close(data.after_y, data.before_y)
    assert data.loss_after == data.loss_before


def test_figure_draws_the_data(model, params):
    fig = adaptation_figure(model, params, 2.0, 1.0, 10, 5, 0.01, 0, label="random init")
    data = fig.adaptation_data
    fit_ax, curve_ax = fig.axes
    lines = {line.get_label(): line for line in fit_ax.get_lines()}
    assert set(lines) == {"true function", "before adaptation", "after 5 steps"}
    torch.testing.assert_close(torch.as_tensor(lines["after 5 steps"].get_ydata()), data.after_y)
    torch.testing.assert_close(torch.as_tensor(curve_ax.get_lines()[0].get_ydata()), data.curve)
    assert fit_ax.get_title().startswith("random init:")


def test_explorer_builds_and_reacts_to_sliders(model, params):
    trained = {k: v.detach() + 0.1 for k, v in params.items()}
    explorer = adaptation_explorer(model, {"random init": params, "shifted": trained}, seed=1)
    assert isinstance(explorer, ipywidgets.interactive)
    ui = controls(explorer)
    assert set(ui) == {"parameters", "amplitude A", "phase φ", "shots K", "SGD steps", "step size α"}
    first = explorer.result
    assert isinstance(first, AdaptationData) and first.steps == 5 and first.shots == 10

    ui["SGD steps"].value = 20
    more_steps = explorer.result
    assert more_steps.steps == 20 and more_steps.curve.shape == (21,)
    assert more_steps.loss_after != pytest.approx(first.loss_after)
    assert more_steps.loss_before == pytest.approx(first.loss_before)

    ui["amplitude A"].value = 4.0
    assert explorer.result.amplitude == pytest.approx(4.0)
    torch.testing.assert_close(explorer.result.true_y, 4.0 * torch.sin(explorer.result.grid_x - first.phase))

    ui["parameters"].value = "shifted"
    expected = adaptation_data(model, trained, 4.0, first.phase, 10, 20, first.inner_lr, seed=1)
    torch.testing.assert_close(explorer.result.after_y, expected.after_y)

    ui["step size α"].value = 0.1
    assert explorer.result.inner_lr == pytest.approx(0.1)
    ui["shots K"].value = 3
    assert explorer.result.support_x.shape == (3,)
    ui["phase φ"].value = 2.0
    assert explorer.result.phase == pytest.approx(2.0)
    assert plt.get_fignums() == []  # every redraw closed its figure


@pytest.mark.parametrize("name, value, error", [
    ("amplitude", -1.0, ValueError),
    ("amplitude", 11.0, ValueError),
    ("amplitude", "big", TypeError),
    ("phase", 7.0, ValueError),
    ("shots", 0, ValueError),
    ("shots", 101, ValueError),
    ("shots", 2.5, TypeError),
    ("steps", -1, ValueError),
    ("steps", True, TypeError),
    ("inner_lr", -0.1, ValueError),
    ("inner_lr", math.nan, ValueError),
    ("inner_lr", 2.0, ValueError),
    ("seed", 1.5, TypeError),
])
def test_bad_settings_raise_naming_the_argument(model, params, name, value, error):
    settings = dict(amplitude=1.0, phase=0.0, shots=5, steps=1, inner_lr=0.01, seed=0)
    settings[name] = value
    with pytest.raises(error, match=name):
        adaptation_data(model, params, **settings)
    with pytest.raises(error, match=name):
        adaptation_explorer(model, {"p": params}, **settings)


def test_range_is_in_the_message(model, params):
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        adaptation_data(model, params, 1.0, 0.0, 0, 1, 0.01)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        adaptation_data(model, params, -2.0, 0.0, 5, 1, 0.01)


def test_bad_params_raise(model, params):
    with pytest.raises(TypeError, match="params_by_name"):
        adaptation_explorer(model, {})
    with pytest.raises(TypeError, match="params_by_name"):
        adaptation_explorer(model, [params])
    wrong_shape = dict(params, **{"0.weight": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match=r"params_by_name\['bad'\]\['0.weight'\]"):
        adaptation_explorer(model, {"ok": params, "bad": wrong_shape})
    with pytest.raises(ValueError, match="does not have"):
        adaptation_data(model, dict(params, extra=torch.zeros(1)), 1.0, 0.0, 5, 1, 0.01)
    with pytest.raises(TypeError, match="model"):
        adaptation_data("not a model", params, 1.0, 0.0, 5, 1, 0.01)
    with pytest.raises(ValueError, match="inner_lr must be > 0"):
        adaptation_explorer(model, {"p": params}, inner_lr=0.0)


# ------------------------------------------------------------------------------ titles when adaptation diverges
@pytest.mark.parametrize("value, start, expected", [
    (4.41609668, None, "4.42"),
    (0.000123456, None, "0.000123"),
    (123456.0, None, "1.23e+05"),
    (35888928.0, 4.4, "diverged"),             # > DIVERGENCE_FACTOR x the start
    (4.0 * DIVERGENCE_FACTOR, 4.4, "4e+03"),   # within the bound: a number
    (math.nan, None, "diverged"),
    (math.inf, 1.0, "diverged"),
])
def test_format_loss(value, start, expected):
    assert format_loss(value, start=start) == expected


def test_title_says_diverged_with_a_large_step_and_one_shot():
    model = mt.mlp(seed=0)  # the course's sinusoid network (40, 40)
    params = mt.init_params(model)
    fig = adaptation_figure(model, params, amplitude=3.0, phase=1.0, shots=1, steps=30, inner_lr=0.2, label="random")
    data = fig.adaptation_data
    assert data.diverged and data.curve_diverged
    title = fig.axes[0].get_title()
    assert title.endswith(f"MSE {data.loss_before:.3g} → diverged"), title
    assert "nan" not in title and not any(len(run) > 5 for run in "".join(c if c.isdigit() else " " for c in title).split())
    assert fig.axes[1].get_yscale() == "log"  # the curve stays readable
    assert any("(diverged)" in line.get_label() for line in fig.axes[0].get_lines())

    # α = 1 overflows to inf: still "diverged", never "inf" or "nan"
    overflow = adaptation_figure(model, params, 3.0, 1.0, 1, 30, 1.0)
    assert not math.isfinite(overflow.adaptation_data.loss_after)
    assert overflow.axes[0].get_title().endswith("→ diverged")


def test_title_of_a_normal_setting_has_three_significant_digits(model, params):
    fig = adaptation_figure(model, params, 2.0, 1.0, 10, 5, 0.01, 0)
    data = fig.adaptation_data
    assert not data.diverged and not data.curve_diverged
    assert fig.axes[0].get_title() == (f"A=2.00, φ=1.00, α=0.01: MSE {data.loss_before:.3g} → "
                                       f"{data.loss_after:.3g}")
    assert fig.axes[1].get_yscale() == "linear"


# ---------------------------------------------------------------- what a notebook saves for the explorer's output
def test_display_bundle_carries_a_picture_and_a_short_text(model, params):
    explorer = adaptation_explorer(model, {"random init": params}, steps=3)
    bundle = explorer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.model_id
    assert bundle["text/plain"] == EXPLORER_PLACEHOLDER and "run the cell" in bundle["text/plain"]
    png = bundle["image/png"]
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    # The picture follows the current setting, and drawing it leaves pyplot's figures alone.
    controls(explorer)["SGD steps"].value = 30
    assert explorer._repr_mimebundle_()["image/png"] != png
    assert plt.get_fignums() == []
