"""Pluggable inner optimisers (issue "metatut as a library researchers adopt", section 3): SGD, SGD with momentum,
Adam and TorchOpt transformations in the inner loop, each against an independent reference in float64."""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metatut as mt
from test_functional import closed_form_meta_gradient, linear_model

F64 = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def smooth_setup(tasks=4, shots=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 1)).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(tasks, shots, shots, generator=mt.make_generator(seed + 1), dtype=F64)
    return model, params, batch


# ---------------------------------------------------------------------------------- hand-written references
def sgd_ref(lr):
    def step(p, g, s, k):
        return p - lr * g, s
    return step, lambda p: None


def momentum_ref(lr, mu, nesterov):
    def step(p, g, buf, k):
        buf = mu * buf + g
        return p - lr * (g + mu * buf if nesterov else buf), buf
    return step, torch.zeros_like


def adam_ref(lr, b1=0.9, b2=0.999, eps=1e-8):
    def step(p, g, s, k):
        m, v = b1 * s[0] + (1 - b1) * g, b2 * s[1] + (1 - b2) * g ** 2
        mhat, vhat = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))
        return p - lr * mhat / (vhat.sqrt() + eps), (m, v)
    return step, lambda p: (torch.zeros_like(p), torch.zeros_like(p))


CASES = {
    "sgd": (lambda: mt.inner_sgd(0.05), lambda: sgd_ref(0.05), lambda ps: torch.optim.SGD(ps, lr=0.05)),
    "momentum": (lambda: mt.inner_sgd_momentum(0.05, momentum=0.8), lambda: momentum_ref(0.05, 0.8, False),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8)),
    "nesterov": (lambda: mt.inner_sgd_momentum(0.05, momentum=0.8, nesterov=True),
                 lambda: momentum_ref(0.05, 0.8, True),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True)),
    "adam": (lambda: mt.inner_adam(0.02, betas=(0.8, 0.95), eps=1e-6),
             lambda: adam_ref(0.02, 0.8, 0.95, 1e-6),
             lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.95), eps=1e-6)),
}


def reference_adaptation(model, params, batch, t, make_ref, steps):
    """One task's φ_K by the hand-written update rule (per tensor, per step)."""
    step, init = make_ref()
    phi = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    state = {k: init(v) for k, v in phi.items()}
    for k in range(steps):
        loss = F.mse_loss(functional_call(model, phi, (batch.support_x[t],)), batch.support_y[t])
        grads = torch.autograd.grad(loss, list(phi.values()))
        new = {}
        for (name, p), g in zip(phi.items(), grads, strict=True):
            value, state[name] = step(p.detach(), g, state[name], k)
            new[name] = value.requires_grad_()
        phi = new
    return {k: v.detach() for k, v in phi.items()}


