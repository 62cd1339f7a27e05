"""Trust under faults (engine part): each silent wrong answer or raw error of the issue becomes either the right
answer (checked against an independent float64 reference) or a clear error that names the argument and the fix."""
import math

import pytest
import torch
import torch.nn.functional as F

import metatut as mt
from metatut.tasks.episodes import EpisodeSampler, sample_episodes

F64 = torch.float64


def grads(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def sinusoid(tasks=3, shots=5, dtype=F64, seed=0):
    return mt.SinusoidTasks().sample(tasks, shots, shots, generator=mt.make_generator(seed), dtype=dtype)


def mlp64(seed=0, hidden=(8, 8)):
    model = mt.mlp(hidden=hidden, seed=seed).to(F64)
    return model, mt.init_params(model)


def episodes(tasks=2, n_way=3, k_shot=1, q_query=2, size=16, dtype=F64, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n_way * k_shot, 1, size, size, generator=g, dtype=dtype)
    qx = torch.rand(tasks, n_way * q_query, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(n_way).repeat(k_shot).expand(tasks, -1).contiguous()
    qy = torch.arange(n_way).repeat(q_query).expand(tasks, -1).contiguous()
    if labels is not None:
        sy, qy = labels(sy), labels(qy)
    return mt.TaskBatch(sx, sy, qx, qy)


def small_conv4(num_classes=3, batch_norm="batch", seed=0):
    return mt.conv4(num_classes, hidden=4, image_size=16, batch_norm=batch_norm, seed=seed).to(F64)


# ----------------------------------------------------------------------- 1. checkpointing with per-step copies
def test_checkpointed_meta_gradient_with_distinct_per_step_parameters_equals_the_plain_one():
    """Per-step copies that differ from one another: recomputing step k must use step k's copies (the
    checkpointed step function once closed over the loop variables and used the last step's)."""
    model, theta = mlp64()
    steps = 3
    per_step = mt.per_step_params(theta, ["2.weight", "2.bias", "4.bias"], steps)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for v in per_step.values():
            v.add_(0.3 * torch.randn(v.shape, generator=g, dtype=F64))      # a different copy at each step
    # the copies replace the originals (a dict without them is accepted: every parameter has a value)
    params = {**{k: v for k, v in theta.items() if k not in ("2.weight", "2.bias", "4.bias")}, **per_step}
    batch = sinusoid(tasks=3, shots=6)
    kw = dict(inner_lr=0.05, inner_steps=steps, vectorize=False)
    for options in (dict(), dict(step_weights=[0.2, 0.3, 0.5])):
        plain = grads(mt.maml_loss(model, params, batch, **kw, **options), params)
        ckpt = grads(mt.maml_loss(model, params, batch, checkpoint_steps=True, **kw, **options), params)
        assert plain["per_step.0.2.bias"].abs().max() > 1e-4                # a real gradient, not zeros
        for k in params:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-12, atol=1e-14)


def test_checkpointing_refuses_running_statistics_that_recomputation_would_update_twice():
    model = small_conv4(batch_norm="running")
    params = mt.init_params(model)
    batch = episodes()
    buffers = mt.per_step_buffers(model, 1)
    with pytest.raises(ValueError, match=r"checkpoint_steps=True.*buffers"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, checkpoint_steps=True,
                     buffers=buffers)
    with pytest.raises(ValueError, match=r"checkpoint_steps=True.*running statistics.*model.eval\(\)"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, checkpoint_steps=True)
    model.eval()       # evaluation mode does not update running statistics: checkpointing is exact again
    plain = grads(mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy), params)
    ckpt = grads(mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, checkpoint_steps=True),
                 params)
    for k in params:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------- 2. forced vmap
