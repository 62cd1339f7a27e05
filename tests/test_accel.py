"""The fast paths: vmap through conv4, conv4's fast forward, bf16 autocast, torch.compile, device fallback."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import metatut as mt
from metatut import accel


def _episodes(tasks=3, n_way=3, k_shot=1, q_query=2, size=28, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Sparse binary "ink" like Omniglot, so that max-pool windows hold ties as real images do.
    sx = (torch.rand(tasks, n_way * k_shot, 1, size, size, generator=g) > 0.8).to(dtype)
    qx = (torch.rand(tasks, n_way * q_query, 1, size, size, generator=g) > 0.8).to(dtype)
    sy = torch.arange(n_way).repeat(k_shot).expand(tasks, -1).contiguous()
    qy = torch.arange(n_way).repeat(q_query).expand(tasks, -1).contiguous()
    return mt.TaskBatch(sx, sy, qx, qy)


def _flat_grad(model, params, batch, **options):
    loss = mt.maml_loss(model, params, batch, loss_fn=F.cross_entropy, **options)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
def test_vmap_through_conv4_without_batch_norm_matches_the_loop_in_float64(one_thread, first_order, steps,
                                                                           downsample):
    model = mt.conv4(3, hidden=4, seed=0, batch_norm="none", downsample=downsample).double()
    assert mt.can_vectorize(model)
    params = mt.init_params(model)
    batch = _episodes()
    options = dict(inner_lr=0.4, inner_steps=steps, first_order=first_order)
    loop = _flat_grad(model, params, batch, vectorize=False, **options)
    vmapped = _flat_grad(model, params, batch, vectorize=True, **options)
    chunked = _flat_grad(model, params, batch, vectorize=True, vmap_chunk_size=2, **options)
    assert loop.abs().max() > 1e-3                        # a real gradient, not zeros
    assert _rel(vmapped, loop) < 1e-10
    assert _rel(chunked, loop) < 1e-10


def _batch_norm_by_hand(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                        eps=1e-5):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).square().mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_conv4_with_batch_norm_runs_the_loop_which_matches_batch_norm_written_by_hand(one_thread, monkeypatch):
    """The reference for the vmap decision: with batch norm as elementary operations, the loop and vmap agree
    (so the hand-written version is a trustworthy second-order reference), and the loop with PyTorch's batch
    norm agrees with it. (PyTorch's batch norm under vmap does not, in second order: it is not verified.)"""
    model = mt.conv4(3, hidden=4, seed=0).double()
    # conv4's batch_norm='batch' is TaskBatchNorm2d, verified under vmap (its batched path is batch norm by hand,
    # tests/test_batched_conv.py); PyTorch's own nn.BatchNorm2d stays unverified:
    assert mt.can_vectorize(model)
    native = mt.conv4(3, hidden=4, seed=0)
    for block in native.features:
        block[1] = torch.nn.BatchNorm2d(4, track_running_stats=False)
    assert not mt.can_vectorize(native)
    params = mt.init_params(model)
    batch = _episodes(tasks=2, dtype=torch.float64)
    batch = mt.TaskBatch(torch.rand(batch.support_x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                         batch.support_y, batch.query_x, batch.query_y)
    native_loop = _flat_grad(model, params, batch, inner_lr=0.4, vectorize=False)
    monkeypatch.setattr(torch.nn.modules.batchnorm.F, "batch_norm", _batch_norm_by_hand)
    # With batch norm written out in elementary operations, vmap through it is verified here: let the engine
    # take that path (vectorize=True refuses nn.BatchNorm2d otherwise, mt.VectorizeError).
    # (The policy reads the list where it lives since the engine split: metatut.engine.policy.)
    monkeypatch.setattr(mt.engine.policy, "VMAP_VERIFIED_LAYERS",
                        (*mt.functional.VMAP_VERIFIED_LAYERS, torch.nn.BatchNorm2d))
    by_hand_loop = _flat_grad(model, params, batch, inner_lr=0.4, vectorize=False)
    by_hand_vmap = _flat_grad(model, params, batch, inner_lr=0.4, vectorize=True)
    assert _rel(by_hand_vmap, by_hand_loop) < 1e-10
    assert _rel(native_loop, by_hand_loop) < 1e-10


def test_vmap_chunk_size_is_validated():
    model = mt.mlp(seed=0)
    batch = mt.SinusoidTasks().sample(2, 5, 5, generator=mt.make_generator(0))
    with pytest.raises(ValueError, match="vmap_chunk_size"):
        mt.maml_loss(model, mt.init_params(model), batch, inner_lr=0.01, vmap_chunk_size=0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conv4_fast_forward_equals_the_plain_sequential(one_thread, dtype, tolerance):
    model = mt.conv4(3, hidden=8, seed=1).to(dtype)
    params = mt.init_params(model)
    batch = _episodes(dtype=dtype, seed=3)
    grads = {}
    outputs = {}
    for fast in (False, True):
        model.fast = fast
        outputs[fast] = model(batch.query_x[0])
        grads[fast] = _flat_grad(model, params, batch, inner_lr=0.4, vectorize=False)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=tolerance, atol=tolerance)
    assert _rel(grads[True], grads[False]) < tolerance


def test_precision_is_validated_and_float32_autocast_is_a_no_op():
    with pytest.raises(ValueError, match="precision must be one of"):
        accel.check_precision("fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        accel.autocast("cpu", "half")
    with accel.autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with accel.autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_bf16_autocast_meta_gradient_points_the_same_way(one_thread):
    model = mt.conv4(5, hidden=32, seed=0)
    params = mt.init_params(model)
    batch = _episodes(dtype=torch.float32, tasks=2, n_way=5, q_query=5)
    reference = _flat_grad(model, params, batch, inner_lr=0.4, vectorize=False)
    with accel.autocast("cpu", "bfloat16"):
        loss = mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, vectorize=False)
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(g.dtype == torch.float32 for g in grads)    # float32 parameters get float32 gradients
    low = torch.cat([g.flatten() for g in grads])
    # bf16 keeps 8 bits of mantissa: the meta-gradient moves by 1e-1 or more relative (here ~0.2; ~0.09 on
    # Omniglot at width 64, bench/RESULTS.md), but points the same way.
    assert F.cosine_similarity(low, reference, dim=0) > 0.95
    assert 0 < _rel(low, reference) < 0.4


def test_meta_train_bf16_precision_trains_and_validates(one_thread):
    model = mt.mlp(seed=0)
    params = mt.init_params(model)
    tasks = mt.SinusoidTasks()
    objective = mt.maml_objective(model, inner_lr=0.01)
    result = mt.meta_train(objective, params, lambda g: tasks.sample(10, 10, 10, generator=g), steps=300,
                           meta_lr=1e-2, generator=mt.make_generator(0), progress_bar=False, precision="bfloat16")
    assert torch.isfinite(result.losses).all()
    assert result.losses[-50:].mean() < 0.7 * result.losses[:50].mean()
    assert all(p.dtype == torch.float32 for p in params.values())
    with pytest.raises(ValueError, match="precision"):
        mt.meta_train(objective, params, lambda g: tasks.sample(5, 10, 10, generator=g), steps=1,
                      progress_bar=False, precision="int8")


def test_compile_objective_refuses_double_backward_through_the_loop_and_passes_through_when_off():
    def objective(params, batch):
        return torch.zeros(())
    assert accel.compile_objective(objective, enabled=False, vectorized=False) is objective
    with pytest.raises(ValueError, match="torch.compile does not support"):
        accel.compile_objective(objective, enabled=True, vectorized=False, first_order=False)


def test_compiled_vmap_maml_matches_eager(one_thread):
    model = mt.mlp(hidden=(8, 8), seed=0)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(4, 5, 5, generator=mt.make_generator(0))

    def objective(p, b):
        return mt.maml_loss(model, p, b, inner_lr=0.01, vectorize=True)
    compiled = accel.compile_objective(objective, enabled=True, vectorized=True)
    eager = torch.autograd.grad(objective(params, batch), list(params.values()))
    fast = torch.autograd.grad(compiled(params, batch), list(params.values()))
    for a, b in zip(fast, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_supports_double_backward_on_cpu_and_mps_fallback_warns(monkeypatch):
    assert accel.supports_double_backward("cpu") is True
    assert accel.maml_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(accel, "pick_device", lambda prefer=None: torch.device("mps"))
    monkeypatch.setitem(accel._DOUBLE_BACKWARD, "mps", "aten::max_pool2d_with_indices_backward has no derivative")
    with pytest.warns(RuntimeWarning, match="max_pool2d.*runs on the CPU"):
        assert accel.maml_device(second_order=True) == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accel.maml_device(second_order=False) == torch.device("mps")


def test_bf16_supported_answers_for_each_device_type():
    assert isinstance(accel.bf16_supported("cpu"), bool)
    assert accel.bf16_supported("mps") is True
    assert accel.bf16_supported("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_task_workers_give_the_loop_meta_gradient_in_float64(first_order, reduction):
    model = mt.conv4(3, hidden=4, seed=0).double()
    params = mt.init_params(model)
    batch = _episodes(tasks=5, dtype=torch.float64)
    threads_before = torch.get_num_threads()
    options = dict(inner_lr=0.4, inner_steps=2, first_order=first_order, reduction=reduction, vectorize=False)
    loop_loss = mt.maml_loss(model, params, batch, loss_fn=F.cross_entropy, **options)
    loop = torch.autograd.grad(loop_loss, list(params.values()))
    threaded_loss = mt.maml_loss(model, params, batch, loss_fn=F.cross_entropy, task_workers=3, **options)
    threaded_loss.backward()
    assert torch.get_num_threads() == threads_before              # intra-op threads restored
    torch.testing.assert_close(threaded_loss.detach(), loop_loss.detach(), rtol=1e-12, atol=0)
    for name, g in zip(params, loop, strict=True):
        torch.testing.assert_close(params[name].grad, g, rtol=1e-10, atol=1e-12)
    assert all(p.grad is not None for p in params.values())


def test_task_workers_refuse_a_second_derivative_models_with_buffers_and_bad_counts():
    model = mt.conv4(3, hidden=4, seed=0)
    params = mt.init_params(model)
    batch = _episodes(tasks=2, dtype=torch.float32)
    loss = mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, task_workers=2)
    (g,) = torch.autograd.grad(loss, [params["head.bias"]], create_graph=False)
    assert g.shape == (3,)
    loss = mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, task_workers=2)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, [params["head.bias"]], create_graph=True)
    with torch.no_grad():
        value = mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, task_workers=2)
    assert not value.requires_grad and torch.isfinite(value)
    running = mt.conv4(3, hidden=4, batch_norm="running", seed=0)
    with pytest.raises(ValueError, match="without buffers"):
        mt.maml_loss(running, mt.init_params(running), batch, inner_lr=0.4, loss_fn=F.cross_entropy, task_workers=2)
    with pytest.raises(ValueError, match="task_workers"):
        mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, task_workers=0)