def torch_optim_adaptation(model, params, batch, t, make_optim, steps):
    """The same with torch.optim's implementation (in place, first order): a second, independent reference."""
    phi = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt = make_optim(list(phi.values()))
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(functional_call(model, phi, (batch.support_x[t],)), batch.support_y[t]).backward()
        opt.step()
    return {k: v.detach() for k, v in phi.items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("vectorize", [True, False])
def test_adapted_parameters_equal_hand_written_and_torch_optim_references(name, vectorize):
    make_opt, make_ref, make_optim = CASES[name]
    model, params, batch = smooth_setup()
    adapted = mt.adapt(model, params, batch.support_x, batch.support_y, inner_optimizer=make_opt(), steps=4,
                       vectorize=vectorize)
    for t in range(batch.num_tasks):
        ref = reference_adaptation(model, params, batch, t, make_ref, 4)
        opt = torch_optim_adaptation(model, params, batch, t, make_optim, 4)
        for k in params:
            torch.testing.assert_close(adapted[k][t].detach(), ref[k], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(adapted[k][t].detach(), opt[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", [True, False])
def test_inner_sgd_equals_the_closed_form_maml_gradient_on_linear_regression(steps, vectorize):
    dim = 3
    model, params = linear_model(dim)
    batch = mt.LinearTasks(dim=dim, noise_std=0.1).sample(6, 5, 7, generator=mt.make_generator(1), dtype=F64)
    loss = mt.maml_loss(model, params, batch, inner_optimizer=mt.inner_sgd(0.05), inner_steps=steps,
                        vectorize=vectorize)
    got = flat(torch.autograd.grad(loss, [params["weight"], params["bias"]]))
    theta = torch.cat([params["weight"].detach().view(-1), params["bias"].detach()]).view(-1, 1)
    expected = closed_form_meta_gradient(theta, batch, 0.05, steps).view(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam"])
def test_second_order_meta_gradient_matches_central_differences(name):
    make_opt = CASES[name][0]
    model, params, batch = smooth_setup(seed=2)
    names = list(params)
    theta = flat([params[k].detach() for k in names])

    def meta_loss(vector):
        p, i = {}, 0
        for k in names:
            p[k] = vector[i:i + params[k].numel()].view_as(params[k])
            i += params[k].numel()
        return mt.maml_loss(model, p, batch, inner_optimizer=make_opt(), inner_steps=3)

    v = theta.clone().requires_grad_()
    g = torch.autograd.grad(meta_loss(v), v)[0]
    first = flat(torch.autograd.grad(mt.maml_loss(model, params, batch, inner_optimizer=make_opt(), inner_steps=3,
                                                  first_order=True), list(params.values())))
    assert rel(first, g) > 1e-4          # the second-order terms matter here
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(5):
        d = torch.randn(theta.shape, generator=gen, dtype=F64)
        d /= d.norm()
        fd = (meta_loss(theta + 1e-6 * d) - meta_loss(theta - 1e-6 * d)).item() / 2e-6
        worst = max(worst, abs(fd - (g @ d).item()) / max(abs(fd), abs((g @ d).item()), 1e-8))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_equals_the_loop(name, first_order):
    make_opt = CASES[name][0]
    model, params, batch = smooth_setup(tasks=6)
    out = {}
    for vectorize in (True, False):
        loss = mt.maml_loss(model, params, batch, inner_optimizer=make_opt(), inner_steps=3, first_order=first_order,
                            vectorize=vectorize)
        out[vectorize] = (loss, flat(torch.autograd.grad(loss, list(params.values()))))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-13, atol=0)
    assert rel(out[True][1], out[False][1]) < 1e-12


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(name):
    make_opt = CASES[name][0]
    model, params, batch = smooth_setup()
    loss = mt.maml_loss(model, params, batch, inner_optimizer=make_opt(), inner_steps=3, first_order=True)
    got = torch.autograd.grad(loss, list(params.values()))
    adapted = mt.adapt(model, params, batch.support_x, batch.support_y, inner_optimizer=make_opt(), steps=3,
                       first_order=True)
    expected = [torch.zeros_like(p) for p in params.values()]
    for t in range(batch.num_tasks):
        at = {k: v[t].detach().requires_grad_() for k, v in adapted.items()}
        q = F.mse_loss(functional_call(model, at, (batch.query_x[t],)), batch.query_y[t])
        for e, g in zip(expected, torch.autograd.grad(q, list(at.values())), strict=True):
            e += g / batch.num_tasks
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_meta_sgd_through_sgd_learned_equals_inner_lr_learned():
    model, theta, batch = smooth_setup()
    params = {**theta, **mt.learned_inner_lrs(theta, init=0.03, steps=2)}
    a = mt.maml_loss(model, params, batch, inner_lr="learned", inner_steps=2)
    b = mt.maml_loss(model, params, batch, inner_optimizer=mt.inner_sgd("learned"), inner_steps=2)
    ga, gb = (flat(torch.autograd.grad(x, list(params.values()))) for x in (a, b))
    assert rel(gb, ga) < 1e-14 and gb.abs().sum() > 0
    # per-tensor rates as a dict, in momentum too
    rates = {k: 0.05 if k.endswith("bias") else 0.02 for k in theta}
    sgd = mt.maml_loss(model, theta, batch, inner_lr=rates)
    torch.testing.assert_close(mt.maml_loss(model, theta, batch, inner_optimizer=mt.inner_sgd(rates)), sgd,
                               rtol=0, atol=0)
    torch.testing.assert_close(mt.maml_loss(model, theta, batch, inner_optimizer=mt.inner_sgd_momentum(rates, 0.5)),
                               sgd, rtol=1e-14, atol=0)      # one step: momentum buffer = gradient


def test_options_curves_objectives_and_reptile_take_an_inner_optimizer():
    model, params, batch = smooth_setup()
    opt = mt.inner_adam(0.01)
    keyword = mt.maml_loss(model, params, batch, inner_optimizer=opt, inner_steps=2)
    options = mt.maml_loss(model, params, batch, options=mt.MetaOptions(inner_optimizer=opt, inner_steps=2))
    torch.testing.assert_close(keyword, options, rtol=0, atol=0)
    curve = mt.adaptation_curve(model, params, batch, inner_optimizer=opt, steps=2)
    torch.testing.assert_close(curve[:, 2].mean(), keyword.detach(), rtol=1e-12, atol=0)
    _, grads = mt.meta_gradient(mt.maml_objective(model, inner_optimizer=opt, inner_steps=2), params, batch)
    assert rel(flat(grads.values()), flat(torch.autograd.grad(keyword, list(params.values())))) < 1e-13
    assert mt.reptile_loss(model, params, batch, inner_optimizer=opt, inner_steps=2).shape == ()
    assert callable(mt.reptile_objective(model, inner_optimizer=opt))
    with pytest.raises(TypeError, match="inner_lr or inner_optimizer, not both"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, inner_optimizer=opt)
    with pytest.raises(TypeError, match="inner_optimizer must have init"):
        mt.maml_loss(model, params, batch, inner_optimizer="adam")
    with pytest.raises(TypeError, match="needs inner_lr"):
        mt.maml_loss(model, params, batch)
    with pytest.raises(ValueError, match="betas must lie in"):
        mt.inner_adam(0.1, betas=(1.0, 0.9))


# ------------------------------------------------------------------------------------------------ TorchOpt
class FakeTransformation(NamedTuple):
    """A GradientTransformation-like pair, as TorchOpt's: updates are added to the parameters."""

    init: object
    update: object


def fake_momentum(lr, mu):
    def init(params):
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def update(updates, state, *, params=None, inplace=True):
        assert inplace is False and params is not None
        buf = {k: mu * state[k] + g for k, g in updates.items()}
        return {k: -lr * b for k, b in buf.items()}, buf
    return FakeTransformation(init, update)


@pytest.mark.parametrize("vectorize", [True, False])
def test_gradient_transformation_adapter_equals_the_built_in_optimizer(vectorize):
    model, params, batch = smooth_setup()
    a = mt.maml_loss(model, params, batch, inner_optimizer=fake_momentum(0.05, 0.8), inner_steps=3,
                     vectorize=vectorize)
    b = mt.maml_loss(model, params, batch, inner_optimizer=mt.inner_sgd_momentum(0.05, 0.8), inner_steps=3,
                     vectorize=vectorize)
    assert isinstance(mt.engine.as_inner_optimizer(fake_momentum(0.1, 0.5)), mt.engine.TorchOptAdapter)
    assert rel(flat(torch.autograd.grad(a, list(params.values()))),
               flat(torch.autograd.grad(b, list(params.values())))) < 1e-13


def test_torchopt_adam_equals_inner_adam():
    torchopt = pytest.importorskip("torchopt")
    model, params, batch = smooth_setup()
    a = mt.maml_loss(model, params, batch, inner_optimizer=torchopt.adam(0.02), inner_steps=3, vectorize=False)
    b = mt.maml_loss(model, params, batch, inner_optimizer=mt.inner_adam(0.02), inner_steps=3, vectorize=False)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