def test_forced_vmap_through_running_batch_norm_is_refused_with_a_clear_error():
    model = small_conv4(batch_norm="running")
    params = mt.init_params(model)
    batch = episodes()
    assert issubclass(mt.VectorizeError, ValueError)
    message = r"vectorize=True.*BatchNorm2d.*vectorize=False or 'auto'"
    with pytest.raises(mt.VectorizeError, match=message):
        mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=0.1, loss_fn=F.cross_entropy,
                 vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.per_task_losses(model, params, batch.support_x, batch.support_y, F.cross_entropy, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.summed_task_loss(model, params, batch, loss_fn=F.cross_entropy, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.reptile_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.adaptation_curve(model, params, batch, inner_lr=0.1, steps=1, loss_fn=F.cross_entropy, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.evaluate_adaptation(model, params, batch, inner_lr=0.1, steps=(0, 1), loss_fn=F.cross_entropy,
                               vectorize=True)
    with pytest.raises(mt.VectorizeError, match=message):
        mt.adapted_accuracy(model, params, batch, inner_lr=0.1, steps=1, vectorize=True)
    # 'auto' and False still run the (reference) loop
    auto = mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy)
    loop = mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, vectorize=False)
    torch.testing.assert_close(auto, loop, rtol=1e-12, atol=0)


def test_forced_vmap_through_batch_statistics_batch_norm_runs_the_exact_batched_path():
    """conv4's batch_norm='batch' (TaskBatchNorm2d) under vectorize=True: no longer refused, the loop's numbers
    (before the batched path existed this case was refused like 'running'; see tests/test_batched_conv.py)."""
    model = small_conv4(batch_norm="batch")
    params = mt.init_params(model)
    batch = episodes()
    options = dict(inner_lr=0.1, loss_fn=F.cross_entropy)
    for inner_steps in (1, 2):
        forced = mt.maml_loss(model, params, batch, inner_steps=inner_steps, vectorize=True, **options)
        loop = mt.maml_loss(model, params, batch, inner_steps=inner_steps, vectorize=False, **options)
        torch.testing.assert_close(forced, loop, rtol=1e-12, atol=0)
        g_forced, g_loop = grads(forced, params), grads(loop, params)
        flat_forced = torch.cat([g.flatten() for g in g_forced.values()])
        flat_loop = torch.cat([g.flatten() for g in g_loop.values()])
        assert ((flat_forced - flat_loop).norm() / flat_loop.norm()).item() < 1e-10
    adapted = mt.adapt(model, params, batch.support_x, batch.support_y, vectorize=True, **options)
    looped = mt.adapt(model, params, batch.support_x, batch.support_y, vectorize=False, **options)
    for k in looped:
        torch.testing.assert_close(adapted[k], looped[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        mt.adaptation_curve(model, params, batch, inner_lr=0.1, steps=1, loss_fn=F.cross_entropy, vectorize=True),
        mt.adaptation_curve(model, params, batch, inner_lr=0.1, steps=1, loss_fn=F.cross_entropy, vectorize=False),
        rtol=1e-10, atol=1e-12)


def test_forced_vmap_with_per_step_parameters_buffers_or_checkpointing_is_refused_alike():
    model, theta = mlp64()
    batch = sinusoid()
    params = {**theta, **mt.per_step_params(theta, ["4.bias"], 1)}
    with pytest.raises(mt.VectorizeError, match=r"vectorize=True.*per-step.*vectorize=False or 'auto'"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=r"vectorize=True.*per-step"):
        mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=0.1, vectorize=True)
    with pytest.raises(mt.VectorizeError, match=r"vectorize=True.*per-step"):
        mt.adaptation_curve(model, params, batch, inner_lr=0.1, steps=1, vectorize=True)
    with pytest.raises(mt.VectorizeError, match="checkpoint_steps=True runs the per-task loop"):
        mt.maml_loss(model, theta, batch, inner_lr=0.1, checkpoint_steps=True, vectorize=True)
    running = small_conv4(batch_norm="running")
    with pytest.raises(mt.VectorizeError, match=r"vectorize=True.*(per-step|BatchNorm2d)"):
        mt.maml_loss(running, mt.init_params(running), episodes(), inner_lr=0.1, loss_fn=F.cross_entropy,
                     buffers=mt.per_step_buffers(running, 1), vectorize=True)
    # per-step parameters with 'auto' run the loop, as before
    auto = mt.maml_loss(model, params, batch, inner_lr=0.1)
    loop = mt.maml_loss(model, params, batch, inner_lr=0.1, vectorize=False)
    torch.testing.assert_close(auto, loop, rtol=1e-12, atol=0)


def test_torch_vmap_through_native_batch_norm_still_differs_from_the_loop_which_is_why_it_is_refused():
    """The mismatch the refusal guards against, shown with torch.func.vmap directly (float64, second order):
    PyTorch's nn.BatchNorm2d differs; conv4's own TaskBatchNorm2d (batch norm by hand under a torch.func
    transform) gives the loop's numbers, which is why conv4 with batch_norm='batch' may run batched."""
    from metatut.functional import _task_meta_loss

    batch = episodes(tasks=2)
    options = dict(rates=0.4, steps=1, first_order=False, loss_fn=F.cross_entropy, weights=None)
    errors = {}
    for kind in ("native", "task"):
        model = small_conv4()
        if kind == "native":
            for block in model.features:
                block[1] = torch.nn.BatchNorm2d(4, track_running_stats=False).to(F64)
        params = mt.init_params(model)
        vmapped = torch.func.vmap(lambda p, sx, sy, qx, qy, model=model, params=params: _task_meta_loss(
            model, p, sx, sy, qx, qy, functional=True, adapt_names=list(params), **options),
            in_dims=(None, 0, 0, 0, 0))(params, batch.support_x, batch.support_y, batch.query_x, batch.query_y).mean()
        loop = mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, vectorize=False)
        a = torch.cat([g.flatten() for g in torch.autograd.grad(vmapped, list(params.values()))])
        b = torch.cat([g.flatten() for g in torch.autograd.grad(loop, list(params.values()))])
        errors[kind] = ((a - b).norm() / b.norm()).item()
    assert errors["native"] > 1e-6
    assert errors["task"] < 1e-10


