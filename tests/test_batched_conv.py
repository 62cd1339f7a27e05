"""The exact batched-tasks path for convolutional models: conv4 with batch-statistics batch norm
(``metatut.TaskBatchNorm2d``) under vmap equals the per-task loop in both orders (float64), including MAML++'s
per-step batch norm and learned step sizes; conv biases feeding batch norm get exactly zero meta-gradient."""
import json

import pytest
import torch
import torch.nn.functional as F

import metatut as mt
from metatut.engine import policy

F64 = torch.float64


def _episodes(tasks=3, n_way=3, k_shot=1, q_query=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n_way * k_shot, 1, size, size, generator=g, dtype=F64)
    qx = torch.rand(tasks, n_way * q_query, 1, size, size, generator=g, dtype=F64)
    sy = torch.arange(n_way).repeat(k_shot).expand(tasks, -1).contiguous()
    qy = torch.arange(n_way).repeat(q_query).expand(tasks, -1).contiguous()
    return mt.TaskBatch(sx, sy, qx, qy)


def _setup(maml_pp: bool, steps: int, seed=0):
    model = mt.conv4(3, hidden=4, image_size=16, seed=seed).to(F64)
    params = mt.init_params(model)
    options = dict(inner_lr=0.4)
    if maml_pp:
        meta = mt.MetaParams(params).with_per_step(mt.batch_norm_names(model), steps=steps)
        meta = meta.with_learned_lrs(init=0.3, granularity="tensor", steps=steps)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():   # distinct per-step values, so a mix-up of steps would show
            for key, value in meta.items():
                if key.startswith("per_step"):
                    value.add_(0.1 * torch.randn(value.shape, generator=g, dtype=F64))
        params, options = meta, dict(inner_lr="learned")
    return model, params, options


def _grad(model, params, batch, **options):
    loss = mt.maml_loss(model, params, batch, loss_fn=F.cross_entropy, **options)
    return loss, torch.autograd.grad(loss, list(params.values()), materialize_grads=True)   # per-step: base BN unused


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_task_batch_norm_is_nn_batch_norm_with_the_same_state_dict_and_is_verified_only_with_batch_statistics():
    model = mt.conv4(3, hidden=4, image_size=16, seed=0)
    bn = model.features[0][1]
    assert isinstance(bn, mt.TaskBatchNorm2d) and isinstance(bn, torch.nn.BatchNorm2d)
    assert policy.judge(model) == policy.VmapVerdict("safe", [])
    assert mt.can_vectorize(model)
    running = mt.conv4(3, hidden=4, image_size=16, batch_norm="running", seed=0)
    assert policy.judge(running) == policy.VmapVerdict("unsafe", ["BatchNorm2d"])
    assert mt.TaskBatchNorm2d(4).vmap_safe is False                      # running statistics stay unsafe
    # the same keys as before (nn.BatchNorm2d): older conv4 state dicts load
    old = torch.nn.BatchNorm2d(4, track_running_stats=False)
    assert list(bn.state_dict()) == list(old.state_dict())
    model.load_state_dict(mt.conv4(3, hidden=4, image_size=16, seed=1).state_dict())


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("maml_pp", [False, True], ids=["plain", "per-step-bn+learned-rates"])
def test_batched_path_equals_the_loop_in_float64(one_thread, first_order, steps, maml_pp):
    model, params, options = _setup(maml_pp, steps)
    batch = _episodes()
    options.update(inner_steps=steps, first_order=first_order)
    loop_loss, loop = _grad(model, params, batch, vectorize=False, **options)
    batched_loss, batched = _grad(model, params, batch, vectorize=True, **options)
    chunked_loss, chunked = _grad(model, params, batch, vectorize=True, vmap_chunk_size=2, **options)
    assert _flat(loop).abs().max() > 1e-3
    assert abs(batched_loss.item() - loop_loss.item()) <= 1e-12 * abs(loop_loss.item())
    assert _rel(_flat(batched), _flat(loop)) < 1e-10
    assert _rel(_flat(chunked), _flat(loop)) < 1e-10
    assert _rel(_flat(chunked), _flat(batched)) < 1e-12
    # the conv biases feeding batch-statistics batch norm: exactly zero on the batched path
    for name, g in zip(params, batched, strict=True):
        if name.startswith("features.") and name.endswith(".0.bias"):
            assert (g == 0).all(), name
    if maml_pp:   # the per-step copies and the learned rates get real gradients
        names = list(params)
        assert any(k.startswith("per_step") and g.abs().max() > 0 for k, g in zip(names, batched, strict=True))
        assert any(k.startswith("inner_lr") and g.abs().max() > 0 for k, g in zip(names, batched, strict=True))


