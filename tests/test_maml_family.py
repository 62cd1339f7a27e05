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
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


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


# ------------------------------------------------------------------- MAML++ per-step batch norm
def conv_setup(batch_norm="batch", tasks=2, n_way=3, seed=0):
    model = mt.conv4(n_way, hidden=4, batch_norm=batch_norm, seed=seed).to(F64)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 2 * n_way, 1, 28, 28, generator=g, dtype=F64)
    y = torch.arange(n_way).repeat(2).expand(tasks, -1)
    return model, mt.init_params(model), mt.TaskBatch(x[:, :n_way], y[:, :n_way], x[:, n_way:], y[:, n_way:])


def test_per_step_batch_norm_weights_sum_to_the_shared_gradient():
    """With every per-step copy equal to the shared value, the loss equals MAML's with the batch-norm
    parameters left out of the inner loop (per-step copies are meta-learned, not adapted), and the gradients
    of the copies add up to the shared parameter's gradient (the chain rule for a parameter used at each step)."""
    model, params, batch = conv_setup()
    kw = dict(inner_lr=0.1, inner_steps=2, loss_fn=F.cross_entropy)
    bn = mt.batch_norm_names(model)
    assert len(bn) == 8
    plain_loss = mt.maml_loss(model, params, batch, adapt_names=[n for n in params if n not in bn], **kw)
    plain = grads(plain_loss, params)
    per_step = {**params, **mt.per_step_params(params, bn, steps=2)}
    loss = mt.maml_loss(model, per_step, batch, **kw)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    used = {k: v for k, v in per_step.items() if k not in bn}  # the shared copies are replaced everywhere
    g = grads(loss, used)
    for name in bn:
        copies = [g[f"per_step.{k}.{name}"] for k in range(3)]
        assert all(c.abs().sum() > 0 for c in copies), name  # each step's copy is used
        torch.testing.assert_close(sum(copies), plain[name], rtol=1e-9, atol=1e-12)
    for name in params:
        if name not in bn:
            torch.testing.assert_close(g[name], plain[name], rtol=1e-9, atol=1e-12)


def test_per_step_running_statistics_are_kept_per_step():
    model, params, batch = conv_setup("running")
    before = {k: v.clone() for k, v in model.named_buffers()}
    buffers = mt.per_step_buffers(model, steps=2)
    mt.maml_loss(model, params, batch, inner_lr=0.1, inner_steps=2, loss_fn=F.cross_entropy, buffers=buffers).backward()
    name = "features.0.1.running_mean"
    # step 0 normalised the support images at theta_0: with momentum 0.1 and two tasks, its statistics are
    # 0.9 * (0.1 * m_task0) + 0.1 * m_task1 of the first conv layer's outputs, which we recompute here
    conv = model.features[0][0]
    means = [F.conv2d(batch.support_x[t], params["features.0.0.weight"], params["features.0.0.bias"], padding=1)
             .mean(dim=(0, 2, 3)).detach() for t in range(2)]
    torch.testing.assert_close(buffers[0][name], 0.9 * 0.1 * means[0] + 0.1 * means[1], rtol=1e-10, atol=1e-12)
    assert conv is model.features[0][0]
    assert not torch.equal(buffers[1][name], buffers[0][name]) and not torch.equal(buffers[2][name], buffers[1][name])
    for k, v in model.named_buffers():  # the module's own statistics are untouched
        assert torch.equal(v, before[k])
    # at test time each step normalises with its own statistics
    model.eval()
    try:
        curve = mt.adaptation_curve(model, params, batch, inner_lr=0.1, steps=2, buffers=buffers,
                                    loss_fn=F.cross_entropy)
        first = F.cross_entropy(mt.forward(model, {**params, **buffers[0]}, batch.query_x[0]), batch.query_y[0])
        torch.testing.assert_close(curve[0, 0], first.detach())
    finally:
        model.train()


def test_per_step_batch_norm_bad_inputs():
    model, params, batch = conv_setup()
    bn = mt.batch_norm_names(model)
    partial_copies = {k: v for k, v in mt.per_step_params(params, bn, steps=2).items() if not k.startswith("per_step.2.")}
    with pytest.raises(ValueError, match="per-step parameters for inner step 2 are missing"):
        mt.maml_loss(model, {**params, **partial_copies}, batch, inner_lr=0.1, inner_steps=2, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"does not name an inner step in 0\.\.1"):
        mt.maml_loss(model, {**params, **mt.per_step_params(params, bn, steps=2)}, batch, inner_lr=0.1,
                     inner_steps=1, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="no batch-norm running statistics"):
        mt.per_step_buffers(model, steps=1)
    running, p2, _ = conv_setup("running")
    with pytest.raises(ValueError, match=r"buffers must map each inner step 0\.\.2"):
        mt.maml_loss(running, p2, batch, inner_lr=0.1, inner_steps=2, loss_fn=F.cross_entropy,
                     buffers=mt.per_step_buffers(running, steps=1))