def test_speed_switches_are_named_configuration_options_checked_before_any_work():
    from metatut.cli import ConfigError, load_config
    cfg = load_config(None, ["precision=bfloat16", "compile=true", "task_workers=2"])
    assert (cfg.precision, cfg.compile, cfg.task_workers) == ("bfloat16", True, 2)
    assert load_config(None, []).to_dict()["precision"] == "float32"
    for bad, message in (("precision=fp16", "precision must be one of"), ("compile=yes", "compile must be one of"),
                         ("task_workers=0", "task_workers must be an int >= 1")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def test_training_command_refuses_compile_for_the_second_order_loop(tmp_path):
    from metatut.cli import ConfigError, load_config, train
    cfg = load_config(None, ["task=omniglot", "dataset=small", "compile=true", f"out_dir={tmp_path / 'run'}"])
    if mt.data.offline_omniglot_dir() is None:
        pytest.skip("the offline Omniglot sets are not here")
    with pytest.raises(ConfigError, match="compile: compile=True needs the vmap path or first-order"):
        train(cfg)
    assert not (tmp_path / "run").exists()                 # refused before any work or file


def test_per_task_backward_frees_each_task_graph_and_gives_the_loop_gradient():
    import weakref
    model = mt.conv4(3, hidden=4, seed=0).double()
    params = mt.init_params(model)
    batch = _episodes(tasks=4, dtype=torch.float64)
    alive = {}
    for per_task in (False, True):
        saved = []

        def pack(tensor, saved=saved):
            saved.append(weakref.ref(tensor))
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = mt.maml_loss(model, params, batch, inner_lr=0.4, loss_fn=F.cross_entropy, vectorize=False,
                                per_task_backward=per_task)
        alive[per_task] = sum(1 for ref in saved if ref() is not None and ref().numel() > 1000)
        loss.backward()
        alive[per_task, "grad"] = torch.cat([p.grad.flatten() for p in params.values()])
        for p in params.values():
            p.grad = None
    assert alive[False] > 20 and alive[True] == 0       # the graph path holds every task's activations
    assert _rel(alive[True, "grad"], alive[False, "grad"]) < 1e-12
