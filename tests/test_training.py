"""The training loop, evaluation statistics, devices and budget profiles."""
import math

import pytest
import torch

import metatut as mt


def _train(steps, seed=0, objective="maml"):
    model = mt.mlp(seed=seed)
    params = mt.init_params(model)
    tasks = mt.SinusoidTasks()
    obj = mt.maml_objective(model, inner_lr=0.01) if objective == "maml" else mt.summed_loss_objective(model)
    return model, mt.meta_train(obj, params, lambda g: tasks.sample(5, 10, 10, generator=g), steps=steps,
                                generator=mt.make_generator(seed), progress_bar=False)


def test_meta_train_is_deterministic_on_cpu_and_updates_in_place():
    _, a = _train(15)
    _, b = _train(15)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    assert torch.equal(a.losses, b.losses)
    _, c = _train(15, seed=1)
    assert not torch.equal(a.losses, c.losses)
    assert a.losses.shape == (15,) and a.steps == 15
    assert a.smoothed(5).shape == (11,)


def test_meta_train_reduces_the_meta_loss_on_held_out_tasks():
    model = mt.mlp(seed=0)
    params = mt.init_params(model)
    held_out = mt.SinusoidTasks().sample(200, 10, 10, generator=mt.make_generator(99))
    before = mt.maml_loss(model, params, held_out, inner_lr=0.01).item()
    _, result = _train(300)
    after = mt.maml_loss(model, result.params, held_out, inner_lr=0.01).item()
    assert after < 0.85 * before  # measured: 4.70 -> 3.53 after 300 iterations


def test_meta_train_stops_on_nan_with_a_clear_error():
    model = mt.mlp(seed=0)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))

    def exploding(p, b):
        return mt.summed_task_loss(model, p, b) * float("nan")

    with pytest.raises(FloatingPointError, match="NaN or infinite at step 0"):
        mt.meta_train(exploding, params, lambda g: batch, steps=3, progress_bar=False)


def test_meta_train_warns_when_the_loss_does_not_fall():
    model = mt.mlp(seed=0)
    params = mt.init_params(model)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
    counter = {"n": 0}

    def rising(p, b):
        counter["n"] += 1
        return mt.summed_task_loss(model, p, b) * 0 + counter["n"]

    with pytest.warns(UserWarning, match="did not decrease"):
        mt.meta_train(rising, params, lambda g: batch, steps=40, progress_bar=False)


def test_meta_train_bad_arguments():
    model = mt.mlp()
    params = mt.init_params(model)
    obj = mt.summed_loss_objective(model)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        mt.meta_train(obj, params, lambda g: None, steps=0)
    with pytest.raises(ValueError, match="meta_lr must be a finite number > 0"):
        mt.meta_train(obj, params, lambda g: None, steps=1, meta_lr=-1.0)
    frozen = {k: v.detach() for k, v in params.items()}
    with pytest.raises(ValueError, match="leaf tensors with requires_grad=True"):
        mt.meta_train(obj, frozen, lambda g: None, steps=1)
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
        mt.maml_objective(model, inner_lr=-1)


def test_summarize_is_mean_and_1_96_standard_errors():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    s = mt.summarize(values)
    std = math.sqrt(sum((v - 3.5) ** 2 for v in [1, 2, 4, 7]) / 3)
    assert s.n == 4 and s.mean == pytest.approx(3.5)
    assert s.ci95 == pytest.approx(1.96 * std / 2)
    assert f"{s:.2f}" == f"3.50 ± {1.96 * std / 2:.2f}"
    with pytest.raises(ValueError, match="at least 2"):
        mt.summarize([1.0])
    with pytest.raises(ValueError, match="NaN"):
        mt.summarize([1.0, float("nan")])


def test_evaluate_adaptation_reports_each_requested_step():
    model = mt.mlp(seed=0)
    params = mt.init_params(model)
    tasks = mt.SinusoidTasks().sample(50, 10, 10, generator=mt.make_generator(1))
    result = mt.evaluate_adaptation(model, params, tasks, inner_lr=0.01, steps=(10, 0, 1))
    assert list(result) == [0, 1, 10]
    curve = mt.adaptation_curve(model, params, tasks, inner_lr=0.01, steps=10)
    assert result[10].mean == pytest.approx(curve[:, 10].double().mean().item(), rel=1e-6)
    assert result[10].mean < result[0].mean  # fine-tuning on the support set helps on the query set
    with pytest.raises(ValueError, match="steps must be a non-empty list of ints >= 0"):
        mt.evaluate_adaptation(model, params, tasks, inner_lr=0.01, steps=(-1,))


def test_pick_device(monkeypatch):
    monkeypatch.delenv("METATUT_DEVICE", raising=False)
    assert mt.pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert mt.pick_device().type == expected
    monkeypatch.setenv("METATUT_DEVICE", "cpu")
    assert mt.pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        mt.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
            mt.pick_device("cuda")


def test_budget_profiles(monkeypatch):
    monkeypatch.delenv("METATUT_BUDGET", raising=False)
    monkeypatch.setenv("METATUT_FAST", "1")
    assert mt.profile() == "ci" and mt.pick(ci=1, laptop=2, gpu=3) == 1
    monkeypatch.setenv("METATUT_FAST", "0")
    assert mt.profile() == ("gpu" if torch.cuda.is_available() else "laptop")
    monkeypatch.setenv("METATUT_BUDGET", "gpu")
    assert mt.pick(ci=1, laptop=2, gpu=3) == 3 and mt.pick(ci=1, laptop=2) == 2
    monkeypatch.setenv("METATUT_BUDGET", "huge")
    with pytest.raises(ValueError, match="METATUT_BUDGET must be one of"):
        mt.profile()


def test_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "d"))
    assert mt.data_dir() == tmp_path / "d" and (tmp_path / "d").is_dir()


def test_generator_checks_seed():
    with pytest.raises(TypeError, match="seed must be an int"):
        mt.make_generator(1.5)


def test_seeded_mlp_is_reproducible_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = mt.mlp(seed=7), mt.mlp(seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[0].weight, mt.mlp(seed=8)[0].weight)
