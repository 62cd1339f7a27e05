"""The vmap-or-loop policy (metatut.engine.policy): a user's own nn.Module gets the vmap path when it is safe, a
model that cannot be judged statically is checked against the loop once at run time, and the unsafe ones run
the loop (with one warning when the runtime check is what refused them)."""
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metatut as mt
from metatut.engine import meta_loss as meta_loss_module
from metatut.engine import policy, verify

F64 = torch.float64


class MLP(nn.Module):
    """The three-layer MLP a researcher writes: nn.Linear layers and F.relu in forward."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(1, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


class Scaled(nn.Module):
    """A custom layer that owns an nn.Parameter directly: cannot be judged statically."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 8)
        self.out = nn.Linear(8, 1)
        self.gain = nn.Parameter(torch.full((8,), 1.5))

    def forward(self, x):
        return self.out(torch.tanh(self.gain * self.lin(x)))


class Counting(nn.Module):
    """Owns a buffer its forward pass updates: vmap updates it once per call, the loop once per task."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class Normalised(nn.Module):
    """Batch norm written inside a custom layer (F.batch_norm with its own parameters): no nn.BatchNorm to see."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 8)
        self.weight = nn.Parameter(torch.ones(8))
        self.bias = nn.Parameter(torch.zeros(8))
        self.out = nn.Linear(8, 1)
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))

    def forward(self, x):
        h = F.batch_norm(self.lin(x), self.running_mean, self.running_var, self.weight, self.bias, training=True)
        return self.out(F.relu(h))


def sinusoid(tasks=3, shots=5, dtype=F64, seed=0):
    return mt.SinusoidTasks().sample(tasks, shots, shots, generator=mt.make_generator(seed), dtype=dtype)


def flat_grad(model, params, batch, **options):
    loss = mt.maml_loss(model, params, batch, **options)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def spy_vmap(monkeypatch):
    """Records ``use_vmap`` of each maml_loss call (what the engine ran) and counts runtime checks."""
    record = {"use_vmap": [], "checks": 0}
    run, check = meta_loss_module.run_meta_loss, verify.vmap_matches_loop

    def run_spy(*args, use_vmap, **kwargs):
        record["use_vmap"].append(use_vmap)
        return run(*args, use_vmap=use_vmap, **kwargs)

    def check_spy(*args, **kwargs):
        record["checks"] += 1
        return check(*args, **kwargs)

    monkeypatch.setattr(meta_loss_module, "run_meta_loss", run_spy)
    monkeypatch.setattr(verify, "vmap_matches_loop", check_spy)
    return record


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_own_mlp_with_functional_relu_is_vmap_safe_and_equals_the_loop_in_float64(first_order, steps, spy_vmap):
    model = MLP().to(F64)
    assert policy.judge(model) == policy.VmapVerdict("safe", [])
    assert mt.can_vectorize(model) and mt.prefers_vmap(model)
    params = mt.init_params(model)
    batch = sinusoid(tasks=4)
    options = dict(inner_lr=0.05, inner_steps=steps, first_order=first_order)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = flat_grad(model, params, batch, **options)
    loop = flat_grad(model, params, batch, vectorize=False, **options)
    forced = flat_grad(model, params, batch, vectorize=True, **options)
    assert spy_vmap["use_vmap"] == [True, False, True] and spy_vmap["checks"] == 0   # judged statically
    assert rel(auto, loop) < 1e-12 and rel(forced, loop) < 1e-12