# ---------------------------------------------------------------------------- 3. meta_gradient, unused keys
def test_meta_gradient_of_the_documented_per_step_merge_gives_zero_for_the_replaced_originals():
    model, theta = mlp64()
    per_step = mt.per_step_params(theta, ["4.weight", "4.bias"], 1)
    params = {**theta, **per_step}
    batch = sinusoid()
    objective = mt.maml_objective(model, inner_lr=0.05, inner_steps=1, vectorize=False)
    loss, g = mt.meta_gradient(objective, params, batch)
    assert list(g) == list(params)
    # the per-step copies replace 4.weight and 4.bias everywhere: their gradient is exactly zero
    assert torch.equal(g["4.weight"], torch.zeros_like(theta["4.weight"]))
    assert torch.equal(g["4.bias"], torch.zeros_like(theta["4.bias"]))
    used = {k: v for k, v in params.items() if k not in ("4.weight", "4.bias")}
    reference = grads(objective(params, batch), used)
    for k in used:
        torch.testing.assert_close(g[k], reference[k], rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, objective(params, batch).detach(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- 4. silent wrong answers
def test_a_params_dict_missing_a_model_parameter_is_refused_everywhere():
    model, params = mlp64()
    batch = sinusoid()
    params.pop("0.bias")
    message = r"params is missing the model's parameters \['0.bias'\].*metatut.init_params\(model\)"
    calls = [
        lambda: mt.maml_loss(model, params, batch, inner_lr=0.1),
        lambda: mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=0.1),
        lambda: mt.inner_step(model, params, batch.support_x[0], batch.support_y[0], 0.1),
        lambda: mt.summed_task_loss(model, params, batch),
        lambda: mt.per_task_losses(model, params, batch.support_x, batch.support_y),
        lambda: mt.reptile_loss(model, params, batch, inner_lr=0.1),
        lambda: mt.adaptation_curve(model, params, batch, inner_lr=0.1, steps=1),
        lambda: mt.evaluate_adaptation(model, params, batch, inner_lr=0.1, steps=(0, 1)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_misspelled_parameter_key_is_refused_and_legitimate_extra_keys_are_accepted():
    model, theta = mlp64()
    batch = sinusoid()
    params = dict(theta)
    params["0.wieght"] = params.pop("0.weight")
    with pytest.raises(ValueError, match=r"params has keys the model does not have: \['0.wieght'\].*"
                                         r"model's parameters are \['0.weight', '0.bias'"):
        mt.maml_loss(model, params, batch, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"keys the model does not have: \['extra'\]"):
        mt.summed_task_loss(model, {**theta, "extra": torch.zeros(())}, batch)
    with pytest.raises(ValueError, match=r"keys the model does not have: \['per_step.0.nope', 'per_step.1.nope'\]"):
        mt.maml_loss(model, {**theta, "per_step.0.nope": torch.zeros(()), "per_step.1.nope": torch.zeros(())},
                     batch, inner_lr=0.1)
    # learned step sizes, per-step copies and buffers are legitimate extra keys
    lrs = mt.learned_inner_lrs(theta, steps=2)
    mt.maml_loss(model, {**theta, **lrs}, batch, inner_lr="learned", inner_steps=2)
    mt.maml_loss(model, {**theta, **mt.per_step_params(theta, ["4.bias"], 1)}, batch, inner_lr=0.1)
    running = small_conv4(batch_norm="running")
    with_buffers = {**mt.init_params(running), **{k: v.clone() for k, v in running.named_buffers()}}
    mt.maml_loss(running, with_buffers, episodes(), inner_lr=0.1, loss_fn=F.cross_entropy, adapt_names=["head.bias"])


def test_regression_targets_without_the_output_dimension_are_refused():
    """[tasks, shots] targets against [tasks, shots, 1] predictions broadcast to [shots, shots] under MSE."""
    model, params = mlp64()
    b = sinusoid()
    flat = mt.TaskBatch(b.support_x, b.support_y.squeeze(-1), b.query_x, b.query_y.squeeze(-1))
    message = r"support_y has shape \(5,\) per task but the model predicts \(5, 1\).*y.unsqueeze\(-1\)"
    for vectorize in (False, True):
        with pytest.raises(ValueError, match=message):
            mt.maml_loss(model, params, flat, inner_lr=0.1, vectorize=vectorize)
        with pytest.raises(ValueError, match=message.replace("support_y", "query_y")):
            mt.maml_loss(model, params, flat, inner_lr=0.1, inner_steps=0, vectorize=vectorize)
        with pytest.raises(ValueError, match=r"query_y has shape \(5,\) per task"):
            mt.adaptation_curve(model, params, flat, inner_lr=0.1, steps=0, vectorize=vectorize)
        with pytest.raises(ValueError, match=r"targets have shape \(10,\) per task.*unsqueeze\(-1\)"):
            mt.summed_task_loss(model, params, flat, vectorize=vectorize)
    with pytest.raises(ValueError, match=r"support_y has shape \(5,\).*unsqueeze"):
        mt.maml_loss(model, params, flat, inner_lr=0.1, loss_fn=F.l1_loss, vectorize=False)
    # a user loss that handles the shapes itself is left alone
    mt.maml_loss(model, params, flat, inner_lr=0.1, loss_fn=lambda p, y: F.mse_loss(p.squeeze(-1), y))


def test_one_way_episodes_are_refused():
    images = torch.rand(6, 5, 16, 16)
    with pytest.raises(ValueError, match=r"n_way must be an int >= 2 .*loss and meta-gradient are exactly 0"):
        sample_episodes(images, 2, n_way=1, k_shot=1, q_query=1)
    with pytest.raises(ValueError, match=r"n_way must be an int >= 2"):
        EpisodeSampler(images, n_way=1, k_shot=1, q_query=1)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 2"):
        mt.conv4(1)
    model = small_conv4(num_classes=None)
    params = mt.init_params(model)
    batch = episodes(n_way=2)
    with pytest.raises(ValueError, match=r"n_way must be an int >= 2"):
        mt.protonet_loss(model, params, batch, 1)
    with pytest.raises(ValueError, match=r"n_way must be an int >= 2"):
        mt.protonet_objective(model, 1)


def test_integer_class_labels_with_the_default_mse_loss_are_refused():
    model = small_conv4()
    params = mt.init_params(model)
    batch = episodes()
    message = r"support_y holds integer class labels \(torch.int64\).*loss_fn=torch.nn.functional.cross_entropy"
    with pytest.raises(ValueError, match=message):
        mt.maml_loss(model, params, batch, inner_lr=0.1)
    with pytest.raises(ValueError, match=message):
        mt.adapt(model, params, batch.support_x, batch.support_y, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"holds integer class labels"):
        mt.summed_task_loss(model, params, batch)
    with pytest.raises(ValueError, match=r"holds integer class labels"):
        mt.evaluate_adaptation(model, params, batch, inner_lr=0.1, steps=(0, 1))


def test_labels_beyond_the_classifier_width_are_refused():
    batch = episodes(labels=lambda y: y + 5)          # labels 5..7
    for batch_norm, vectorize in (("batch", False), ("none", True)):
        model = small_conv4(num_classes=5, batch_norm=batch_norm)
        params = mt.init_params(model)
        message = r"support_y holds class labels in \[5, 7\] but the model outputs 5 classes"
        with pytest.raises(ValueError, match=message):
            mt.maml_loss(model, params, batch, inner_lr=0.1, loss_fn=F.cross_entropy, vectorize=vectorize)
        with pytest.raises(ValueError, match=r"query_y holds class labels in \[5, 7\].*outputs 5 classes"):
            mt.maml_loss(model, params, batch, inner_lr=0.1, inner_steps=0, loss_fn=F.cross_entropy,
                         vectorize=vectorize)
        with pytest.raises(ValueError, match=r"class labels in \[5, 7\].*outputs 5 classes"):
            mt.adapted_accuracy(model, params, batch, inner_lr=0.1, steps=1, vectorize=vectorize)
    negative = episodes(labels=lambda y: y - 1)
    model = small_conv4(num_classes=3)
    with pytest.raises(ValueError, match=r"class labels in \[-1, 1\].*outputs 3 classes"):
        mt.maml_loss(model, mt.init_params(model), negative, inner_lr=0.1, loss_fn=F.cross_entropy)


def test_mixed_dtypes_and_devices_are_refused_naming_both():
    model = mt.mlp(hidden=(8,))
    params16 = mt.init_params(model, dtype=torch.float16)
    batch = sinusoid(dtype=F64)
    message = r"params are torch.float16 but batch.support_x is torch.float64"
    with pytest.raises(ValueError, match=message):
        mt.maml_loss(model, params16, batch, inner_lr=0.1)
    with pytest.raises(ValueError, match=message):
        mt.summed_task_loss(model, params16, batch)
    with pytest.raises(ValueError, match=r"params are torch.float16 but support_x is torch.float64"):
        mt.adapt(model, params16, batch.support_x, batch.support_y, inner_lr=0.1)
    mixed = {**mt.init_params(model), "2.bias": mt.init_params(model, dtype=F64)["2.bias"]}
    with pytest.raises(ValueError, match=r"params must all have one floating dtype.*torch.float32.*torch.float64"):
        mt.maml_loss(model, mixed, batch.to(dtype=torch.float32), inner_lr=0.1)
    on_meta = mt.init_params(model, device="meta")
    with pytest.raises(ValueError, match=r"params are on meta but batch.support_x is on cpu"):
        mt.maml_loss(model, on_meta, batch.to(dtype=torch.float32), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"params are on meta but batch.support_x is on cpu"):
        mt.adaptation_curve(model, on_meta, batch.to(dtype=torch.float32), inner_lr=0.1, steps=1)


def test_an_int_generator_is_refused_with_the_fix():
    message = r"generator must be a torch.Generator \(e.g. metatut.make_generator\(0\)\) or None \(got 0\)"
    with pytest.raises(TypeError, match=message):
        mt.SinusoidTasks().sample(2, 5, generator=0)
    with pytest.raises(TypeError, match=message):
        mt.LinearTasks().sample(2, 5, generator=0)
    images = torch.rand(6, 5, 16, 16)
    with pytest.raises(TypeError, match=message):
        sample_episodes(images, 2, n_way=2, k_shot=1, q_query=1, generator=0)
    with pytest.raises(TypeError, match=message):
        EpisodeSampler(images, n_way=2, k_shot=1, q_query=1)(0)
    model, params = mlp64()
    with pytest.raises(TypeError, match=message):
        mt.meta_train(mt.summed_loss_objective(model), params, lambda g: sinusoid(), steps=1, generator=0,
                      progress_bar=False)


def test_evaluate_adaptation_steps_must_be_a_tuple_of_counts():
    model, params = mlp64()
    batch = sinusoid()
    with pytest.raises(TypeError, match=r"steps must be a tuple of inner-step counts, e.g. steps=\(0, 1, 10\) "
                                        r"\(got 1\)"):
        mt.evaluate_adaptation(model, params, batch, inner_lr=0.1, steps=1)
    assert set(mt.evaluate_adaptation(model, params, batch, inner_lr=0.1, steps=(0, 2))) == {0, 2}


@pytest.mark.parametrize("name, bounds", [
    ("amplitude", (0.1, math.inf)), ("phase", (-math.inf, 0.0)), ("x_range", (math.nan, 5.0)),
    ("x_range", (5.0, -5.0)), ("amplitude", (math.nan, math.nan)),
])
def test_sinusoid_ranges_must_be_finite_and_ordered(name, bounds):
    with pytest.raises(ValueError, match=rf"{name} must satisfy low <= high with finite low and high"):
        mt.SinusoidTasks(**{name: bounds})


# ----------------------------------------------------------------------- 5. meta_train stops at non-finite
class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, math.nan)


def bad_at(model, bad_step, what):
    """The summed task loss, made non-finite at ``bad_step``: the loss (``what="loss"``) or its gradient."""
    def objective(p, b, step):
        loss = mt.summed_task_loss(model, p, b)
        if step == bad_step:
            loss = loss * math.inf if what == "loss" else _NaNGradient.apply(loss)
        return loss
    objective.uses_step = True
    return objective


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_meta_train_stops_at_the_first_non_finite_step_and_keeps_the_last_finite_parameters(what):
    model = mt.mlp(hidden=(8,), seed=0)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
    bad_step = 3
    snapshots = {}
    objective = bad_at(model, bad_step, what)

    def record(step, loss):
        snapshots[step] = {k: v.detach().clone() for k, v in params.items()}

    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)
    with pytest.raises(mt.NonFiniteLossError) as info:
        mt.meta_train(objective, params, lambda g: batch, steps=6, optimizer=optimizer, on_step=record,
                      progress_bar=False)
    error = info.value
    assert isinstance(error, FloatingPointError)
    assert error.step == bad_step and error.what == what
    assert f"the {what} became NaN or infinite at step {bad_step}" in str(error)
    assert "lower meta_lr or inner_lr, or use fewer inner steps" in str(error)
    assert sorted(snapshots) == [0, 1, 2]
    for k, v in params.items():
        assert torch.equal(v.detach(), snapshots[bad_step - 1][k])        # the bad step was not applied
        assert torch.isfinite(v).all()
        state = optimizer.state[v]
        assert int(state["step"]) == bad_step                             # the optimiser did not take it
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
    assert error.losses.shape == (bad_step + 1,) and torch.isfinite(error.losses[:bad_step]).all()
    # independent of the final sanity check: stops with check=False too (the training command's setting)
    params2 = mt.init_params(model)
    with pytest.raises(mt.NonFiniteLossError, match=f"step {bad_step}"):
        mt.meta_train(objective, params2, lambda g: batch, steps=6, check=False, progress_bar=False)


def test_meta_train_without_the_stop_runs_on_and_the_final_check_still_reports():
    model = mt.mlp(hidden=(8,), seed=0)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))

    def exploding(p, b):
        return mt.summed_task_loss(model, p, b) * math.nan

    result = mt.meta_train(exploding, params, lambda g: batch, steps=3, progress_bar=False, check=False,
                           stop_on_nonfinite=False)
    assert result.steps == 3 and not torch.isfinite(result.losses).any()
    with pytest.raises(mt.NonFiniteLossError, match="the loss became NaN or infinite at step 0") as info:
        mt.meta_train(exploding, mt.init_params(model), lambda g: batch, steps=3, progress_bar=False,
                      stop_on_nonfinite=False)
    assert info.value.step == 0 and info.value.what == "loss"


def test_task_threads_with_forced_vmap_are_refused_not_ignored():
    """task_workers says how the per-task loop runs; with vectorize=True there is no loop, so the option would be
    silently ignored: a clear error instead ('auto' still picks one path and ignores what does not apply)."""
    model, params = mlp64()
    batch = sinusoid()
    with pytest.raises(mt.VectorizeError, match=r"task_workers=2 runs the per-task loop in threads.*vectorize=True"):
        mt.maml_loss(model, params, batch, inner_lr=0.1, vectorize=True, task_workers=2)
    auto = mt.maml_loss(model, params, batch, inner_lr=0.1, task_workers=2)
    loop = mt.maml_loss(model, params, batch, inner_lr=0.1, vectorize=False)
    torch.testing.assert_close(auto, loop, rtol=1e-12, atol=1e-14)
