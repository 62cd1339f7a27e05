"""The training command under faults: NaN stops, save-before-evaluate, one run per folder, resume checks,
bad settings refused before any file is written, and safe files (issue "Trust under faults")."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metatut import cli, fileio

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(task="sinusoid", algorithm="maml", steps=12, meta_batch=4, width=8, shots=5, query=5, eval_tasks=20,
             log_every=2, eval_every=6, checkpoint_every=3, progress=False, seed=3)
SHARED_OMNIGLOT = Path(os.environ.get("METATUT_SHARED_OMNIGLOT", ROOT.parent / "shared" / "data" / "omniglot"))
needs_omniglot = pytest.mark.skipif(not (SHARED_OMNIGLOT / "images_background_small1.zip").is_file(),
                                    reason=f"the offline Omniglot copy is not at {SHARED_OMNIGLOT}")


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch):
    for name in ("METATUT_BUDGET", "METATUT_PROGRESS", "METATUT_DEVICE"):
        monkeypatch.delenv(name, raising=False)


def config(tmp_path, name="run", **changes):
    return cli.TrainConfig(**{**SMALL, "out_dir": str(tmp_path / name), **changes}).validate()


def sets(**values):
    return ["--set", *[f"{k}={json.dumps(v)}" for k, v in values.items()]]


def run_main(capsys, args):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.err


def finite(params):
    return all(bool(torch.isfinite(v).all()) for v in params.values())


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "METATUT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "metatut.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 6: NaN / divergence
def test_a_diverging_run_stops_with_exit_3_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, err = run_main(capsys, [str(ROOT / "configs" / "sinusoid.json"), *sets(
        steps=60, inner_lr=0.5, meta_lr=0.1, inner_steps=5, checkpoint_every=10, width=8, eval_tasks=10,
        progress=False, out_dir=str(out))])
    assert code == 3, err
    assert "metatut-train: training diverged at step " in err
    assert "lower inner_lr (now 0.5), meta_lr (now 0.1) or inner_steps (now 5)" in err
    assert f"the last finite checkpoint is kept at {out / 'checkpoint.pt'}" in err
    diverged_at = int(err.split("training diverged at step ")[1].split(":")[0])
    state = cli.load_checkpoint(out / "checkpoint.pt")
    assert finite(state["params"])  # before the fix: NaN parameters over the good ones
    assert 0 < state["step"] < diverged_at and state["step"] == (diverged_at - 1) // 10 * 10
    assert f"(step {state['step']})" in err


def test_the_issue_example_diverges_at_once_and_writes_no_checkpoint(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, err = run_main(capsys, [str(ROOT / "configs" / "sinusoid.json"), *sets(
        steps=60, inner_lr=10, meta_lr=1, inner_steps=5, checkpoint_every=10, width=8, eval_tasks=10,
        progress=False, out_dir=str(out))])
    assert code == 3, err
    assert "training diverged at step 1: the loss became non-finite" in err
    assert "no checkpoint was written" in err
    assert not (out / "checkpoint.pt").exists()


def test_save_refuses_non_finite_parameters(tmp_path, monkeypatch):
    """Second line of defence: even if non-finite parameters got past the per-step check, none are saved."""
    real_meta_train = cli.meta_train

    def poisoning_meta_train(objective, params, *args, on_step, **kwargs):
        def poisoned_on_step(step, loss):
            if step + 1 == 6:  # a checkpoint step: save() sees the NaN first
                with torch.no_grad():
                    next(iter(params.values())).fill_(float("nan"))
            on_step(step, loss)
        return real_meta_train(objective, params, *args, on_step=poisoned_on_step, **kwargs)

    monkeypatch.setattr(cli, "meta_train", poisoning_meta_train)
    with pytest.raises(cli.TrainingDiverged, match=r"at step 6: the parameters became non-finite.*kept at .*\(step 4\)"):
        cli.train(config(tmp_path, checkpoint_every=2, log_every=1, eval_every=100))
    # the checkpoint of step 4 is the last one, and it is finite
    state = cli.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4 and finite(state["params"])


def test_a_run_reads_the_non_finite_flag_only_where_it_logs_or_saves_and_never_saves_after_a_bad_step(tmp_path,
                                                                                                     monkeypatch):
    """The training command relies on meta_train's sync-free stop: the flag is read at the steps that log or
    save only, and a NaN between them (step 7 of 12) stops the run at the next one with the checkpoint of 6."""
    real_meta_train = cli.meta_train
    due = []

    def nan_at_step_7(objective, params, *args, sync_every, **kwargs):
        def objective_(p, batch, **kw):
            loss = objective(p, batch, **kw)
            return loss * float("nan") if kw.get("step") == 6 else loss
        objective_.uses_step = True

        def recorded(done):
            if sync_every(done):
                due.append(done)
                return True
            return False
        return real_meta_train(objective_, params, *args, sync_every=recorded, **kwargs)

    monkeypatch.setattr(cli, "meta_train", nan_at_step_7)
    with pytest.raises(cli.TrainingDiverged, match=r"at step 7: the loss became non-finite.*\(step 6\)"):
        cli.train(config(tmp_path, log_every=4, checkpoint_every=3, eval_every=6))
    assert due == [3, 4, 6, 8]  # the flag was read at these steps only; the stop came at step 8's
    state = cli.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 6 and finite(state["params"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [4]  # nothing logged after the bad step


def _diverging_worker(rank, world_size, port, cfg_dict, out_dir):
    import torch.distributed as dist

    from metatut.distributed import DistributedContext
    torch.set_num_threads(1)
    real_meta_train = cli.meta_train

    def inf_on_rank_1_at_step_5(objective, params, *args, **kwargs):
        def objective_(p, batch, **kw):
            loss = objective(p, batch, **kw)
            return loss * float("inf") if rank == 1 and kw.get("step") == 4 else loss
        objective_.uses_step = True
        return real_meta_train(objective_, params, *args, **kwargs)

    cli.meta_train = inf_on_rank_1_at_step_5
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cli.train(cli.TrainConfig(**cfg_dict), context=DistributedContext(rank, world_size))
        message = "no error"
    except cli.TrainingDiverged as e:
        message = f"{e.step} {e.what}: {e}"
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(message)


def test_two_processes_agree_on_a_divergence_seen_by_one_of_them(tmp_path):
    """Only rank 1's loss becomes infinite (step 5); the flag, all-reduced at the synchronisation points only,
    stops both ranks at step 6's with the same step and cause, and the checkpoint of step 3 is kept."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = {**SMALL, "task_streams": 2, "meta_batch": 4, "log_every": 4, "checkpoint_every": 3,
           "out_dir": str(tmp_path / "run")}
    mp.spawn(_diverging_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("5 loss: training diverged at step 5: the loss became non-finite"), messages
    assert "(step 3)" in messages[0]
    state = cli.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 3 and finite(state["params"])


def _poison_checkpoint(path):
    state = torch.load(path, weights_only=True)
    for v in state["params"].values():
        v.fill_(float("nan"))
    torch.save(state, path)


def test_resume_refuses_a_checkpoint_with_non_finite_parameters(tmp_path, capsys):
    cli.train(config(tmp_path), stop_after=3)
    _poison_checkpoint(tmp_path / "run" / "checkpoint.pt")
    before = (tmp_path / "run" / "metrics.csv").read_bytes()
    code, err = run_main(capsys, sets(**{**SMALL, "out_dir": str(tmp_path / "run")}) + ["--resume"])
    assert code == 2
    assert "holds non-finite parameters" in err and "diverged" in err
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == before


@needs_omniglot
def test_an_omniglot_run_resumed_from_a_nan_checkpoint_is_refused(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "data"))
    values = dict(dataset="small", data_root=str(SHARED_OMNIGLOT), steps=2, width=4, meta_batch=2, eval_tasks=5,
                  eval_every=2, checkpoint_every=2, progress=False, out_dir=str(tmp_path / "run"))
    config_file = str(ROOT / "configs" / "omniglot_5way_1shot.json")
    assert run_main(capsys, [config_file, *sets(**values)])[0] == 0
    _poison_checkpoint(tmp_path / "run" / "checkpoint.pt")
    code, err = run_main(capsys, [config_file, *sets(**{**values, "steps": 4}), "--resume"])
    assert code == 2, err  # before the fix: exit 0 at chance accuracy
    assert "holds non-finite parameters" in err


