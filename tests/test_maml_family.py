"""The MAML family (issue: Reptile, ANIL, Meta-SGD, MAML++ options), each against an independent reference."""
import pytest
import torch
import torch.nn.functional as F

import metatut as mt

F64 = torch.float64


def setup(tasks=4, shots=8, seed=0, hidden=(16, 16)):
    model = mt.mlp(hidden=hidden, seed=seed).to(F64)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(tasks, shots, shots, generator=mt.make_generator(seed + 10), dtype=F64)
    return model, params, batch


def grads(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_dicts_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


@pytest.mark.parametrize("steps", [1, 3])
def test_reptile_update_equals_sum_of_first_order_maml_gradients(steps):
    """theta - theta_k = alpha * sum_{j<k} grad L_S(theta_j), and grad L_S(theta_j) is the first-order MAML
    gradient with j inner steps when the query set is the support set (Nichol et al. 2018, sec. 5)."""
    model, params, batch = setup()
    alpha = 0.02
    reptile = grads(mt.reptile_loss(model, params, batch, inner_lr=alpha, inner_steps=steps, use="support"), params)
    same = mt.TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y)
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for j in range(steps):
        fo = grads(mt.maml_loss(model, params, same, inner_lr=alpha, inner_steps=j, first_order=True), params)
        for k in expected:
            expected[k] += alpha * fo[k]
    assert_dicts_close(reptile, expected, rtol=1e-10, atol=1e-12)