def test_custom_parameter_is_verified_at_run_time_once_then_runs_vmap(spy_vmap):
    model = Scaled()
    assert policy.judge(model) == policy.VmapVerdict("check", ["Scaled"])
    assert not mt.can_vectorize(model)                  # not yet known
    params = mt.init_params(model)
    batch = sinusoid(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [mt.maml_loss(model, params, sinusoid(dtype=torch.float32, seed=s), inner_lr=0.05) for s in range(3)]
    assert spy_vmap["checks"] == 1 and spy_vmap["use_vmap"] == [True, True, True]
    assert mt.can_vectorize(model) and mt.prefers_vmap(model)
    loop = mt.maml_loss(model, params, sinusoid(dtype=torch.float32, seed=2), inner_lr=0.05, vectorize=False)
    torch.testing.assert_close(losses[-1], loop, rtol=1e-5, atol=1e-6)
    # float64: the meta-gradients of both paths agree to round-off, both orders
    model64 = Scaled().to(F64)
    params64 = mt.init_params(model64)
    for first_order in (False, True):
        vm = flat_grad(model64, params64, sinusoid(), inner_lr=0.05, inner_steps=2, first_order=first_order,
                       vectorize=True)
        lp = flat_grad(model64, params64, sinusoid(), inner_lr=0.05, inner_steps=2, first_order=first_order,
                       vectorize=False)
        assert rel(vm, lp) < 1e-12
    assert batch.num_tasks == 3


@pytest.mark.parametrize("cls", [Counting, Normalised])
def test_failed_runtime_check_falls_back_to_the_loop_with_exactly_one_warning(cls, spy_vmap):
    model = cls().to(F64)
    params = mt.init_params(model)
    buffers_before = {k: v.clone() for k, v in model.named_buffers()}
    rng_before = torch.random.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            mt.maml_loss(model, params, sinusoid(seed=seed), inner_lr=0.05)
    vectorize_warnings = [w for w in caught if issubclass(w.category, mt.VectorizeWarning)]
    assert len(vectorize_warnings) == 1, [str(w.message) for w in caught]
    message = str(vectorize_warnings[0].message)
    assert cls.__name__ in message and "per-task loop" in message and "checked against the loop" in message
    assert spy_vmap["checks"] == 1 and spy_vmap["use_vmap"] == [False, False, False]
    assert not mt.can_vectorize(model)
    # the check ran on copies: the random-number state is untouched (the loop's own calls update buffers)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    with pytest.raises(mt.VectorizeError, match=rf"vectorize=True cannot run this model: its layers \['{cls.__name__}'\]"):
        mt.maml_loss(model, params, sinusoid(), inner_lr=0.05, vectorize=True)
    assert set(buffers_before) == {k for k, _ in model.named_buffers()}


def test_runtime_check_leaves_the_model_untouched():
    model = Counting().to(F64)
    probe = policy.Probe(mt.init_params(model), *(getattr(sinusoid(), n) for n in
                                                  ("support_x", "support_y", "query_x", "query_y")),
                         loss_fn=F.mse_loss, inner_lr=0.1)
    why = verify.vmap_matches_loop(model, probe)
    assert why.startswith(("vmap raised", "its second-order buffers differed")), why
    assert model.calls.item() == 0 and model.lin.weight.dtype == F64


def test_dropout_model_runs_the_loop_and_forced_vmap_is_refused(spy_vmap):
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)).to(F64)
    assert policy.judge(model) == policy.VmapVerdict("unsafe", ["Dropout"])
    assert not mt.can_vectorize(model) and not mt.prefers_vmap(model)
    params = mt.init_params(model)
    batch = sinusoid()
    torch.manual_seed(0)
    auto = mt.maml_loss(model, params, batch, inner_lr=0.05)
    torch.manual_seed(0)
    loop = mt.maml_loss(model, params, batch, inner_lr=0.05, vectorize=False)
    torch.testing.assert_close(auto, loop, rtol=0, atol=0)
    assert spy_vmap["use_vmap"] == [False, False] and spy_vmap["checks"] == 0      # no runtime check, no warning
    with pytest.raises(mt.VectorizeError, match=r"its layers \['Dropout'\]"):
        mt.maml_loss(model, params, batch, inner_lr=0.05, vectorize=True)


def test_conv4_special_case_is_gone_and_conv4_keeps_its_verdict():
    root = pathlib.Path(mt.__file__).parent
    for path in [root / "functional.py", *sorted((root / "engine").glob("*.py"))]:
        text = path.read_text()
        assert "is Conv4" not in text and "import Conv4" not in text, path
    assert mt.Conv4.vmap_safe is True
    plain = mt.conv4(3, hidden=4, image_size=16, batch_norm="none", seed=0)
    assert mt.can_vectorize(plain) and not mt.prefers_vmap(plain)       # verified, but the loop is faster on a CPU
    running = mt.conv4(3, hidden=4, image_size=16, batch_norm="running", seed=0)
    assert policy.judge(running) == policy.VmapVerdict("unsafe", ["BatchNorm2d"])
    # batch statistics: TaskBatchNorm2d, exact on the batched path (tests/test_batched_conv.py)
    batch = mt.conv4(3, hidden=4, image_size=16, batch_norm="batch", seed=0)
    assert policy.judge(batch) == policy.VmapVerdict("safe", [])


