"""Correctness of the engine: every meta-gradient path against an independent reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metatut as mt
from metatut.functional import VMAP_VERIFIED_LAYERS

F64 = torch.float64


def linear_model(dim, dtype=F64, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1).to(dtype)
    return model, mt.init_params(model)


def closed_form_meta_gradient(theta, batch, alpha, steps):
    """MAML meta-gradient of the mean query MSE for a linear model, by hand.

    theta = [w; b] (dim + 1). For MSE on n examples, grad = (2/n) X^T (X theta - y), Hessian H = (2/n) X^T X,
    so each inner step is theta <- theta - alpha * grad and d theta_k / d theta = (I - alpha H)^k.
    """
    grads = []
    for t in range(batch.num_tasks):
        xs = torch.cat([batch.support_x[t], torch.ones(batch.shots, 1, dtype=F64)], 1)
        xq = torch.cat([batch.query_x[t], torch.ones(batch.query_shots, 1, dtype=F64)], 1)
        ys, yq = batch.support_y[t], batch.query_y[t]
        n, m = xs.shape[0], xq.shape[0]
        hessian = 2.0 / n * xs.T @ xs
        jac = torch.eye(theta.shape[0], dtype=F64)
        th = theta.clone()
        for _ in range(steps):
            th = th - alpha * (2.0 / n * xs.T @ (xs @ th - ys))
            jac = (torch.eye(theta.shape[0], dtype=F64) - alpha * hessian) @ jac
        query_grad = 2.0 / m * xq.T @ (xq @ th - yq)
        grads.append(jac.T @ query_grad)
    return torch.stack(grads).mean(0)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", [True, False])
def test_second_order_meta_gradient_matches_closed_form_on_linear_regression(steps, vectorize):
    dim = 3
    model, params = linear_model(dim)
    batch = mt.LinearTasks(dim=dim, noise_std=0.1).sample(6, 5, 7, generator=mt.make_generator(1), dtype=F64)
    alpha = 0.05
    loss = mt.maml_loss(model, params, batch, inner_lr=alpha, inner_steps=steps, vectorize=vectorize)
    g_w, g_b = torch.autograd.grad(loss, [params["weight"], params["bias"]])
    theta = torch.cat([params["weight"].detach().view(-1), params["bias"].detach()]).view(-1, 1)
    expected = closed_form_meta_gradient(theta, batch, alpha, steps).view(-1)
    got = torch.cat([g_w.view(-1), g_b.view(-1)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # the Hessian term matters here: first order gives a different answer
    fo = mt.maml_loss(model, params, batch, inner_lr=alpha, inner_steps=steps, first_order=True, vectorize=vectorize)
    fo_grad = torch.cat([g.view(-1) for g in torch.autograd.grad(fo, [params["weight"], params["bias"]])])
    assert (fo_grad - expected).abs().max() > 1e-4


def flat(params):
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def test_second_order_meta_gradient_matches_finite_differences_on_sinusoids():
    model = mt.mlp(hidden=(12, 12), seed=3).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(4, 10, 10, generator=mt.make_generator(2), dtype=F64)

    def meta_loss(vector):
        return mt.maml_loss(model, unflat(vector, params), batch, inner_lr=0.05, inner_steps=2)

    assert torch.autograd.gradcheck(meta_loss, (flat(params).detach().requires_grad_(),), eps=1e-6, atol=1e-6,
                                    rtol=1e-5)


def test_paper_mlp_meta_gradient_matches_finite_differences_along_random_directions():
    model = mt.mlp(seed=0).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(5, 10, 10, generator=mt.make_generator(4), dtype=F64)
    theta = flat(params).detach()
    loss = mt.maml_loss(model, params, batch, inner_lr=0.01)
    g = flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(5):
        d = torch.randn(theta.shape, generator=gen, dtype=F64)
        d /= d.norm()
        with torch.enable_grad():
            plus = mt.maml_loss(model, unflat(theta + eps * d, params), batch, inner_lr=0.01)
            minus = mt.maml_loss(model, unflat(theta - eps * d, params), batch, inner_lr=0.01)
        fd = (plus - minus).item() / (2 * eps)
        analytic = (g @ d).item()
        assert abs(fd - analytic) / max(abs(fd), abs(analytic), 1e-8) < 1e-6


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_vmap_path_matches_per_task_loop(dtype, rtol, atol, first_order, steps):
    model = mt.mlp(seed=1).to(dtype)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(25, 10, 10, generator=mt.make_generator(6), dtype=dtype)
    results = {}
    for vectorize in (True, False):
        loss = mt.maml_loss(model, params, batch, inner_lr=0.01, inner_steps=steps, first_order=first_order,
                            vectorize=vectorize)
        results[vectorize] = (loss, torch.autograd.grad(loss, list(params.values())))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=rtol, atol=atol)
    for a, b in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_auto_vectorize_uses_vmap_only_for_verified_layers():
    assert mt.can_vectorize(mt.mlp())
    assert not mt.can_vectorize(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)))
    assert all(isinstance(t, type) for t in VMAP_VERIFIED_LAYERS)


def test_first_order_gradient_equals_query_gradient_at_adapted_parameters():
    model = mt.mlp(seed=2).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(8, 10, 10, generator=mt.make_generator(7), dtype=F64)
    loss = mt.maml_loss(model, params, batch, inner_lr=0.02, inner_steps=3, first_order=True)
    got = torch.autograd.grad(loss, list(params.values()))
    adapted = mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=0.02, steps=3, first_order=True)
    expected = [torch.zeros_like(p) for p in params.values()]
    for t in range(batch.num_tasks):
        at = {k: v[t].detach().requires_grad_() for k, v in adapted.items()}
        q = F.mse_loss(mt.forward(model, at, batch.query_x[t]), batch.query_y[t])
        for e, g in zip(expected, torch.autograd.grad(q, list(at.values())), strict=True):
            e += g / batch.num_tasks
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_summed_task_loss_gradient_is_sum_of_per_task_gradients():
    model = mt.mlp(seed=3).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(6, 5, 5, generator=mt.make_generator(8), dtype=F64)
    loss = mt.summed_task_loss(model, params, batch, use="support")
    got = torch.autograd.grad(loss, list(params.values()))
    expected = [torch.zeros_like(p) for p in params.values()]
    for t in range(batch.num_tasks):
        lt = F.mse_loss(mt.forward(model, params, batch.support_x[t]), batch.support_y[t])
        for e, g in zip(expected, torch.autograd.grad(lt, list(params.values())), strict=True):
            e += g
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    mean = mt.summed_task_loss(model, params, batch, use="support", reduction="mean")
    torch.testing.assert_close(mean * batch.num_tasks, loss)


def test_zero_inner_steps_is_summed_loss_on_query_sets():
    model = mt.mlp(seed=4)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(5, 10, 10, generator=mt.make_generator(9))
    torch.testing.assert_close(mt.maml_loss(model, params, batch, inner_lr=0.1, inner_steps=0),
                               mt.summed_task_loss(model, params, batch, use="query", reduction="mean"))


def test_inner_step_matches_closed_form_and_does_not_mutate():
    model, params = linear_model(2)
    batch = mt.LinearTasks(dim=2).sample(1, 6, generator=mt.make_generator(10), dtype=F64)
    before = {k: v.detach().clone() for k, v in params.items()}
    new = mt.inner_step(model, params, batch.support_x[0], batch.support_y[0], 0.1)
    x = torch.cat([batch.support_x[0], torch.ones(6, 1, dtype=F64)], 1)
    theta = torch.cat([before["weight"].view(-1), before["bias"]]).view(-1, 1)
    expected = theta - 0.1 * (2 / 6 * x.T @ (x @ theta - batch.support_y[0]))
    torch.testing.assert_close(torch.cat([new["weight"].view(-1), new["bias"]]), expected.view(-1))
    for k in params:
        assert torch.equal(params[k].detach(), before[k])
    assert new["weight"].requires_grad and new["weight"].grad_fn is not None


def test_adapt_shapes_and_adaptation_curve_agree():
    model = mt.mlp(seed=5)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(7, 10, 10, generator=mt.make_generator(11))
    adapted = mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=0.01, steps=4)
    assert {k: tuple(v.shape) for k, v in adapted.items()} == {k: (7, *p.shape) for k, p in params.items()}
    curve = mt.adaptation_curve(model, params, batch, inner_lr=0.01, steps=4)
    assert curve.shape == (7, 5) and not curve.requires_grad
    after = torch.stack([F.mse_loss(mt.forward(model, {k: v[t] for k, v in adapted.items()}, batch.query_x[t]),
                                    batch.query_y[t]) for t in range(7)])
    torch.testing.assert_close(curve[:, 4], after.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mt.adaptation_curve(model, params, batch, inner_lr=0.01, steps=4, vectorize=False),
                               curve, rtol=1e-5, atol=1e-6)
    # a step on the support set lowers the support loss of every task (small step size)
    swapped = batch.swapped().swapped()
    assert torch.equal(swapped.support_x, batch.support_x)


def test_any_module_works_through_the_loop_path():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(1, 8)
            self.b = nn.Linear(8, 1)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))) + x

    model = Residual()
    # Since the engine split (issue section 1) a parameter-free container of verified layers is transparent:
    # the user's own module gets the vmap path, which equals the loop's.
    assert mt.can_vectorize(model)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(3, 5, 5, generator=mt.make_generator(12))
    loss = mt.maml_loss(model, params, batch, inner_lr=0.01)
    loop = mt.maml_loss(model, params, batch, inner_lr=0.01, vectorize=False)
    torch.testing.assert_close(loss, loop, rtol=1e-5, atol=1e-6)
    forced = mt.maml_loss(model, params, batch, inner_lr=0.01, vectorize=True)
    torch.testing.assert_close(forced, loop, rtol=1e-5, atol=1e-6)

    from test_engine_policy import Counting  # owns a buffer that its forward pass updates: vmap would update it once

    counting = Counting()
    params = mt.init_params(counting)
    assert not mt.can_vectorize(counting)
    with pytest.warns(mt.VectorizeWarning, match="Counting"):
        auto = mt.maml_loss(counting, params, batch, inner_lr=0.01)
    torch.testing.assert_close(auto, mt.maml_loss(counting, params, batch, inner_lr=0.01, vectorize=False))
    # forcing vmap on a module whose vmap path is not verified is refused, naming it (it once ran anyway)
    with pytest.raises(mt.VectorizeError, match=r"vectorize=True cannot run this model: its layers \['Counting'\]"):
        mt.maml_loss(counting, params, batch, inner_lr=0.01, vectorize=True)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    model = mt.mlp()
    params = mt.init_params(model)
    tasks = mt.SinusoidTasks()
    batch = tasks.sample(2, 5, generator=mt.make_generator(0))
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
        mt.maml_loss(model, params, batch, inner_lr=-0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=float("nan"))
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        tasks.sample(2, 0)
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        tasks.sample(0, 5)
    with pytest.raises(TypeError, match="shots must be an int"):
        tasks.sample(2, 2.5)
    with pytest.raises(ValueError, match="inner_steps must be an int >= 0"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, inner_steps=-1)
    with pytest.raises(ValueError, match="same number of shots"):
        mt.TaskBatch(batch.support_x, batch.support_y[:, :3], batch.query_x, batch.query_y)
    with pytest.raises(ValueError, match="same number of tasks"):
        mt.TaskBatch(batch.support_x, batch.support_y, batch.query_x[:1], batch.query_y[:1])
    with pytest.raises(ValueError, match="per-example shapes"):
        mt.TaskBatch(batch.support_x, batch.support_y, batch.query_x.expand(-1, -1, 2), batch.query_y)
    with pytest.raises(ValueError, match="reduction must be one of"):
        mt.summed_task_loss(model, params, batch, reduction="max")
    with pytest.raises(ValueError, match="vectorize must be"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, vectorize="yes")
    with pytest.raises(TypeError, match="batch must be a metatut.TaskBatch"):
        mt.maml_loss(model, params, (batch.support_x,), inner_lr=0.1)
    with pytest.raises(ValueError, match="amplitude must satisfy low <= high"):
        mt.SinusoidTasks(amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match="generator lives on cpu"):
        tasks.sample(2, 5, generator=mt.make_generator(0), device="meta")


def test_sampling_is_seeded_and_matches_the_paper_ranges():
    tasks = mt.SinusoidTasks()
    a = tasks.sample(1000, 10, 5, generator=mt.make_generator(3))
    b = tasks.sample(1000, 10, 5, generator=mt.make_generator(3))
    c = tasks.sample(1000, 10, 5, generator=mt.make_generator(4))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)
    assert a.support_x.shape == (1000, 10, 1) and a.query_x.shape == (1000, 5, 1)
    amp, phase = a.info["amplitude"], a.info["phase"]
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and 0 <= phase.min() and phase.max() <= math.pi
    assert a.support_x.abs().max() <= 5.0
    torch.testing.assert_close(a.support_y, amp.view(-1, 1, 1) * torch.sin(a.support_x - phase.view(-1, 1, 1)))
