"""Structured meta-parameters (issue "metatut as a library researchers adopt", section 4): :class:`metatut.MetaParams`
holds the model's parameters, learned inner step sizes and MAML++ per-step copies apart, so that a model's own
submodule named ``per_step`` or ``inner_lr`` is just a submodule; optimisers and checkpoints see one flat dict."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metatut as mt

F64 = torch.float64


class Net(nn.Module):
    """A small regression net whose submodules are named by the caller (``per_step``/``inner_lr`` or not)."""

    def __init__(self, first="body", second="head", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.first, self.second = first, second
        self.add_module(first, nn.Sequential(nn.Linear(1, 16), nn.Tanh()))
        self.add_module(second, nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)))

    def forward(self, x):
        return getattr(self, self.second)(getattr(self, self.first)(x))


def sinusoids(tasks=4, shots=8, seed=10):
    return mt.SinusoidTasks().sample(tasks, shots, shots, generator=mt.make_generator(seed), dtype=F64)


def grads(loss, params):
    """``{key: gradient}``; zeros for tensors the loss does not use (originals replaced by per-step copies)."""
    values = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(params, values, strict=True))


def renamed(names, mapping):
    out = []
    for n in names:
        head, _, rest = n.partition(".")
        out.append(f"{mapping.get(head, head)}.{rest}")
    return out


@pytest.mark.parametrize("first,second", [("per_step", "inner_lr"), ("inner_lr", "per_step"), ("body", "per_step")])
def test_submodules_named_like_the_conventions_train_with_maml(first, second):
    """Before: a submodule named ``per_step`` broke maml_loss (its parameters were taken for per-step copies), and
    one named ``inner_lr`` was taken for learned step sizes. Now they are the model's parameters, and the
    meta-gradient equals that of the same model with plain names (float64)."""
    odd, plain = Net(first, second).to(F64), Net("body", "head").to(F64)
    p_odd, p_plain = mt.init_params(odd), mt.init_params(plain)
    assert renamed(p_odd, {first: "body", second: "head"}) == list(p_plain)
    for a, b in zip(p_odd.values(), p_plain.values(), strict=True):
        assert torch.equal(a, b)
    batch = sinusoids()
    kw = dict(inner_lr=0.05, inner_steps=2)
    g_odd = grads(mt.maml_loss(odd, p_odd, batch, **kw), p_odd)
    g_plain = grads(mt.maml_loss(plain, p_plain, batch, **kw), p_plain)
    for a, b in zip(g_odd.values(), g_plain.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_meta_params_with_submodules_named_like_the_conventions():
    """The structured form with such a model: learned step sizes and per-step copies of the ``per_step``
    submodule's parameters, same meta-gradient as the plainly named model (float64)."""
    odd, plain = Net("per_step", "inner_lr").to(F64), Net("body", "head").to(F64)
    p_odd, p_plain = mt.init_params(odd), mt.init_params(plain)
    batch = sinusoids()
    out = {}
    for model, params, first in ((odd, p_odd, "per_step"), (plain, p_plain, "body")):
        meta = (mt.MetaParams(params).with_learned_lrs(init=0.03, granularity="tensor", steps=2)
                .with_per_step([f"{first}.0.bias"], steps=2))
        assert sorted(meta.per_step) == [0, 1, 2] and sorted(meta.inner_lrs) == [0, 1]
        out[first] = list(grads(mt.maml_loss(model, meta, batch, inner_lr="learned", inner_steps=2), meta).values())
    for a, b in zip(out["per_step"], out["body"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def mlp_setup():
    model = mt.mlp(hidden=(16, 16), seed=0).to(F64)
    return model, mt.init_params(model), sinusoids()


@pytest.mark.parametrize("granularity,steps", [("parameter", None), ("tensor", 3), ("parameter", 2)])
def test_learned_rates_through_meta_params_equal_the_legacy_dict(granularity, steps):
    """Meta-SGD (shared rates) and MAML++ (per-step rates): same loss and meta-gradients, float64, 1e-12."""
    model, params, batch = mlp_setup()
    inner_steps = steps or 1
    lrs = mt.learned_inner_lrs(params, init=0.05, granularity=granularity, steps=steps)
    with torch.no_grad():                       # different rates per tensor and step, so that a mix-up shows
        for i, v in enumerate(lrs.values()):
            v.mul_(1 + 0.1 * i)
    legacy = {**params, **lrs}
    meta = mt.MetaParams(params, inner_lrs=lrs)
    assert all(meta[k] is v for k, v in params.items()) and len(meta) == len(legacy)
    kw = dict(inner_lr="learned", inner_steps=inner_steps)
    loss_legacy, loss_meta = mt.maml_loss(model, legacy, batch, **kw), mt.maml_loss(model, meta, batch, **kw)
    torch.testing.assert_close(loss_meta, loss_legacy, rtol=1e-12, atol=0)
    g_legacy, g_meta = grads(loss_legacy, legacy), grads(loss_meta, meta)
    worst = 0.0
    for key, g in g_legacy.items():
        kind, step, name = mt.engine.conventions.classify_key(key, set(params))
        new_key = key if kind == "model" else (f"inner_lr:{name}" if step is None else f"inner_lr:step{step}:{name}")
        torch.testing.assert_close(g_meta[new_key], g, rtol=1e-12, atol=1e-14)
        worst = max(worst, float((g_meta[new_key] - g).abs().max()))
    assert worst <= 1e-12
    assert any(g.abs().sum() > 0 for k, g in g_meta.items() if k.startswith("inner_lr:"))


def test_per_step_copies_through_meta_params_equal_the_legacy_dict():
    """MAML++'s per-step batch-norm weights and biases with learned per-step rates, float64, 1e-12."""
    model = mt.conv4(3, hidden=4, batch_norm="batch", seed=0).to(F64)
    params = mt.init_params(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, 1, 28, 28, generator=g, dtype=F64)
    y = torch.arange(3).repeat(2).expand(2, -1)
    batch = mt.TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    bn = mt.batch_norm_names(model)
    lrs = mt.learned_inner_lrs(params, init=0.1, granularity="tensor", steps=2)
    copies = mt.per_step_params(params, bn, steps=2)
    with torch.no_grad():
        for i, v in enumerate(copies.values()):
            v.add_(0.01 * i)
    legacy = {**params, **lrs, **copies}
    meta = mt.MetaParams(params, inner_lrs=lrs, per_step=copies)
    assert [sorted(meta.per_step[k]) for k in range(3)] == [sorted(bn)] * 3
    kw = dict(inner_lr="learned", inner_steps=2, loss_fn=F.cross_entropy)
    loss_legacy, loss_meta = mt.maml_loss(model, legacy, batch, **kw), mt.maml_loss(model, meta, batch, **kw)
    torch.testing.assert_close(loss_meta, loss_legacy, rtol=1e-12, atol=0)
    by_tensor = {id(v): g for v, g in zip(legacy.values(), grads(loss_legacy, legacy).values(), strict=True)}
    g_meta = grads(loss_meta, meta)
    assert len(by_tensor) == len(g_meta)
    for key, gm in g_meta.items():
        torch.testing.assert_close(gm, by_tensor[id(meta[key])], rtol=1e-12, atol=1e-14)
    assert g_meta[f"per_step:1:{bn[0]}"].abs().sum() > 0


def test_adam_over_meta_params_steps_every_tensor():
    model, params, batch = mlp_setup()
    meta = mt.MetaParams(params).with_learned_lrs(init=0.02, granularity="tensor", steps=2)
    before = {k: v.detach().clone() for k, v in meta.items()}
    optimizer = torch.optim.Adam(meta.values(), lr=1e-3)
    mt.maml_loss(model, meta, batch, inner_lr="learned", inner_steps=2).backward()
    optimizer.step()
    assert all(not torch.equal(before[k], v.detach()) for k, v in meta.items())
    result = mt.meta_train(mt.maml_objective(model, inner_lr="learned", inner_steps=2), meta, lambda g: batch,
                           steps=2, meta_lr=1e-3, progress_bar=False, check=False)
    assert result.params is meta and isinstance(result.params, mt.MetaParams)


def test_flat_view_and_structure_round_trip():
    model, params, _ = mlp_setup()
    meta = mt.MetaParams(params).with_learned_lrs(granularity="tensor", steps=2).with_per_step(["4.bias"], steps=2)
    flat = dict(meta)
    assert type(flat) is dict and all(isinstance(k, str) for k in flat)
    assert list(flat)[len(params):len(params) + 2] == ["inner_lr:step0:0.weight", "inner_lr:step0:0.bias"]
    assert "per_step:2:4.bias" in flat
    again = mt.MetaParams.from_flat(flat)
    assert list(again) == list(meta) and all(again[k] is meta[k] for k in meta)
    assert again.model.keys() == params.keys() and all(again.model[k] is params[k] for k in params)
    assert again.inner_lrs.keys() == {0, 1} and again.per_step.keys() == {0, 1, 2}
    assert mt.MetaParams(again.model, inner_lrs=again.inner_lrs, per_step=again.per_step) == meta  # nested form
    # the legacy flat dict converts to the same structure (same tensors)
    legacy = {**params, **mt.learned_inner_lrs(params, steps=1)}
    converted = mt.MetaParams.from_flat(legacy, model=model)
    assert list(converted)[len(params)] == "inner_lr:step0:0.weight"
    assert all(converted[k] is v for k, v in zip(converted, legacy.values(), strict=True))
    assert mt.split_learned_lrs(converted)[1].keys() == {f"inner_lr:step0:{n}" for n in params}
    assert "MetaParams(model=6 tensors, inner_lrs={0: 6, 1: 6}" in repr(meta)


def test_meta_params_refuses_what_it_cannot_represent():
    model, params, batch = mlp_setup()
    with pytest.raises(ValueError, match="contain ':'"):
        mt.MetaParams({"a:b.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="names parameters that are not in the model's parameters"):
        mt.MetaParams(params, inner_lrs={None: {"nope": torch.zeros(())}})
    with pytest.raises(ValueError, match="names none of the parameters"):
        mt.MetaParams(params, per_step={"per_step.0.nope": torch.zeros(())})
    with pytest.raises(ValueError, match="malformed per-step key"):
        mt.MetaParams.from_flat({**params, "per_step:x:4.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="already in these meta-parameters"):
        mt.MetaParams(params).with_learned_lrs().with_learned_lrs()
    odd = nn.Sequential()
    odd.add_module("a:b", nn.Linear(1, 1))
    odd = odd.to(F64)
    p_odd = mt.init_params(odd)
    assert mt.maml_loss(odd, p_odd, batch, inner_lr=0.1).shape == ()          # ':' is fine without MetaParams
    with pytest.raises(ValueError, match="contain ':'"):
        mt.maml_loss(odd, {**p_odd, "inner_lr:a:b.weight": torch.ones((), dtype=F64)}, batch, inner_lr="learned")


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_of_meta_params(tmp_path):
    model, params, batch = mlp_setup()
    meta = mt.MetaParams(params).with_learned_lrs(init=0.02, granularity="tensor", steps=2)
    optimizer = torch.optim.Adam(meta.values(), lr=1e-3)
    mt.maml_loss(model, meta, batch, inner_lr="learned", inner_steps=2).backward()
    optimizer.step()
    path = mt.save_checkpoint(tmp_path / "c.pt", meta, optimizer=optimizer, step=1)
    raw = torch.load(path, weights_only=True)                     # plain data: loads with weights_only=True
    assert raw["format_version"] == 2 and raw["meta_params"] is True and type(raw["params"]) is dict
    state = mt.load_checkpoint(path)
    loaded = state["params"]
    assert isinstance(loaded, mt.MetaParams) and list(loaded) == list(meta)
    assert loaded.inner_lrs.keys() == {0, 1} and loaded.model.keys() == params.keys()
    for k in meta:
        assert torch.equal(loaded[k], meta[k].detach())
    resumed = torch.optim.Adam(loaded.values(), lr=1e-3)
    mt.load_checkpoint(path, optimizer=resumed)
    for o, p in ((optimizer, meta), (resumed, loaded)):
        o.zero_grad()
        mt.maml_loss(model, p, batch, inner_lr="learned", inner_steps=2).backward()
        o.step()
    for k in meta:
        assert torch.equal(loaded[k], meta[k]), k
    plain = mt.load_checkpoint(mt.save_checkpoint(tmp_path / "p.pt", params))["params"]   # a plain dict stays one
    assert type(plain) is dict and list(plain) == list(params)


def _legacy_checkpoint(path, params, optimizer, step, config=None, extra=None):
    """A checkpoint as metatut wrote it before MetaParams: format 1, legacy keys, no 'meta_params'."""
    torch.save({"format_version": 1, "params": {k: v.detach().clone() for k, v in params.items()},
                "optimizer": optimizer.state_dict(), "config": config or {}, "step": step, "extra": extra or {},
                "torch_version": str(torch.__version__)}, path)


def test_legacy_meta_sgd_checkpoint_loads_and_converts(tmp_path):
    model, params, batch = mlp_setup()
    legacy = {**params, **mt.learned_inner_lrs(params, init=0.02)}
    optimizer = torch.optim.Adam(legacy.values(), lr=1e-3)
    mt.maml_loss(model, legacy, batch, inner_lr="learned").backward()
    optimizer.step()
    _legacy_checkpoint(tmp_path / "old.pt", legacy, optimizer, 1)
    state = mt.load_checkpoint(tmp_path / "old.pt")
    loaded = state["params"]
    assert list(loaded) == list(legacy)                                     # loads as it was saved
    loss = mt.maml_loss(model, loaded, batch, inner_lr="learned")          # ... and the engine reads it
    torch.testing.assert_close(loss, mt.maml_loss(model, legacy, batch, inner_lr="learned"), rtol=1e-12, atol=0)
    meta = mt.MetaParams.from_flat(loaded, model=model)                    # the structured form, same tensors
    assert list(meta) == [*params, *(f"inner_lr:{n}" for n in params)]
    assert all(meta[k] is v for k, v in zip(meta, loaded.values(), strict=True))
    resumed = torch.optim.Adam(meta.values(), lr=1e-3)
    mt.load_checkpoint(tmp_path / "old.pt", optimizer=resumed)             # the optimiser's state still fits
    assert resumed.state_dict()["state"][len(params)]["exp_avg"].shape == params["0.weight"].shape


def test_resume_of_a_legacy_meta_sgd_run_via_the_training_command(tmp_path):
    """A Meta-SGD run checkpointed by an earlier metatut (legacy keys, format 1) resumes and ends where an
    uninterrupted run ends."""
    from metatut import cli

    def config(name, **changes):
        return cli.TrainConfig(task="sinusoid", algorithm="metasgd", steps=8, meta_batch=2, width=8, shots=3,
                               query=3, eval_tasks=4, log_every=2, eval_every=8, checkpoint_every=4, progress=False,
                               seed=3, out_dir=str(tmp_path / name), **changes).validate()

    full = cli.train(config("full"))
    first = cli.train(config("split"), stop_after=4)
    assert first["step"] == 4 and isinstance(first["params"], mt.MetaParams)
    path = tmp_path / "split" / "checkpoint.pt"
    new = torch.load(path, weights_only=True)
    assert any(k.startswith("inner_lr:") for k in new["params"])
    old_keys = {f"inner_lr:{n}": f"inner_lr.{n}" for n in first["params"].model}
    old = {**new, "format_version": 1, "params": {old_keys.get(k, k): v for k, v in new["params"].items()}}
    del old["meta_params"]
    torch.save(old, path)
    resumed = cli.train(config("split"), resume=True)
    assert resumed["step"] == 8 and list(resumed["params"]) == list(full["params"])
    for k in full["params"]:
        assert torch.equal(full["params"][k].detach(), resumed["params"][k].detach()), k
    assert mt.load_checkpoint(path)["params"].keys() == full["params"].keys()   # saved again in the new form


def test_learned_rates_that_the_inner_optimiser_does_not_read_are_reported_not_silently_ignored():
    """A numeric inner_lr (or another optimiser) leaves learned step sizes with a zero meta-gradient: a warning,
    attributed to the caller's line, says so; inner_lr='learned' and evaluation without gradients stay quiet."""
    import warnings

    model = mt.mlp(hidden=(8,), seed=0).double()
    meta = mt.MetaParams(mt.init_params(model)).with_learned_lrs(init=0.05)
    batch = mt.SinusoidTasks().sample(3, 5, 5, generator=mt.make_generator(0), dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"learned inner step sizes .* inner_lr='learned'") as caught:
        mt.maml_loss(model, meta, batch, inner_lr=0.05)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mt.maml_loss(model, meta, batch, inner_lr="learned")
        with torch.no_grad():
            mt.adaptation_curve(model, meta, batch, inner_lr=0.05, steps=1)