def test_registry_and_class_attribute_decide_for_custom_layers():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.g * x

    class Marked(Gain):
        vmap_safe = True

    class Refused(nn.Module):
        vmap_safe = False

        def forward(self, x):
            return x

    assert policy.judge(nn.Sequential(nn.Linear(1, 1), Gain())).kind == "check"
    assert policy.judge(nn.Sequential(nn.Linear(1, 1), Marked())).kind == "safe"
    assert policy.judge(nn.Sequential(nn.Linear(1, 1), Refused())) == policy.VmapVerdict("unsafe", ["Refused"])
    mt.register_vmap_verified(Gain)
    try:
        assert policy.judge(nn.Sequential(nn.Linear(1, 1), Gain())).kind == "safe"
    finally:
        policy._REGISTERED.discard(Gain)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        mt.register_vmap_verified(int)


@pytest.mark.parametrize("conv", ["1d", "3d"])
@pytest.mark.parametrize("first_order", [False, True])
def test_conv1d_and_conv3d_are_verified_in_float64(conv, first_order):
    torch.manual_seed(0)
    if conv == "1d":
        model = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 2)).to(F64)
        shape = (1, 6)
    else:
        model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 27, 2)).to(F64)
        shape = (1, 3, 3, 3)
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(2, 4, *shape, generator=g, dtype=F64), torch.randn(2, 4, *shape, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 0, 1]).expand(2, -1).contiguous()
    batch = mt.TaskBatch(sx, y, qx, y)
    params = mt.init_params(model)
    options = dict(inner_lr=0.3, inner_steps=2, first_order=first_order, loss_fn=F.cross_entropy)
    assert mt.can_vectorize(model)
    assert rel(flat_grad(model, params, batch, vectorize=True, **options),
               flat_grad(model, params, batch, vectorize=False, **options)) < 1e-12


# ------------------------------------------------------------------------------------------ the option objects
def test_option_objects_equal_the_keywords_and_are_validated_once():
    model = MLP().to(F64)
    params = mt.init_params(model)
    batch = sinusoid()
    keywords = mt.maml_loss(model, params, batch, inner_lr=0.05, inner_steps=2, step_weights=[0.3, 0.7],
                            vectorize=False)
    objects = mt.maml_loss(model, params, batch, options=mt.MetaOptions(inner_lr=0.05, inner_steps=2,
                                                                         step_weights=[0.3, 0.7]),
                           execution=mt.ExecutionOptions(vectorize=False))
    torch.testing.assert_close(objects, keywords, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"\['inner_steps'\] either as keywords or inside options="):
        mt.maml_loss(model, params, batch, options=mt.MetaOptions(inner_lr=0.05), inner_steps=3)
    with pytest.raises(TypeError, match="needs inner_lr"):
        mt.maml_loss(model, params, batch)
    with pytest.raises(ValueError, match="step_weights must have one weight per inner step"):
        mt.MetaOptions(inner_lr=0.1, inner_steps=2, step_weights=[1.0])
    with pytest.raises(ValueError, match="vectorize must be True, False or 'auto'"):
        mt.ExecutionOptions(vectorize="yes")
    with pytest.raises(TypeError, match="task_workers must be an int"):
        mt.ExecutionOptions(task_workers=1.5)
    with pytest.raises(TypeError, match="first_order must be True or False"):
        mt.MetaOptions(inner_lr=0.1, first_order="no")
    objective = mt.maml_objective(model, options=mt.MetaOptions(inner_lr=0.05, inner_steps=2),
                                  first_order_until=5, msl_anneal_iterations=10)
    at_step = objective.options_at(0)["options"]
    assert at_step.first_order and at_step.step_weights.shape == (2,)
    assert objective(params, batch, step=0).shape == ()


def test_cached_structure_facts_follow_a_model_that_changes():
    """The policy's verdict and the parameter names are cached per model (so that each call does not walk the model
    many times), and recomputed as soon as the model's submodules, parameters or buffers change."""
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    batch = mt.SinusoidTasks().sample(2, 3, generator=mt.make_generator(0))
    assert mt.prefers_vmap(model)
    model[1] = nn.Dropout(0.1)                       # a known-unsafe layer replaces the activation
    assert not mt.prefers_vmap(model)
    with pytest.raises(mt.VectorizeError, match="Dropout"):
        mt.maml_loss(model, mt.init_params(model), batch, inner_lr=0.1, vectorize=True)
    params = mt.init_params(model)
    model.append(nn.Linear(1, 1))                    # a new parameterised layer: params now lack its tensors
    with pytest.raises(ValueError, match=r"missing the model's parameters \['3.weight', '3.bias'\]"):
        mt.maml_loss(model, params, batch, inner_lr=0.1)
