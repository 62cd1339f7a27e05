"""The training command: configuration checks, exact resume after Ctrl-C or a kill, and 2-process gloo."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from metatut import cli
from metatut.distributed import DistributedContext

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(task="sinusoid", algorithm="maml", steps=12, meta_batch=4, width=8, shots=5, query=5, eval_tasks=20,
             log_every=2, eval_every=6, checkpoint_every=3, progress=False, seed=3)


def config(tmp_path, name, **changes):
    return cli.TrainConfig(**{**SMALL, "out_dir": str(tmp_path / name), **changes}).validate()


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].detach(), b[k].detach()), k


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path, algorithm):
    full = cli.train(config(tmp_path, "full", algorithm=algorithm, lr_schedule="cosine"))
    first = cli.train(config(tmp_path, "split", algorithm=algorithm, lr_schedule="cosine"), stop_after=5)
    assert first["interrupted"] is False and first["step"] == 5
    assert cli.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 5
    with pytest.raises(cli.ConfigError, match="pass --resume"):
        cli.train(config(tmp_path, "split", algorithm=algorithm, lr_schedule="cosine"))
    resumed = cli.train(config(tmp_path, "split", algorithm=algorithm, lr_schedule="cosine"), resume=True)
    assert resumed["step"] == 12
    assert_same_params(full["params"], resumed["params"])
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicated rows after the resume


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "METATUT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "metatut.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _sets(out_dir, **changes):
    values = {**SMALL, "out_dir": str(out_dir), "steps": 400, "checkpoint_every": 20, **changes}
    return ["--set", *[f"{k}={json.dumps(v)}" for k, v in values.items()]]


def _wait_for_checkpoint(path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and proc.poll() is None:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_real_interruption_then_resume_matches_an_uninterrupted_run(tmp_path, how):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    proc = _run_cli(_sets(tmp_path / "run"))
    _wait_for_checkpoint(ckpt, proc)
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    if how == "ctrl-c":
        assert proc.returncode == 130 and "resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped_at = cli.load_checkpoint(ckpt)["step"]
    assert 0 < stopped_at < 400
    resumed = _run_cli(_sets(tmp_path / "run") + ["--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    reference = cli.train(config(tmp_path, "reference", steps=400, checkpoint_every=400, eval_every=400))
    assert_same_params(cli.load_checkpoint(ckpt)["params"], reference["params"])


def test_bad_configuration_is_refused_before_any_work(tmp_path):
    cases = {
        "steps=0": "steps must be an int >= 1",
        "meta_lr=-1": r"meta_lr must be a number in \(0, 1\]",
        "algorithm=\"magic\"": "algorithm must be one of",
        "meta_batch=5": r"meta_batch \(5\) must be a multiple of task_streams \(2\)",
        "task=\"omniglot\"": None,
    }
    for override, message in cases.items():
        if message is None:
            continue
        with pytest.raises(cli.ConfigError, match=message):
            cli.load_config(None, [f"out_dir=\"{tmp_path / 'x'}\"", "task_streams=2", override])
    with pytest.raises(cli.ConfigError, match="shots \\+ query must be <= 20"):
        cli.load_config(None, ["task=\"omniglot\"", "shots=10", "query=15"])
    with pytest.raises(cli.ConfigError, match="needs a classification task"):
        cli.load_config(None, ["algorithm=\"protonet\""])
    with pytest.raises(cli.ConfigError, match="unknown configuration keys \\['stepz'\\]"):
        cli.load_config(None, ["stepz=3"])
    with pytest.raises(cli.ConfigError, match="no configuration file"):
        cli.load_config(tmp_path / "missing.json")
    assert cli.main(["--set", "steps=-3"]) == 2
    assert not (tmp_path / "x").exists()


def test_shipped_configurations_are_valid():
    files = sorted((ROOT / "configs").glob("*.json"))
    assert len(files) >= 5
    for f in files:
        cfg = cli.load_config(f)
        assert cfg.out_dir.startswith("runs/")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, cfg_dict, out_path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = cli.TrainConfig(**cfg_dict)
        result = cli.train(cfg, context=DistributedContext(rank, world_size))
        if rank == 0:
            torch.save({k: v.detach() for k, v in result["params"].items()}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_the_same_global_meta_batch(tmp_path):
    base = {**SMALL, "task_streams": 2, "meta_batch": 6, "steps": 8, "checkpoint_every": 4}
    single = cli.train(cli.TrainConfig(**{**base, "out_dir": str(tmp_path / "single")}))
    out_path = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, _free_port(), {**base, "out_dir": str(tmp_path / "two")}, str(out_path)), nprocs=2,
             join=True)
    two = torch.load(out_path, weights_only=True)
    for k, v in single["params"].items():
        torch.testing.assert_close(two[k], v.detach(), rtol=1e-5, atol=1e-6)
    # and a resumed 2-process run reads back both ranks' task streams
    state = cli.load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert len(state["extra"]["stream_states"]) == 2


SHARED_OMNIGLOT = Path(os.environ.get("METATUT_SHARED_OMNIGLOT", ROOT.parent / "shared" / "data" / "omniglot"))


@pytest.mark.skipif(not (SHARED_OMNIGLOT / "images_background_small1.zip").is_file(),
                    reason=f"the offline Omniglot copy is not at {SHARED_OMNIGLOT}")
@pytest.mark.parametrize("algorithm", ["maml", "protonet", "anil"])
def test_omniglot_runs_train_and_report_accuracy(tmp_path, algorithm, monkeypatch, one_thread):
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "data"))  # the decoded-images cache goes here
    cfg = cli.load_config(ROOT / "configs" / "omniglot_5way_1shot.json", [
        'dataset="small"', f'data_root="{SHARED_OMNIGLOT}"', f'algorithm="{algorithm}"', "steps=2", "width=4",
        "meta_batch=2", "eval_tasks=5", "eval_every=2", "checkpoint_every=2", "progress=false",
        f'out_dir="{tmp_path / "run"}"'])
    metrics = cli.train(cfg)["metrics"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_accuracy_ci95"] >= 0
    assert cli.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["algorithm"] == algorithm


def _interrupted_worker(rank, world_size, port, cfg_dict, out_dir):
    """Rank 0 alone is 'interrupted' (as Ctrl-C reaches the main process only) during step 5."""
    import torch.distributed as dist

    from metatut.run.session import Run
    torch.set_num_threads(1)
    original = Run._on_step

    def on_step(self, step, loss):
        if rank == 0 and step + 1 == 5:
            self.interrupted = True
        return original(self, step, loss)
    Run._on_step = on_step
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = cli.train(cli.TrainConfig(**cfg_dict), context=DistributedContext(rank, world_size))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"step": result["step"],
                                                                "interrupted": result["interrupted"]}))
    finally:
        dist.destroy_process_group()


def test_ctrl_c_on_the_main_process_stops_every_rank_at_the_next_logging_step(tmp_path):
    cfg = {**SMALL, "task_streams": 2, "meta_batch": 4, "steps": 12, "log_every": 4, "checkpoint_every": 100,
           "eval_every": 100, "out_dir": str(tmp_path / "run")}
    mp.spawn(_interrupted_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # interrupted in step 5; agreed at the next logging step, 8 (no per-step all-reduce before it)
    assert [r["step"] for r in ranks] == [8, 8]
    assert ranks[0]["interrupted"] and not ranks[1]["interrupted"]
    assert cli.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 8