def test_reptile_with_sgd_moves_theta_towards_the_adapted_parameters():
    model, params, batch = setup()
    before = {k: v.detach().clone() for k, v in params.items()}
    adapted = mt.adapt(model, before, torch.cat([batch.support_x, batch.query_x], 1),
                       torch.cat([batch.support_y, batch.query_y], 1), inner_lr=0.02, steps=5, first_order=True)
    opt = torch.optim.SGD(params.values(), lr=0.5)
    mt.meta_train(mt.reptile_objective(model, inner_lr=0.02, inner_steps=5), params, lambda g: batch, steps=1,
                  optimizer=opt, progress_bar=False, check=False)
    for k in params:
        expected = before[k] + 0.5 * (adapted[k].detach().mean(0) - before[k])
        torch.testing.assert_close(params[k].detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_equals_maml_with_zero_body_step_size(first_order):
    model, params, batch = setup()
    head = mt.final_layer_names(model)
    assert head == ["4.weight", "4.bias"]
    anil = grads(mt.maml_loss(model, params, batch, inner_lr=0.05, inner_steps=2, adapt_names=head,
                              first_order=first_order), params)
    rates = {k: torch.tensor(0.05 if k in head else 0.0, dtype=F64) for k in params}
    maml = grads(mt.maml_loss(model, params, batch, inner_lr=rates, inner_steps=2, first_order=first_order), params)
    assert_dicts_close(anil, maml, rtol=1e-10, atol=1e-12)
    full = grads(mt.maml_loss(model, params, batch, inner_lr=0.05, inner_steps=2, first_order=first_order), params)
    assert (full["0.weight"] - anil["0.weight"]).abs().max() > 1e-6  # adapting the body is different


@pytest.mark.parametrize("per_step", [None, 2])
def test_meta_sgd_gradient_wrt_learned_step_sizes_matches_finite_differences(per_step):
    model, theta, batch = setup(hidden=(6, 6))
    lrs = mt.learned_inner_lrs(theta, init=0.05, granularity="parameter", steps=per_step)
    with torch.no_grad():  # distinct step sizes per scalar
        for v in lrs.values():
            v.add_(0.02 * torch.rand(v.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    params = {**theta, **lrs}
    names = list(lrs)
    flat = torch.cat([lrs[k].detach().reshape(-1) for k in names]).requires_grad_()

    def loss_of(vector):
        out, i = {}, 0
        for k in names:
            out[k] = vector[i:i + lrs[k].numel()].view_as(lrs[k])
            i += lrs[k].numel()
        return mt.maml_loss(model, {**theta, **out}, batch, inner_lr="learned", inner_steps=2)

    assert torch.autograd.gradcheck(loss_of, (flat,), eps=1e-6, atol=1e-6, rtol=1e-5)
    g = grads(mt.maml_loss(model, params, batch, inner_lr="learned", inner_steps=2), params)
    assert all(g[k].abs().sum() > 0 for k in names)


def test_learned_scalar_step_size_equal_to_fixed_one_gives_the_same_maml_gradient():
    model, theta, batch = setup()
    lrs = mt.learned_inner_lrs(theta, init=0.03, granularity="tensor")
    learned = grads(mt.maml_loss(model, {**theta, **lrs}, batch, inner_lr="learned", inner_steps=2), theta | lrs)
    fixed = grads(mt.maml_loss(model, theta, batch, inner_lr=0.03, inner_steps=2), theta)
    assert_dicts_close({k: learned[k] for k in theta}, fixed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [
    dict(first_order=False), dict(first_order=True), dict(step_weights=[0.2, 0.3, 0.5]),
])
def test_checkpointed_and_plain_meta_gradients_are_equal(options):
    model, params, batch = setup()
    plain = grads(mt.maml_loss(model, params, batch, inner_lr=0.03, inner_steps=3, vectorize=False, **options), params)
    ckpt = grads(mt.maml_loss(model, params, batch, inner_lr=0.03, inner_steps=3, checkpoint_steps=True, **options),
                 params)
    assert_dicts_close(plain, ckpt, rtol=1e-12, atol=1e-14)


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses():
    model, params, batch = setup()
    w = [0.1, 0.2, 0.7]
    msl = mt.maml_loss(model, params, batch, inner_lr=0.03, inner_steps=3, step_weights=w)
    manual = sum(wk * mt.maml_loss(model, params, batch, inner_lr=0.03, inner_steps=k + 1) for k, wk in enumerate(w))
    assert_dicts_close(grads(msl, params), grads(manual, params), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"step_weights must have one weight per inner step, shape \(3,\)"):
        mt.maml_loss(model, params, batch, inner_lr=0.03, inner_steps=3, step_weights=[1.0])


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_family_options_vmap_matches_loop(dtype, tol):
    model = mt.mlp(seed=1).to(dtype)
    theta = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(10, 10, 10, generator=mt.make_generator(3), dtype=dtype)
    adapted = mt.final_layer_names(model) + ["2.weight"]
    params = {**theta, **mt.learned_inner_lrs({k: theta[k] for k in adapted}, init=0.01, granularity="tensor",
                                              steps=3)}
    kw = dict(inner_lr="learned", inner_steps=3, step_weights=mt.msl_weights(10, 3, 100).to(dtype),
              adapt_names=adapted)
    a = grads(mt.maml_loss(model, params, batch, vectorize=True, **kw), params)
    b = grads(mt.maml_loss(model, params, batch, vectorize=False, **kw), params)
    assert_dicts_close(a, b, rtol=tol, atol=tol)


def test_msl_weights_anneal_from_uniform_to_the_last_step():
    w0 = mt.msl_weights(0, 5, 100)
    torch.testing.assert_close(w0, torch.full((5,), 0.2, dtype=F64))
    mid, end = mt.msl_weights(50, 5, 100), mt.msl_weights(1000, 5, 100)
    for w in (mid, end):
        assert abs(w.sum().item() - 1) < 1e-12 and (w > 0).all()
    assert mid[0] < w0[0] and mid[-1] > w0[-1]
    assert end[0] == pytest.approx(0.03 / 5) and end[-1] == pytest.approx(1 - 4 * 0.03 / 5)


def test_derivative_order_annealing_switches_from_first_to_second_order():
    model, params, batch = setup()
    objective = mt.maml_objective(model, inner_lr=0.05, inner_steps=1, first_order_until=10)
    early, late = grads(objective(params, batch, step=3), params), grads(objective(params, batch, step=10), params)
    fo = grads(mt.maml_loss(model, params, batch, inner_lr=0.05, first_order=True), params)
    so = grads(mt.maml_loss(model, params, batch, inner_lr=0.05), params)
    assert_dicts_close(early, fo, rtol=1e-12, atol=1e-14)
    assert_dicts_close(late, so, rtol=1e-12, atol=1e-14)
    assert "first_order_until" in repr(objective)


def test_meta_train_passes_the_step_and_anneals_the_learning_rate():
    model, params, batch = setup()
    seen = []

    class Recorder:
        uses_step = True

        def __call__(self, p, b, step):
            seen.append(step)
            return mt.maml_loss(model, p, b, inner_lr=0.01)

    result = mt.meta_train(Recorder(), params, lambda g: batch, steps=6, meta_lr=1e-2, lr_schedule="cosine",
                           min_meta_lr=1e-4, progress_bar=False, check=False)
    assert seen == list(range(6))
    assert result.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        mt.meta_train(Recorder(), params, lambda g: batch, steps=1, lr_schedule="step")


def test_family_bad_inputs():
    model, params, batch = setup()
    with pytest.raises(ValueError, match="inner_lr='learned' needs learned step sizes"):
        mt.maml_loss(model, params, batch, inner_lr="learned")
    with pytest.raises(ValueError, match="adapt_names must be a non-empty subset"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, adapt_names=["head.weight"])
    with pytest.raises(KeyError, match="no inner step size for parameter '0.weight'"):
        mt.maml_loss(model, params, batch, inner_lr={"4.weight": torch.tensor(0.1)})
    with pytest.raises(ValueError, match="granularity must be"):
        mt.learned_inner_lrs(params, granularity="layer")
    with pytest.raises(ValueError, match="checkpoint_steps=True runs the per-task loop"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, checkpoint_steps=True, vectorize=True)
    with pytest.raises(ValueError, match="use must be 'support' or 'both'"):
        mt.reptile_loss(model, params, batch, inner_lr=0.1, use="query")
    with pytest.raises(TypeError, match="maml_objective needs inner_lr"):
        mt.maml_objective(model)
