"""The checkers of exercise 04 (metatut.checks_family): the solution passes; a stub and typical mistakes fail.

The reference solutions are the code cells of the solution notebooks, taken from the exercise sources with
the generator's own parser (exercises/generate.py), as in tests/test_checks.py.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from metatut import checks_family
from metatut.checks_family import check_meta_sgd_inner_step, check_reptile_update
from exercise_support import fails_with as _fails_with
from exercise_support import solution as _solution

reptile_update = _solution("04_reptile_update", "reptile_update")
meta_sgd_inner_step = _solution("04_meta_sgd_inner_step", "meta_sgd_inner_step")

CHECKERS = {
    "check_reptile_update": (check_reptile_update, reptile_update),
    "check_meta_sgd_inner_step": (check_meta_sgd_inner_step, meta_sgd_inner_step),
}


# ------------------------------------------------------------------------------------------- general
def test_exports():
    assert set(checks_family.__all__) == {"CheckFailed", "check_reptile_update", "check_meta_sgd_inner_step"}


# ------------------------------------------------------------------------------------- Reptile update
def _mean(adapted, k):
    return adapted[k].mean(0)


def _in_place(params, adapted, epsilon):
    for k, p in params.items():
        p += epsilon * (adapted[k].mean(0) - p)
    return dict(params)


REPTILE_MISTAKES = {
    "wrong direction (theta - theta')": (lambda p, a, e: {k: v - e * (_mean(a, k) - v) for k, v in p.items()},
                                         "wrong direction"),
    "sum over tasks": (lambda p, a, e: {k: v + e * (a[k].sum(0) - v) for k, v in p.items()}, "average them"),
    "summed differences": (lambda p, a, e: {k: v + e * (a[k] - v).sum(0) for k, v in p.items()},
                           "4x too large"),
    "forgot epsilon": (lambda p, a, e: {k: v + (_mean(a, k) - v) for k, v in p.items()}, "forgot epsilon"),
    "returns the mean": (lambda p, a, e: {k: _mean(a, k) for k in p}, "fraction epsilon of the way"),
    "returns the step": (lambda p, a, e: {k: e * (_mean(a, k) - v) for k, v in p.items()}, "add it to theta"),
    "last task only": (lambda p, a, e: {k: v + e * (a[k][-1] - v) for k, v in p.items()}, "last task"),
    "no task average": (lambda p, a, e: {k: v + e * (a[k] - v) for k, v in p.items()}, "one value per task"),
    "a key missing": (lambda p, a, e: {k: v for k, v in list(reptile_update(p, a, e).items())[1:]},
                      "keep the same names as params"),
    "in place": (_in_place, "modified params['0.weight'] in place"),
    "returns a list": (lambda p, a, e: list(reptile_update(p, a, e).values()), "expected a dict"),
}


@pytest.mark.parametrize("mistake", sorted(REPTILE_MISTAKES))
def test_reptile_update_mistakes(mistake):
    fn, phrase = REPTILE_MISTAKES[mistake]
    _fails_with(check_reptile_update, fn, phrase)


@pytest.mark.parametrize("order", ["reversed", "sorted"])
def test_reptile_update_accepts_any_key_order(order, capsys):
    def other_order(params, adapted, epsilon):
        keys = reversed(list(params)) if order == "reversed" else sorted(params)
        return {k: params[k] + epsilon * (adapted[k].mean(0) - params[k]) for k in keys}
    check_reptile_update(other_order)
    assert capsys.readouterr().out.startswith("✔ check_reptile_update passed")


def test_reptile_update_mutating_adapted_fails():
    def mutates(params, adapted, epsilon):
        out = reptile_update(params, adapted, epsilon)
        adapted["0.bias"].zero_()
        return out
    _fails_with(check_reptile_update, mutates, "modified adapted['0.bias'] in place")


# ----------------------------------------------------------------------------- Meta-SGD inner step
def _grads(f, params, x, y, create_graph=True):
    loss = F.mse_loss(f(params, x), y)
    return torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)


def _step(f, params, alphas, x, y, *, sign=-1.0, rate=None, create_graph=True, detach_alpha=False,
          detach_theta=False):
    out = {}
    for (k, p), g in zip(params.items(), _grads(f, params, x, y, create_graph), strict=True):
        a = alphas[k] if rate is None else rate(alphas[k])
        a = a.detach() if detach_alpha else a
        out[k] = (p.detach() if detach_theta else p) + sign * a * g
    return out


META_SGD_MISTAKES = {
    "wrong sign": (lambda f, p, a, x, y: _step(f, p, a, x, y, sign=1.0), "wrong sign"),
    "one step size per tensor": (lambda f, p, a, x, y: _step(f, p, a, x, y, rate=lambda t: t.mean()),
                                 "one step size per tensor"),
    "one scalar step size": (lambda f, p, a, x, y: _step(f, p, {k: torch.tensor(0.1, dtype=torch.float64)
                                                                for k in a}, x, y),
                             "theta' is wrong"),
    "alpha detached": (lambda f, p, a, x, y: _step(f, p, a, x, y, detach_alpha=True), "no gradient reaches alphas"),
    "alpha rebuilt from its data": (lambda f, p, a, x, y: _step(f, p, a, x, y, rate=lambda t: torch.tensor(t.tolist())),
                                    "no gradient reaches alphas"),
    "first order (create_graph=False)": (lambda f, p, a, x, y: _step(f, p, a, x, y, create_graph=False),
                                         "create_graph=True"),
    "theta detached": (lambda f, p, a, x, y: _step(f, p, a, x, y, detach_theta=True), "first term theta"),
    "no step size": (lambda f, p, a, x, y: _step(f, p, a, x, y, rate=lambda t: torch.ones_like(t)),
                     "forgot to multiply"),
    "fully detached": (lambda f, p, a, x, y: {k: v.detach() for k, v in _step(f, p, a, x, y).items()},
                       "not connected"),
    "assigns into params": (lambda f, p, a, x, y: p.update(_step(f, p, a, x, y)) or p, "replaced params"),
    "shot count hard-coded (divides by 5)": (lambda f, p, a, x, y: _fixed_shots(f, p, a, x, y),
                                             "divided the summed squared error by 5, but this task has 3 shots"),
}


def _fixed_shots(f, params, alphas, x, y):
    loss = ((f(params, x) - y) ** 2).sum() / 5   # five shots, always
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return {k: p - alphas[k] * g for (k, p), g in zip(params.items(), grads, strict=True)}


@pytest.mark.parametrize("mistake", sorted(META_SGD_MISTAKES))
def test_meta_sgd_inner_step_mistakes(mistake):
    fn, phrase = META_SGD_MISTAKES[mistake]
    _fails_with(check_meta_sgd_inner_step, fn, phrase)


def test_meta_sgd_inner_step_accepts_any_key_order(capsys):
    def reversed_keys(f, params, alphas, x, y):
        out = meta_sgd_inner_step(f, params, alphas, x, y)
        return {k: out[k] for k in reversed(list(out))}
    check_meta_sgd_inner_step(reversed_keys)
    assert capsys.readouterr().out.startswith("✔ check_meta_sgd_inner_step passed")


def test_meta_sgd_scalar_step_size_is_recognised():
    def scalar(f, params, alphas, x, y):
        flat = torch.cat([v.reshape(-1) for v in alphas.values()]).mean()
        return _step(f, params, {k: flat for k in alphas}, x, y)
    message = _fails_with(check_meta_sgd_inner_step, scalar, "one scalar step size")
    assert "elementwise" in message
