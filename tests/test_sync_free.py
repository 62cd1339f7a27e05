"""meta_train synchronises with the host only at its logging points (issue "GPU-accelerated MAML that is fast
where users feel it", section 2), and its non-finite stop, deferred to those points, is exact."""
import traceback

import pytest
import torch

import metatut as mt
from metatut.train import cosine_lr
from test_faults_engine import bad_at  # the summed loss, non-finite (loss or gradient) at one step

SYNCS = ("item", "__bool__", "tolist", "cpu", "__int__", "__float__", "__index__", "numpy")


def _caller_is_the_optimiser() -> bool:
    """Adam reads its ``step`` counters with ``.item()``: they live on the CPU even when training on a GPU
    (``capturable=False``), so these reads are no device synchronisation and are not counted."""
    frames = traceback.extract_stack()[:-2]  # the caller of the wrapped method
    return bool(frames) and "torch/optim/" in frames[-1].filename.replace("\\", "/")


@pytest.fixture
def count_syncs(monkeypatch):
    """Records, for each host read of a tensor, how many episodes had been sampled (the running step)."""
    clock = {"sampled": 0}
    reads: list[tuple[str, int]] = []

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if not _caller_is_the_optimiser():
                reads.append((name, clock["sampled"]))
            return original(self, *args, **kwargs)
        return counted

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    return clock, reads


def test_meta_train_reads_the_device_only_at_its_logging_points(count_syncs):
    clock, reads = count_syncs
    model = mt.mlp(hidden=(16,), seed=0)
    params = mt.init_params(model)
    objective = mt.maml_objective(model, inner_lr=0.01, vectorize="auto")
    tasks = mt.SinusoidTasks()  # regression: no label-range checks

    def sample(generator):
        clock["sampled"] += 1
        return tasks.sample(4, 5, generator=generator)

    result = mt.meta_train(objective, params, sample, steps=20, generator=mt.make_generator(0), log_every=10,
                           progress_bar=False, check=False)
    assert result.steps == 20
    # before: one read per step (the non-finite check's flag) plus the logging points (23 in all);
    # now: the flag at steps 10 and 20, and the loss history copied to the CPU at the end
    assert {step for _, step in reads} == {10, 20}, reads
    assert len(reads) <= 2 * 2 + 1, reads
    assert len(reads) == 3


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_bad_step_between_synchronisation_points_is_reported_at_the_next_one_and_changed_nothing(what):
    model = mt.mlp(hidden=(8,), seed=0)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
    bad_step = 3
    # the reference: the parameters and Adam's state after step 2
    reference = mt.init_params(model)
    ref_optimizer = torch.optim.Adam(list(reference.values()), lr=1e-2)
    mt.meta_train(bad_at(model, bad_step, what), reference, lambda g: batch, steps=bad_step,
                  optimizer=ref_optimizer, progress_bar=False, check=False)

    params = mt.init_params(model)
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)
    sampled = []

    def sample(generator):
        sampled.append(len(sampled))
        return batch

    with pytest.raises(mt.NonFiniteLossError) as info:
        mt.meta_train(bad_at(model, bad_step, what), params, sample, steps=30, optimizer=optimizer,
                      sync_every=10, progress_bar=False)
    error = info.value
    assert error.step == bad_step and error.what == what
    assert f"the {what} became NaN or infinite at step {bad_step}" in str(error)
    assert len(sampled) == 10                           # found at the synchronisation point, not before
    assert error.losses.shape == (bad_step + 1,) and torch.isfinite(error.losses[:bad_step]).all()
    for (k, v), ref in zip(params.items(), reference.values(), strict=True):
        assert torch.equal(v.detach(), ref.detach()), k  # steps 3..9 changed nothing
        assert v.grad is None
        state, ref_state = optimizer.state[v], ref_optimizer.state[ref]
        assert int(state["step"]) == bad_step        # Adam's step counters restored too
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], ref_state[key]), (k, key)


def test_a_bad_first_step_leaves_a_fresh_optimiser_without_state():
    model = mt.mlp(hidden=(8,), seed=0)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
    params = mt.init_params(model)
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)
    with pytest.raises(mt.NonFiniteLossError, match="at step 0"):
        mt.meta_train(bad_at(model, 0, "loss"), params, lambda g: batch, steps=8, optimizer=optimizer,
                      sync_every=5, progress_bar=False)
    assert len(optimizer.state) == 0
    assert all(torch.equal(v.detach(), before[k]) for k, v in params.items())


def test_the_stop_is_exact_under_a_cosine_schedule_and_a_function_as_sync_every():
    model = mt.mlp(hidden=(8,), seed=0)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
    params = mt.init_params(model)
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)
    synced = []

    def sync_due(done):
        synced.append(done)
        return done == 7

    with pytest.raises(mt.NonFiniteLossError, match="at step 4") as info:
        mt.meta_train(bad_at(model, 4, "gradient"), params, lambda g: batch, steps=20, optimizer=optimizer,
                      meta_lr=1e-2, lr_schedule="cosine", sync_every=sync_due, progress_bar=False)
    assert synced == list(range(1, 8)) and info.value.what == "gradient"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(4, 20, 1e-2, 0.0))


def test_an_on_step_hook_only_sees_finite_steps_unless_sync_every_is_given():
    model = mt.mlp(hidden=(8,), seed=0)
    batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
    for sync_every, seen in ((None, [0, 1]), (4, [0, 1, 2])):
        steps = []
        with pytest.raises(mt.NonFiniteLossError, match="at step 2"):
            mt.meta_train(bad_at(model, 2, "loss"), mt.init_params(model), lambda g: batch, steps=10,
                          on_step=lambda step, loss, seen_here=steps: seen_here.append(step), sync_every=sync_every, progress_bar=False)
        assert steps == seen


def test_a_finite_run_is_unchanged_by_the_guard():
    model = mt.mlp(hidden=(8,), seed=0)
    objective = mt.maml_objective(model, inner_lr=0.01)
    results = []
    for stop in (True, False):
        params = mt.init_params(model)
        result = mt.meta_train(objective, params, lambda g: mt.SinusoidTasks().sample(2, 5, generator=g), steps=6,
                               generator=mt.make_generator(0), progress_bar=False, stop_on_nonfinite=stop,
                               sync_every=4, check=False)
        results.append(result)
    assert torch.equal(results[0].losses, results[1].losses)
    for a, b in zip(results[0].params.values(), results[1].params.values(), strict=True):
        assert torch.equal(a, b)