def test_conv_biases_feeding_batch_norm_get_exactly_zero_meta_gradient(one_thread):
    model, params, options = _setup(False, 2)
    _, grads = _grad(model, params, _episodes(), vectorize=True, inner_steps=2, **options)
    biases = {n: g for n, g in zip(params, grads, strict=True) if n.startswith("features.") and n.endswith(".0.bias")}
    assert len(biases) == 4 and all(bool((g == 0).all()) for g in biases.values())
    assert grads[list(params).index("head.bias")].abs().max() > 0      # the head's bias is a real one


def test_batched_meta_gradient_agrees_with_central_finite_differences(one_thread):
    model, params, options = _setup(True, 2)
    batch = _episodes(tasks=2)
    options.update(inner_steps=2)
    _, grads = _grad(model, params, batch, vectorize=True, **options)
    g = torch.Generator().manual_seed(7)
    names = list(params)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in params.values()]
        norm = torch.sqrt(sum((d * d).sum() for d in direction))
        direction = [d / norm for d in direction]                       # unit length: eps is the step
        analytic = sum((d * gr).sum() for d, gr in zip(direction, grads, strict=True)).item()
        eps = 1e-6
        values = []
        for sign in (1, -1):
            shifted = mt.MetaParams.from_flat({n: (params[n] + sign * eps * d).detach() for n, d in zip(names, direction,
                                                                                             strict=True)})
            values.append(mt.maml_loss(model, shifted, batch, loss_fn=F.cross_entropy, vectorize=True,
                                       **options).item())
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(numeric - analytic) / abs(analytic) < 1e-6, (numeric, analytic)


def test_the_policy_knows_the_device(monkeypatch):
    model = mt.conv4(3, hidden=4, image_size=16, seed=0)
    assert not mt.prefers_vmap(model) and not mt.prefers_vmap(model, device="cpu")
    assert mt.prefers_vmap(model, device="cuda")
    assert not mt.prefers_vmap(mt.conv4(3, hidden=4, image_size=16, batch_norm="running"), device="cuda")
    from metatut import accel
    monkeypatch.setitem(accel._DOUBLE_BACKWARD, "mps", True)
    assert mt.prefers_vmap(model, device="mps")
    monkeypatch.setitem(accel._DOUBLE_BACKWARD, "mps", "aten::max_pool2d_with_indices_backward has no derivative")
    assert not mt.prefers_vmap(model, device="mps")
    # 'auto' on a CPU keeps the loop (measured faster here), also with per-step parameters
    assert policy.use_vmap(model, "auto") is False
    assert policy.use_vmap(model, "auto", per_step=True) is False
    assert policy.use_vmap(model, True, per_step=True) is True
    running = mt.conv4(3, hidden=4, image_size=16, batch_norm="running")
    with pytest.raises(mt.VectorizeError, match="per-step"):
        policy.use_vmap(running, True, per_step=True)


def test_auto_takes_the_batched_path_for_data_on_a_gpu(monkeypatch):
    """The probe's device decides 'auto' for convolutional models (a fake 'cuda' device type here)."""
    model = mt.conv4(3, hidden=4, image_size=16, seed=0)
    monkeypatch.setattr(policy, "_batches_convolutions", lambda device: device.type == "meta")
    x = torch.zeros(2, 3, 1, 16, 16, device="meta")
    probe = policy.Probe({}, x, x, x, x, loss_fn=None)
    assert policy.use_vmap(model, "auto", probe=probe) is True
    cpu = torch.zeros(2, 3, 1, 16, 16)
    assert policy.use_vmap(model, "auto", probe=policy.Probe({}, cpu, cpu, cpu, cpu, None)) is False


def test_training_command_records_the_execution_path(tmp_path):
    from metatut.cli import load_config, train
    out = tmp_path / "run"
    train(load_config(None, ["steps=2", "meta_batch=2", "eval_tasks=2", f"out_dir={out}"]))
    config = json.loads((out / "config.json").read_text())
    assert config["execution_path"] == "batched"                         # the sinusoid MLP on a CPU
    # the derived key is not a setting: a run's config.json is still a valid configuration file
    assert "execution_path" not in load_config(out / "config.json", []).to_dict()
    from metatut.run.build import execution_path, make_model
    cfg = load_config(None, ["task=omniglot", "width=4"]).resolved()
    assert execution_path(cfg, make_model(cfg), "cpu") == "loop"
    assert execution_path(cfg, make_model(cfg), "cuda") == "batched"
