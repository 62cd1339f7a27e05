"""The exercise checkers: the reference solution passes, a stub and typical mistakes fail with a hint.

The reference solutions are the code cells of the solution notebooks, taken from the exercise
sources with the generator's own parser (exercises/generate.py), so these tests run exactly the code
that exercises/solutions/*.ipynb contains.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metatut as mt
from metatut import checks
from metatut.checks import CheckFailed, check_inner_step, check_maml_loss, check_summed_task_loss
from exercise_support import METATUT
from exercise_support import fails_with as _fails_with
from exercise_support import shown_in_jupyter as _shown_in_jupyter
from exercise_support import solution as _solution
from exercise_support import stub as _stub


summed_task_loss = _solution("01_summed_task_loss", "summed_task_loss")
inner_step = _solution("02_inner_step", "inner_step")
maml_loss = _solution("03_maml_loss", "maml_loss")

CHECKERS = {
    "check_summed_task_loss": (check_summed_task_loss, summed_task_loss),
    "check_inner_step": (check_inner_step, inner_step),
    "check_maml_loss": (check_maml_loss, maml_loss),
}
# Every checker of the course, for the tests that hold for all of them.
ALL_CHECKERS = {
    **CHECKERS,
    "check_reptile_update": (checks.check_reptile_update, _solution("04_reptile_update", "reptile_update")),
    "check_meta_sgd_inner_step": (checks.check_meta_sgd_inner_step,
                                  _solution("04_meta_sgd_inner_step", "meta_sgd_inner_step")),
    "check_episode_sampler": (checks.check_episode_sampler, _solution("05_episode_sampling", "sample_episode")),
    "check_protonet_logits": (checks.check_protonet_logits, _solution("06_protonet_logits", "protonet_logits")),
}


# ------------------------------------------------------------------------------------------- general
def test_exports():
    assert set(checks.__all__) == {"CheckFailed", "check_summed_task_loss", "check_inner_step", "check_maml_loss",
                                   "check_reptile_update", "check_meta_sgd_inner_step", "check_episode_sampler",
                                   "check_protonet_logits"}
    assert all(callable(getattr(checks, name)) for name in checks.__all__)
    assert issubclass(CheckFailed, AssertionError)


@pytest.mark.parametrize("name", sorted(ALL_CHECKERS))
def test_reference_passes_with_one_line(name, capsys):
    check, solution = ALL_CHECKERS[name]
    assert check(solution) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"✔ {name} passed: "), out


@pytest.mark.parametrize("name", sorted(ALL_CHECKERS))
def test_stub_fails(name):
    check, _ = ALL_CHECKERS[name]
    message = _fails_with(check, _stub, "implement the function first")
    assert "NotImplementedError" in message


@pytest.mark.parametrize("name", sorted(ALL_CHECKERS))
def test_stub_failure_shows_only_the_hint_in_jupyter(name):
    check, _ = ALL_CHECKERS[name]
    with pytest.raises(CheckFailed) as info:
        check(_stub)
    shown = _shown_in_jupyter(info.value)
    assert shown == [f"✘ {name} failed: implement the function first: replace `# YOUR CODE HERE` and the "
                     "`raise NotImplementedError()` line with your code, run that cell, then run this check again."]


def _line_of(fn, text: str) -> int:
    import inspect
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("name", sorted(ALL_CHECKERS))
def test_learner_error_shows_hint_first_then_the_learners_line_and_error(name):
    def broken(*args):
        table = {"bias": 0}
        return table["weight"]  # the learner's bug
    check, _ = ALL_CHECKERS[name]
    with pytest.raises(CheckFailed, match="raised KeyError") as info:
        check(broken)
    failure = info.value
    assert isinstance(failure.learner_error, KeyError) and failure.__cause__ is None
    assert failure.__suppress_context__  # Python prints no chained traceback through the checker either
    shown = _shown_in_jupyter(failure)
    assert shown[0] == f"✘ {name} failed: your function raised KeyError."
    assert shown[1].startswith("Hint: ")
    assert shown[-4:] == ["In your code:",
                          f'  File "{Path(__file__).resolve()}", line {_line_of(broken, "learner")}, in broken',
                          '    return table["weight"]  # the learner\'s bug',
                          "KeyError: 'weight'"], shown
    assert len(shown) <= 8


def test_learner_error_shows_the_learners_frames_not_torch_or_metatut():
    def deep(f, params, x, y, inner_lr, create_graph):
        return helper(params, x)

    def helper(params, x):
        return mt.inner_step(torch.nn.Linear(1, 1), params, x, x[:, :0], 0.1)  # shape error inside metatut/torch

    with pytest.raises(CheckFailed) as info:
        check_inner_step(deep)
    shown = _shown_in_jupyter(info.value)
    frames = [line for line in shown if line.startswith('  File "')]
    assert [f.rsplit(", in ", 1)[1] for f in frames] == ["deep", "helper"], shown
    assert shown[1].startswith("Hint: ")


def test_plain_python_traceback_is_cut_to_the_checker_entry():
    with pytest.raises(CheckFailed) as info:
        check_inner_step(_wrong_sign)
    frames = traceback.extract_tb(info.value.__traceback__)
    inside = [f for f in frames if str(Path(f.filename).resolve()).startswith(str(METATUT))]
    assert len(inside) == 1 and inside[0].name == "run", frames  # only the checker's entry point


@pytest.mark.parametrize("name", sorted(ALL_CHECKERS))
def test_fast_and_leaves_global_state_alone(name, capsys):
    check, solution = ALL_CHECKERS[name]
    check(solution)  # warm up
    rng, grad_mode = torch.get_rng_state(), torch.is_grad_enabled()
    start = time.perf_counter()
    check(solution)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled() == grad_mode


# ------------------------------------------------------------------------------ 1. summed task loss
def _residual(f, params, x, y):
    return f(params, x) - y


SUMMED_MISTAKES = {
    "mean over tasks": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).mean(), "3x too small: sum over tasks"),
    "sum over shots": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).sum(), "5x too large: average over shots"),
    "sum shots, mean tasks": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).sum((1, 2)).mean(),
                              "other way round"),
    "absolute error": (lambda f, p, x, y: _residual(f, p, x, y).abs().mean((1, 2)).sum(), "absolute error"),
    "RMSE per task": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).mean((1, 2)).sqrt().sum(), "square root"),
    "one loss per task": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).mean((1, 2)), "one loss per task"),
    ".item()": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).mean((1, 2)).sum().item(), ".item()"),
    "detached": (lambda f, p, x, y: (_residual(f, p, x, y) ** 2).mean((1, 2)).sum().detach(),
                 "not connected to params"),
}


@pytest.mark.parametrize("mistake", sorted(SUMMED_MISTAKES))
def test_summed_task_loss_mistakes(mistake):
    fn, phrase = SUMMED_MISTAKES[mistake]
    _fails_with(check_summed_task_loss, fn, phrase)


def test_summed_task_loss_reports_the_numbers():
    message = _fails_with(check_summed_task_loss, SUMMED_MISTAKES["mean over tasks"][0], "Hint:")
    assert "expected" in message and "got" in message


# ------------------------------------------------------------------------------------ 2. inner step
def _grads(f, params, x, y, create_graph, reduction="mean"):
    loss = F.mse_loss(f(params, x), y, reduction=reduction)
    return torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)


def _wrong_sign(f, params, x, y, inner_lr, create_graph):
    grads = _grads(f, params, x, y, create_graph)
    return {k: p + inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


def _always_first_order(f, params, x, y, inner_lr, create_graph):
    return inner_step(f, params, x, y, inner_lr, False)


def _always_second_order(f, params, x, y, inner_lr, create_graph):
    return inner_step(f, params, x, y, inner_lr, True)


def _in_place_no_grad(f, params, x, y, inner_lr, create_graph):
    grads = _grads(f, params, x, y, create_graph)
    with torch.no_grad():
        for p, g in zip(params.values(), grads, strict=True):
            p -= inner_lr * g
    return dict(params)


def _in_place_leaf(f, params, x, y, inner_lr, create_graph):
    grads = _grads(f, params, x, y, create_graph)
    for p, g in zip(params.values(), grads, strict=True):
        p -= inner_lr * g  # autograd refuses: a leaf that requires grad
    return params


def _assigns_into_params(f, params, x, y, inner_lr, create_graph):
    grads = _grads(f, params, x, y, create_graph)
    for (k, p), g in zip(list(params.items()), grads, strict=True):
        params[k] = p - inner_lr * g
    return params


def _no_inner_lr(f, params, x, y, inner_lr, create_graph):
    return inner_step(f, params, x, y, 1.0, create_graph)


def _summed_squared_error(f, params, x, y, inner_lr, create_graph):
    grads = _grads(f, params, x, y, create_graph, reduction="sum")
    return {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


def _detached_result(f, params, x, y, inner_lr, create_graph):
    return {k: v.detach() for k, v in inner_step(f, params, x, y, inner_lr, create_graph).items()}


def _detached_when_first_order(f, params, x, y, inner_lr, create_graph):
    out = inner_step(f, params, x, y, inner_lr, create_graph)
    return out if create_graph else {k: v.detach() for k, v in out.items()}


def _theta_detached(f, params, x, y, inner_lr, create_graph):
    grads = _grads(f, params, x, y, create_graph)
    return {k: p.detach() - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


def _rewrapped(f, params, x, y, inner_lr, create_graph):
    out = inner_step(f, params, x, y, inner_lr, create_graph)
    return {k: v.detach().clone().requires_grad_() for k, v in out.items()}


def _returns_list(f, params, x, y, inner_lr, create_graph):
    return list(inner_step(f, params, x, y, inner_lr, create_graph).values())


def _fixed_lr(f, params, x, y, inner_lr, create_graph):
    return inner_step(f, params, x, y, 0.1, create_graph)


def _fixed_shots(f, params, x, y, inner_lr, create_graph):
    loss = ((f(params, x) - y) ** 2).sum() / 5   # five shots, always
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


def _fixed_shots_view(f, params, x, y, inner_lr, create_graph):
    return inner_step(f, params, x.view(5, 1), y.view(5, 1), inner_lr, create_graph)


INNER_MISTAKES = {
    "inner_lr hard-coded to 0.1": (_fixed_lr, "inner_lr is 0.037 here"),
    "shot count hard-coded (divides by 5)": (_fixed_shots, "divided the summed squared error by 5"),
    "shot count hard-coded (view(5, 1))": (_fixed_shots_view, "raised RuntimeError"),
    "wrong sign": (_wrong_sign, "wrong sign"),
    "ignores create_graph (always False)": (_always_first_order, "did you pass create_graph=True"),
    "ignores create_graph (always True)": (_always_second_order, "create_graph=create_graph"),
    "in place under no_grad": (_in_place_no_grad, "modified params['0.weight'] in place"),
    "in place on a leaf": (_in_place_leaf, "do not modify params in place"),
    "assigns into params": (_assigns_into_params, "replaced params['0.weight']"),
    "no inner_lr": (_no_inner_lr, "multiply the gradient by inner_lr"),
    "summed squared error": (_summed_squared_error, "5x too large"),
    "detached result": (_detached_result, "not connected to params"),
    "detached when first order": (_detached_when_first_order, "must still depend on theta"),
    "theta detached": (_theta_detached, "first term theta is missing"),
    "returns a list": (_returns_list, "expected a dict"),
    "re-wrapped leaves": (_rewrapped, "does not depend on params"),
}


@pytest.mark.parametrize("mistake", sorted(INNER_MISTAKES))
def test_inner_step_mistakes(mistake):
    fn, phrase = INNER_MISTAKES[mistake]
    _fails_with(check_inner_step, fn, phrase)


def _reversed_keys(f, params, x, y, inner_lr, create_graph):
    out = inner_step(f, params, x, y, inner_lr, create_graph)
    return {k: out[k] for k in reversed(list(out))}


def _manual_mean(f, params, x, y, inner_lr, create_graph):
    loss = ((f(params, x) - y) ** 2).sum() / x.shape[0]
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


@pytest.mark.parametrize("variant", [_reversed_keys, _manual_mean])
def test_inner_step_accepts_correct_variants(variant, capsys):
    check_inner_step(variant)
    assert capsys.readouterr().out.startswith("✔ check_inner_step passed")


def test_inner_step_first_order_hint_names_create_graph():
    message = _fails_with(check_inner_step, _always_first_order, "the value matches but the gradient")
    assert "torch.autograd.grad" in message


# ------------------------------------------------------------------------------------- 3. MAML loss
def _maml(f, params, batch, inner_lr, *, create_graph=True, reduce=torch.mean):
    losses = []
    for t in range(batch.num_tasks):
        grads = _grads(f, params, batch.support_x[t], batch.support_y[t], create_graph)
        adapted = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
        losses.append(F.mse_loss(f(adapted, batch.query_x[t]), batch.query_y[t]))
    return reduce(torch.stack(losses))


def _first_order(f, params, batch, inner_lr):
    return _maml(f, params, batch, inner_lr, create_graph=False)


def _detached_inner_gradient(f, params, batch, inner_lr):
    losses = []
    for t in range(batch.num_tasks):
        grads = _grads(f, params, batch.support_x[t], batch.support_y[t], True)
        adapted = {k: p - inner_lr * g.detach() for (k, p), g in zip(params.items(), grads, strict=True)}
        losses.append(F.mse_loss(f(adapted, batch.query_x[t]), batch.query_y[t]))
    return torch.stack(losses).mean()


def _swapped(f, params, batch, inner_lr):
    return _maml(f, params, batch.swapped(), inner_lr)


def _no_adaptation(f, params, batch, inner_lr):
    return F.mse_loss(f(params, batch.query_x), batch.query_y)


def _scored_on_support(f, params, batch, inner_lr):
    return _maml(f, params, mt.TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y),
                 inner_lr)


def _shared_step(f, params, batch, inner_lr):
    grads = _grads(f, params, batch.support_x, batch.support_y, True)
    adapted = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
    return F.mse_loss(f(adapted, batch.query_x), batch.query_y)


MAML_MISTAKES = {
    "inner_lr hard-coded to 0.1": (lambda f, p, b, lr: _maml(f, p, b, 0.1), "fixed inner step size 0.1"),
    "first order (create_graph=False)": (_first_order, "first-order meta-gradient"),
    "first order (detached inner gradient)": (_detached_inner_gradient, "first-order meta-gradient"),
    "support and query swapped": (_swapped, "support and query are swapped"),
    "no adaptation": (_no_adaptation, "without adaptation"),
    "scored on the support set": (_scored_on_support, "evaluate them on the query set"),
    "sum over tasks": (lambda f, p, b, lr: _maml(f, p, b, lr, reduce=torch.sum), "3x too large"),
    "wrong sign": (lambda f, p, b, lr: _maml(f, p, b, -lr), "wrong sign"),
    "one shared step": (_shared_step, "adapt each task separately"),
    "one loss per task": (lambda f, p, b, lr: _maml(f, p, b, lr, reduce=lambda t: t), "one loss per task"),
}


@pytest.mark.parametrize("mistake", sorted(MAML_MISTAKES))
def test_maml_loss_mistakes(mistake):
    fn, phrase = MAML_MISTAKES[mistake]
    _fails_with(check_maml_loss, fn, phrase)


def test_maml_loss_accepts_a_correct_variant(capsys):
    check_maml_loss(lambda f, p, b, lr: _maml(f, p, b, lr, reduce=lambda t: t.sum() / b.num_tasks))
    assert capsys.readouterr().out.startswith("✔ check_maml_loss passed")


def test_maml_loss_first_order_value_matches_but_gradient_does_not():
    message = _fails_with(check_maml_loss, _first_order, "the value matches but the meta-gradient does not")
    assert "create_graph=True" in message


def test_maml_loss_mutating_the_batch_fails():
    def mutates(f, params, batch, inner_lr):
        loss = maml_loss(f, params, batch, inner_lr)
        batch.query_y.mul_(2.0)
        return loss
    _fails_with(check_maml_loss, mutates, "modified the batch['query_y'] in place")