# -------------------------------------------------------------------------- 7: save, then evaluate
def test_a_failing_final_evaluation_loses_no_training_and_resume_evaluates(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    values = {**SMALL, "steps": 6, "inner_lr": 2, "eval_inner_steps": 10, "checkpoint_every": 100,
              "eval_every": 100, "eval_tasks": 10, "out_dir": str(out)}
    code, err = run_main(capsys, sets(**values))
    assert code == 4, err
    assert "the evaluation at step 6 failed" in err and "eval_inner_steps=10" in err
    assert cli.load_checkpoint(out / "checkpoint.pt")["step"] == 6  # saved before the evaluation
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and rows[-1]["eval_mse"] == ""
    # the evaluation settings may change on --resume; a resume at the final step only evaluates
    code, err = run_main(capsys, sets(**{**values, "eval_inner_steps": 1}) + ["--resume"])
    assert code == 0, err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and float(rows[-1]["eval_mse"]) >= 0


@needs_omniglot
def test_n_way_above_a_held_out_split_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    code, err = run_main(capsys, [str(ROOT / "configs" / "omniglot_5way_1shot.json"), *sets(
        dataset="small", data_root=str(SHARED_OMNIGLOT), n_way=60, steps=2, width=4, meta_batch=2, eval_tasks=5,
        progress=False, out_dir=str(out))])
    assert code == 2
    assert "n_way=60 is more than the 48 classes" in err and "test 48" in err
    assert not out.exists()


def test_the_loaded_splits_are_checked_against_n_way_and_images_per_class():
    def split(train, val, test, per_class=20):
        return SimpleNamespace(**{k: SimpleNamespace(images=torch.zeros(n, per_class, 1, 1))
                                  for k, n in (("train", train), ("val", val), ("test", test))})
    cfg = cli.TrainConfig(task="omniglot", dataset="small", n_way=20, shots=1, query=5)
    cli._check_split(cfg, split(100, 30, 30))
    with pytest.raises(cli.ConfigError, match=r"n_way=20 is more than the 10 classes of the test split"):
        cli._check_split(cfg, split(100, 30, 10))
    with pytest.raises(cli.ConfigError, match=r"shots \+ query must be <= 4"):
        cli._check_split(cfg, split(100, 30, 30, per_class=4))


# ------------------------------------------------------------------------------ 8: one run per folder
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "run"
    first_values = {**SMALL, "out_dir": str(out), "steps": 10_000_000, "log_every": 1,
                    "checkpoint_every": 10_000_000, "eval_every": 10_000_000}
    first = _run_cli(sets(**first_values))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # running, and before its first checkpoint
            if first.poll() is not None:
                raise AssertionError(f"the first run ended: {first.communicate()}")
            if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) > 3:
                break
            time.sleep(0.05)
        config_before = (out / "config.json").read_text()
        for extra in ([], ["--overwrite"]):
            code, err = run_main(capsys, sets(**{**SMALL, "out_dir": str(out), "steps": 4}) + extra)
            assert code == 2, err
            assert f"is in use by another run (pid {first.pid})" in err
        assert first.poll() is None
        assert (out / "config.json").read_text() == config_before
        assert json.loads(config_before)["steps"] == 10_000_000
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows[:3]] == [1, 2, 3]  # not truncated by the second run
        assert not (out / "checkpoint.pt").exists()
    finally:
        first.kill()
        first.communicate()


