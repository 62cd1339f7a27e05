r"""Checkers for the exercises of course notebook 04 (the MAML family), in the style of :mod:`metatut.checks`.

::

    from metatut.checks_family import check_reptile_update, check_meta_sgd_inner_step
    check_reptile_update(reptile_update)            # ✔ check_reptile_update passed: ...
    check_meta_sgd_inner_step(meta_sgd_inner_step)  # ✔ check_meta_sgd_inner_step passed: ...

The exercise functions:

* ``reptile_update(params, adapted, epsilon)``: ``params`` a dict ``{name: tensor}`` (θ), ``adapted`` a
  dict ``{name: [tasks, *shape]}`` (each task's adapted parameters θ'_t, as :func:`metatut.adapt`
  returns them) -> the new dict :math:`\theta + \varepsilon(\frac1T\sum_t \theta'_t - \theta)`;
* ``meta_sgd_inner_step(f, params, alphas, x, y)``: one Meta-SGD inner step on one task,
  :math:`\theta' = \theta - \alpha \odot \nabla_\theta L_S(\theta)` with ``alphas`` a dict of tensors shaped
  like ``params``; the result must be differentiable with respect to both θ and α.

A mistake raises :class:`metatut.checks.CheckFailed` with a hint; success prints exactly one line.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import functional
from .checks import (
    _DTYPE,
    CheckFailed,
    _call,
    _checker,
    _close,
    _expect_param_dict,
    _expect_unchanged,
    _fail,
    _first_match,
    _fitted_step_hint,
    _fixture,
    _flat,
    _mismatch,
    _mse_grad,
    _projection,
    _snapshot,
)
from ..models import Params

__all__ = ["CheckFailed", "check_reptile_update", "check_meta_sgd_inner_step"]


# ------------------------------------------------------------------------------------ Reptile update
def _reptile_fixture(seed: int, tasks: int):
    """theta (a 1-16-16-1 MLP's parameters, float64) and per-task adapted parameters from 3 SGD steps."""
    fx = _fixture(seed, tasks, 5, 5)
    theta = {k: v.detach().clone() for k, v in fx.params.items()}
    adapted = functional.adapt(fx.model, theta, fx.batch.support_x, fx.batch.support_y, inner_lr=0.05, steps=3,
                               first_order=True, vectorize=False)
    return theta, {k: v.detach() for k, v in adapted.items()}


@_checker
def check_reptile_update(fn: Callable) -> None:
    r"""Check ``fn(params, adapted, epsilon)`` = :math:`\theta + \varepsilon\,(\frac1T\sum_t\theta'_t - \theta)`.

    ``params``: ``{name: tensor}``; ``adapted``: ``{name: [tasks, *shape]}``; ``epsilon``: float. The
    result must be a new dict with the keys (in any order) and shapes of ``params``; the inputs must not be
    modified.
    Reference: the update that :func:`metatut.reptile_loss` with ``torch.optim.SGD(lr=epsilon)`` performs.
    """
    check = "check_reptile_update"
    cases = ((0, 4, 0.3), (1, 3, 1.0))
    for seed, tasks, eps in cases:
        params, adapted = _reptile_fixture(seed, tasks)
        before_params, before_adapted = _snapshot(params), _snapshot(adapted)
        out = _call(check, fn, params, adapted, eps)
        _expect_unchanged(check, "params", params, before_params)
        _expect_unchanged(check, "adapted", adapted, before_adapted)
        if out is params:
            raise _fail(check, "you returned the params dict itself.",
                        "Hint: return a NEW dict {name: theta + epsilon * (mean_t theta'_t - theta)}.")
        out = _expect_param_dict(check, out, params, "{k: p + epsilon * (adapted[k].mean(0) - p) ...}")

        mean = {k: adapted[k].mean(0) for k in params}
        reference = {k: params[k] + eps * (mean[k] - params[k]) for k in params}
        got, expected = _flat(out.values()), _flat(reference.values())
        if not _close(got, expected):
            total = {k: adapted[k].sum(0) for k in params}
            candidates = [
                ({k: params[k] - eps * (mean[k] - params[k]) for k in params},
                 "wrong direction: Reptile moves theta TOWARDS the adapted parameters, "
                 "theta + epsilon * (mean_t theta'_t - theta), not away from them."),
                ({k: params[k] + eps * (total[k] - params[k]) for k in params},
                 f"you summed the {tasks} tasks' adapted parameters: average them, adapted[k].mean(0)."),
                ({k: params[k] + eps * (total[k] - tasks * params[k]) for k in params},
                 f"your step is {tasks}x too large: average the differences over tasks (mean), not sum."),
                (mean, "you forgot epsilon (or returned the average of the adapted parameters): Reptile moves "
                       "only a fraction epsilon of the way there, theta + epsilon * (mean_t theta'_t - theta)."),
                ({k: eps * (mean[k] - params[k]) for k in params},
                 "you returned the step epsilon * (mean - theta); add it to theta."),
                ({k: params[k] + eps * (adapted[k][-1] - params[k]) for k in params},
                 "you used only the last task's adapted parameters: average over all tasks (dim 0)."),
                ({k: params[k] + eps * (adapted[k][0] - params[k]) for k in params},
                 "you used only the first task's adapted parameters: average over all tasks (dim 0)."),
                (params, "theta is unchanged: apply the step, theta + epsilon * (mean_t theta'_t - theta)."),
            ]
            hint = _first_match(got, [(_flat(c.values()), h) for c, h in candidates]) or (
                "new theta = theta + epsilon * (adapted[k].mean(0) - theta) for each parameter k.")
            raise _mismatch(check, got, expected, f"the updated parameters are wrong (epsilon={eps}, "
                                                  f"{tasks} tasks).", f"Hint: {hint}")
    print(f"✔ {check} passed: theta + epsilon * (mean over tasks of theta' - theta) matches the reference "
          f"on {len(cases)} cases; inputs untouched.")


# ----------------------------------------------------------------------------- Meta-SGD inner step
def _alphas(params: Params, seed: int) -> Params:
    """Distinct per-scalar step sizes in [0.02, 0.2] (leaf tensors that require grad)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (0.02 + 0.18 * torch.rand(v.shape, generator=generator, dtype=_DTYPE)).requires_grad_()
            for k, v in params.items()}


@_checker
def check_meta_sgd_inner_step(fn: Callable) -> None:
    r"""Check ``fn(f, params, alphas, x, y)`` = :math:`\theta - \alpha \odot \nabla_\theta \mathrm{MSE}`.

    ``alphas`` has the keys and shapes of ``params`` (one step size per scalar parameter). The result
    must be a new dict with the same keys and shapes, differentiable with respect to ``params`` (second
    order: the inner gradient stays in the graph) and to ``alphas``. Two tasks with 5 and 3 shots, so that
    the shot count may not be hard-coded. Reference: :func:`metatut.inner_step` with ``inner_lr=alphas``.
    """
    check = "check_meta_sgd_inner_step"
    cases = ((0, 5), (1, 3))   # seed, shots
    for seed, shots in cases:
        fx = _fixture(seed, 1, shots, shots)
        f, params = fx.f, fx.params
        x, y = fx.batch.support_x[0], fx.batch.support_y[0]
        alphas = _alphas(params, seed=seed + 2)
        before_params, before_alphas = _snapshot(params), _snapshot(alphas)
        before_xy = _snapshot({"x": x, "y": y})
        out = _call(check, fn, f, params, alphas, x, y)
        _expect_unchanged(check, "params", params, before_params)
        _expect_unchanged(check, "alphas", alphas, before_alphas)
        _expect_unchanged(check, "the data", {"x": x, "y": y}, before_xy)
        if out is params:
            raise _fail(check, "you returned the params dict itself.",
                        "Hint: return a NEW dict {name: p - alphas[name] * g}; leave params untouched.")
        out = _expect_param_dict(check, out, params, "{k: p - alphas[k] * g ...}")

        reference = functional.inner_step(fx.model, params, x, y, alphas, create_graph=True)
        got, expected = _flat(out.values()), _flat(reference.values())
        if not _close(got, expected):
            g = _mse_grad(f, params, x, y)
            theta = {k: p.detach() for k, p in params.items()}
            a = {k: v.detach() for k, v in alphas.items()}
            mean_alpha = torch.cat([v.reshape(-1) for v in a.values()]).mean()
            grad = dict(zip(params, g, strict=True))
            candidates = [
                ({k: theta[k] + a[k] * grad[k] for k in params},
                 "wrong sign: step down the gradient, theta' = theta - alpha * grad."),
                ({k: theta[k] - a[k].mean() * grad[k] for k in params},
                 "you used one step size per tensor (alpha.mean()); Meta-SGD has one per scalar parameter: "
                 "multiply elementwise, alphas[k] * g."),
                ({k: theta[k] - mean_alpha * grad[k] for k in params},
                 "you used one scalar step size for everything; Meta-SGD multiplies elementwise: alphas[k] * g."),
                ({k: theta[k] - grad[k] for k in params}, "you forgot to multiply the gradient by alphas[k]."),
                ({k: theta[k] - a[k] for k in params}, "you subtracted alpha itself: theta' = theta - alpha * grad."),
                ({k: a[k] * grad[k] for k in params},
                 "you returned the step alpha * grad; return theta - alpha * grad."),
                (theta, "theta' equals theta: apply the step, theta' = theta - alphas[k] * grad."),
            ]
            step = _flat(a[k] * grad[k] for k in params)
            hint = (_first_match(got, [(_flat(c.values()), h) for c, h in candidates])
                    or _fitted_step_hint(got, _flat(theta.values()), step, 1.0, shots, name="the scale of alpha")
                    or "theta'[k] = params[k] - alphas[k] * (gradient of F.mse_loss(f(params, x), y) w.r.t. "
                       "params[k]).")
            raise _mismatch(check, got, expected, f"theta' is wrong ({shots} shots).", f"Hint: {hint}")

        # Probe s = sum_k <w_k, theta'_k>: its gradients w.r.t. theta and alpha must match the reference.
        w = _projection(params, seed=seed + 3)
        probe = sum((out[k] * w[k]).sum() for k in params)
        ref_probe = sum((reference[k] * w[k]).sum() for k in params)
        leaves = [*params.values(), *alphas.values()]
        n = len(params)
        if not isinstance(probe, Tensor) or not probe.requires_grad:
            raise _fail(check, "theta' is not connected to params or alphas: no gradient can flow through the step.",
                        "Hint: no torch.no_grad(), .detach() or .data; compute params[k] - alphas[k] * g from the "
                        "tensors themselves, with torch.autograd.grad(..., create_graph=True).")
        grads = torch.autograd.grad(probe, leaves, allow_unused=True)
        grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(leaves, grads, strict=True)]
        expected_grads = torch.autograd.grad(ref_probe, leaves)
        got_alpha, exp_alpha = _flat(grads[n:]), _flat(expected_grads[n:])
        if not _close(got_alpha, exp_alpha):
            if got_alpha.abs().max() == 0:
                hint = ("no gradient reaches alphas: they were detached (or wrapped in float()/.item()). Meta-SGD "
                        "meta-learns alpha, so use alphas[k] itself in theta - alphas[k] * g.")
            else:
                hint = ("d theta'/d alpha must be -grad: use theta' = theta - alphas[k] * g with alphas[k] "
                        "undetached.")
            raise _mismatch(check, got_alpha, exp_alpha, "the value matches but the gradient with respect to "
                                                         "alphas does not.", f"Hint: {hint}")
        got_theta, exp_theta = _flat(grads[:n]), _flat(expected_grads[:n])
        if not _close(got_theta, exp_theta):
            first_order = _flat(w.values())
            if _close(got_theta, first_order):
                hint = ("the inner gradient is treated as a constant (first order): pass create_graph=True to "
                        "torch.autograd.grad so that d theta'/d theta = I - alpha * H.")
            elif _close(got_theta, exp_theta - first_order):
                hint = ("the path through the first term theta is missing: don't detach params[k] in "
                        "params[k] - alpha * g.")
            else:
                hint = ("build theta' from params and torch.autograd.grad(F.mse_loss(f(params, x), y), ..., "
                        "create_graph=True); detach nothing.")
            raise _mismatch(check, got_theta, exp_theta, "the value matches but the gradient with respect to "
                                                         "params does not.", f"Hint: {hint}")
    print(f"✔ {check} passed: theta' = theta - alpha * grad matches the reference, elementwise (5 and 3 shots); "
          "differentiable w.r.t. params (second order) and alphas; inputs untouched.")