def test_a_killed_runs_stale_lock_is_reported_and_resume_proceeds(tmp_path):
    out = tmp_path / "run"
    values = {**SMALL, "out_dir": str(out), "steps": 10_000_000, "checkpoint_every": 20, "eval_every": 10_000_000}
    first = _run_cli(sets(**values))
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    step = cli.load_checkpoint(out / "checkpoint.pt")["step"]
    # leftovers of a writer killed between fsync and rename (13)
    stale = [out / f".checkpoint.pt.{first.pid}.abc123.tmp", out / f".config.json.{first.pid}.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    resumed = _run_cli(sets(**{**values, "steps": step + 2}) + ["--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"a previous run (pid {first.pid}) ended without releasing" in err and "continuing" in err
    assert cli.load_checkpoint(out / "checkpoint.pt")["step"] == step + 2
    assert not any(p.exists() for p in stale)


def test_a_fresh_run_refuses_a_folder_holding_a_run_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    cli.train(config(tmp_path), stop_after=4)
    (out / "checkpoint.pt").unlink()  # config.json and metrics.csv of a run that never checkpointed
    with pytest.raises(cli.ConfigError, match=r"already holds a run \(config.json, metrics.csv\).*--overwrite"):
        cli.train(config(tmp_path, steps=6))
    with pytest.raises(cli.ConfigError, match="exclude each other"):
        cli.train(config(tmp_path), resume=True, overwrite=True)
    code, err = run_main(capsys, sets(**{**SMALL, "out_dir": str(out), "steps": 6}) + ["--overwrite"])
    assert code == 0, err
    assert cli.load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert json.loads((out / "config.json").read_text())["steps"] == 6
    steps = [int(r["step"]) for r in csv.DictReader((out / "metrics.csv").open())]
    assert steps == [2, 4, 6]
    assert not (out / cli.LOCK_NAME).read_text().strip()  # released


# -------------------------------------------------------------------------------- 10: cosine resume
def test_steps_cannot_change_on_resume_under_the_cosine_schedule(tmp_path):
    cli.train(config(tmp_path, lr_schedule="cosine"), stop_after=3)
    with pytest.raises(cli.ConfigError, match=r"steps cannot change on --resume with lr_schedule='cosine' "
                                              r"\(the schedule is defined over steps=12\)"):
        cli.train(config(tmp_path, lr_schedule="cosine", steps=20), resume=True)
    cli.train(config(tmp_path, "constant"), stop_after=3)
    assert cli.train(config(tmp_path, "constant", steps=8), resume=True)["step"] == 8  # still allowed


# ------------------------------------------------------------- 11: bad settings, before any file
def test_boolean_settings_from_set_take_true_and_false_only():
    assert cli.load_config(None, ["progress=False"]).progress is False
    assert cli.load_config(None, ['progress="TRUE"', "compile=false"]).progress is True
    for raw in ("1", "yes", '"False "', "0"):
        with pytest.raises(cli.ConfigError, match=r"progress must be true or false \(got "):
            cli.load_config(None, [f"progress={raw}"])
    with pytest.raises(cli.ConfigError, match=r"compile must be true or false \(got 1\)"):
        cli.load_config(None, ["compile=1"])


CASES = {
    "progress=yes": ([], "progress must be true or false (got 'yes')"),
    "compile=1": ([], "compile must be true or false (got 1)"),
    'out_dir=""': ([], "out_dir must be a non-empty folder path"),
    "data_root=5": ([], "data_root must be a folder path (a non-empty string) or null for the default (got 5)"),
    "steps=1e13": ([], "steps must be an int >= 1 and <= 10000000 (got 10000000000000.0)"),
    "steps=10000000000000": ([], "steps must be an int >= 1 and <= 10000000 (got 10000000000000)"),
    "meta_batch=10000000000000": ([], "meta_batch must be an int >= 1 and <= 100000"),
    "eval_tasks=10000000000000": ([], "eval_tasks must be an int >= 2 and <= 100000"),
    "n_way=1000": (['task="omniglot"', 'dataset="small"', "shots=1", "query=1"],
                   "n_way=1000 is more than the 48 classes"),
}


@pytest.mark.parametrize("override", list(CASES))
def test_bad_settings_are_refused_before_any_file_is_written(tmp_path, capsys, override):
    extra, message = CASES[override]
    out = tmp_path / "run"
    args = ["--set", 'name="x"', "steps=4", "width=8", "meta_batch=2", "eval_tasks=4", "progress=false",
            f'out_dir="{out}"', *extra, override]
    code, err = run_main(capsys, args)
    assert code == 2, err
    assert message in err
    assert not out.exists() and not (ROOT / "config.json").exists()


@pytest.mark.parametrize("variable, value, message", [
    ("METATUT_BUDGET", "huge", "METATUT_BUDGET"),
    ("METATUT_PROGRESS", "maybe", "METATUT_PROGRESS"),
    ("METATUT_DATA", "FILE", "METATUT_DATA"),
    ("METATUT_DEVICE", "tpu", "METATUT_DEVICE"),
])
def test_bad_environment_settings_are_refused_before_any_file_is_written(tmp_path, capsys, monkeypatch,
                                                                         variable, value, message):
    if value == "FILE":
        (tmp_path / "a_file").write_text("x")
        value = str(tmp_path / "a_file")
    monkeypatch.setenv(variable, value)
    out = tmp_path / "run"
    code, err = run_main(capsys, sets(**{**SMALL, "steps": 4, "out_dir": str(out)}))
    assert code == 2, err
    assert "configuration error" in err and message in err
    assert not out.exists()


def test_an_unusable_out_dir_or_device_is_refused_before_any_file_is_written(tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep")
    for out, message in [(tmp_path / "a_file", "is a file, not a folder"),
                         (tmp_path / "a_file" / "run", "cannot be created: "),
                         ]:
        code, err = run_main(capsys, sets(**{**SMALL, "steps": 4, "out_dir": str(out)}))
        assert code == 2 and message in err, err
    assert (tmp_path / "a_file").read_text() == "keep"
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = run_main(capsys, sets(**{**SMALL, "steps": 4, "out_dir": str(locked / "run")}))
        assert code == 2 and "not writable" in err, err
        assert list(locked.iterdir()) == []
    if not torch.cuda.is_available():
        out = tmp_path / "run"
        code, err = run_main(capsys, sets(**{**SMALL, "steps": 4, "device": "cuda", "out_dir": str(out)}))
        assert code == 2 and "device: " in err and "cuda" in err, err
        assert not out.exists()


def test_a_damaged_metrics_row_is_refused_on_resume_before_anything_is_truncated(tmp_path, capsys):
    out = tmp_path / "run"
    cli.train(config(tmp_path), stop_after=5)
    lines = (out / "metrics.csv").read_text().splitlines()
    lines.insert(2, "garbage,row")
    (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != cli.LOCK_NAME}
    code, err = run_main(capsys, sets(**{**SMALL, "out_dir": str(out)}) + ["--resume"])
    assert code == 2, err
    assert f"{out / 'metrics.csv'} line 3: 'garbage,row' is not a metrics row" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != cli.LOCK_NAME} == before


def test_compile_and_task_workers_are_checked_before_the_data_is_loaded(tmp_path, monkeypatch):
    def no_loading(cfg):
        raise AssertionError("the data was loaded before the configuration was checked")
    monkeypatch.setattr(cli, "_omniglot_split", no_loading)
    cfg = cli.TrainConfig(task="omniglot", dataset="small", algorithm="maml", compile=True, steps=2, width=4,
                          progress=False, out_dir=str(tmp_path / "run")).validate()
    with pytest.raises(cli.ConfigError, match=r"compile: compile=True needs the vmap path or first-order MAML.*algorithm='maml'"):
        cli.train(cfg)
    with pytest.raises(cli.ConfigError, match=r"task_workers must be an int >= 1 and <= 256"):
        cli.load_config(None, ["task_workers=100000"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- 13: files
def test_config_json_is_written_without_following_a_planted_symlink(tmp_path):
    assert cli.atomic_write_text is fileio.atomic_write_text  # one helper, no predictable temporary name
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / f".config.json.{os.getpid()}.tmp").symlink_to(victim)
    cli.train(config(tmp_path, steps=2))
    assert victim.read_text() == "precious"
    assert not (out / "config.json").is_symlink()
    assert json.loads((out / "config.json").read_text())["steps"] == 2


def test_stale_temporaries_of_a_dead_writer_are_removed_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    cli.train(config(tmp_path), stop_after=3)
    pid = _dead_pid()
    stale = [out / f".checkpoint.pt.{pid}.k1l2m3.tmp", out / f".metrics.csv.{pid}.n4o5p6.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    live = out / f".notes.txt.{os.getpid()}.q7r8s9.tmp"  # this process is alive: kept
    live.write_bytes(b"in progress")
    cli.train(config(tmp_path, steps=4), resume=True)
    assert not any(p.exists() for p in stale)
    assert live.exists()


def test_resume_from_a_damaged_checkpoint_is_a_configuration_error(tmp_path, capsys):
    out = tmp_path / "run"
    cli.train(config(tmp_path), stop_after=3)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    code, err = run_main(capsys, sets(**{**SMALL, "out_dir": str(out)}) + ["--resume"])
    assert code == 2, err
    assert f"configuration error: cannot resume from {out / 'checkpoint.pt'}: " in err
