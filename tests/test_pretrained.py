"""The pretrained Omniglot checkpoints: provenance complete and honest, accuracy re-checked episode by episode.

Each ``checkpoints/name.pt`` was written by ``scripts/train_omniglot.py`` together with ``name.json``. Here every
checkpoint is re-evaluated with the script's own evaluation code on the first test episodes of the recorded protocol
(seeded, so the same episodes) and must give the same number of correct queries per episode. Both runs use float32 on
one CPU thread; on the machine that recorded them the results are bit-identical, elsewhere a different BLAS or CPU can
change the last bits of a logit and flip a near-tie, hence the tolerance: at least 97% of the episodes identical and the
mean accuracy within 0.5 points.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import metatut as mt

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("METATUT_SHARED_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))
CHECKPOINTS = REPO / "checkpoints"
NAMES = sorted(p.stem for p in CHECKPOINTS.glob("*.json"))
DATA_FILES = ("images_background_small1.zip", "images_background_small2.zip", "all_runs.zip")
#: episodes re-evaluated per checkpoint and way (the first ones of the recorded first chunk)
EPISODES = {5: 40, 20: 12}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_omniglot", REPO / "scripts" / "train_omniglot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()
needs_shared = pytest.mark.skipif(not all((SHARED / f).is_file() for f in DATA_FILES),
                                  reason=f"the offline Omniglot copy is not at {SHARED} (set METATUT_SHARED_OMNIGLOT)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    if not all((SHARED / f).is_file() for f in DATA_FILES):
        pytest.skip(f"the offline Omniglot copy is not at {SHARED} (set METATUT_SHARED_OMNIGLOT)")
    return script.load_split(SHARED, cache_dir=tmp_path_factory.getbasetemp() / "omniglot_cache")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(name: str):
    info = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    checkpoint = mt.load_checkpoint(CHECKPOINTS / f"{name}.pt", requires_grad=False)
    return info, checkpoint


def test_there_are_checkpoints():
    assert {"protonet_5way1shot", "fomaml_5way1shot"} <= set(NAMES)
    assert sorted(p.stem for p in CHECKPOINTS.glob("*.pt")) == NAMES      # every checkpoint has its provenance


@pytest.mark.parametrize("name", NAMES)
def test_provenance_is_complete(name):
    info, checkpoint = load(name)
    path = CHECKPOINTS / f"{name}.pt"
    assert path.stat().st_size < 2_000_000
    assert info["checkpoint"] == {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size}
    assert checkpoint["config"] == info["config"] and checkpoint["step"] == info["config"]["steps"]
    config = info["config"]
    assert info["seed"] == config["seed"] and config["algorithm"] in script.ALGORITHMS
    assert info["command"].split()[1] == "scripts/train_omniglot.py" and f"--steps {config['steps']}" in info["reproduce"]
    assert f"--output checkpoints/{name}.pt" in info["reproduce"]
    assert set(info["data"]["files"]) == set(DATA_FILES) and "not Omniglot's full background set" in info["data"]["note"]
    assert len(info["git_commit"].split()[0]) == 40
    assert {"cpu", "logical_cpus", "torch_threads"} <= set(info["hardware"]) and info["software"]["torch"]
    assert info["wall_time_s"]["training"] > 0
    model = script.build_model(config)
    assert {k: v.shape for k, v in model.named_parameters()} == {k: v.shape for k, v in checkpoint["params"].items()}
    ways = script.evaluation_ways(config)
    assert sorted(info["evaluation"]["episodes"]) == sorted(f"{n}way1shot" for n in ways)
    for n_way in ways:
        record = info["evaluation"]["episodes"][f"{n_way}way1shot"]
        assert record["n"] == script.EVAL_EPISODES and len(record["first_chunk_correct"]) == script.EVAL_CHUNK
        assert 1 / n_way < record["mean"] <= 1                                     # a trained model beats chance


@needs_shared
def test_recorded_data_is_the_shared_data():
    info = json.loads((CHECKPOINTS / f"{NAMES[0]}.json").read_text())
    assert {f: sha256(SHARED / f) for f in DATA_FILES} == info["data"]["files"]


@needs_shared
@pytest.mark.parametrize("name", NAMES)
def test_accuracy_matches_the_record(name, split):
    info, checkpoint = load(name)
    config, protocol = info["config"], info["evaluation"]["protocol"]
    model = script.build_model(config)
    for key, record in info["evaluation"]["episodes"].items():
        n_way = int(key.split("way")[0])
        n = EPISODES[n_way]
        acc = script.evaluate_episodes(model, checkpoint["params"], config, split.test, n_way=n_way, episodes=n,
                                       seed=protocol["seed"], chunk=protocol["chunk"], q_query=protocol["q_query"])
        correct = (acc * n_way * protocol["q_query"]).round().long()
        expected = torch.tensor(record["first_chunk_correct"][:n])
        same = (correct == expected).double().mean().item()
        assert same >= 0.97, f"{name} {key}: only {100 * same:.0f}% of the episodes agree with the record"
        assert abs(correct.sum().item() - expected.sum().item()) <= 0.005 * n * n_way * protocol["q_query"]


@needs_shared
def test_one_shot_record_matches(split):
    """One checkpoint with a one-shot record is re-run on Lake et al.'s 20 runs: the same errors per run."""
    names = [n for n in NAMES if "one_shot_runs" in json.loads((CHECKPOINTS / f"{n}.json").read_text())["evaluation"]]
    assert names
    info, checkpoint = load(names[0])
    model = script.build_model(info["config"])
    runs = mt.data.load_one_shot_runs(SHARED / "all_runs.zip")
    result = mt.data.evaluate_one_shot(script.one_shot_predictor(model, checkpoint["params"], info["config"]), runs)
    recorded = torch.tensor(info["evaluation"]["one_shot_runs"]["errors"], dtype=torch.float64)
    assert (result.errors - recorded).abs().max() <= 0.05 + 1e-9        # at most one test image per run differs
    assert abs(result.error - info["evaluation"]["one_shot_runs"]["error"]) <= 0.005


@needs_shared
def test_the_script_trains_with_the_training_command_and_writes_the_same_provenance(tmp_path, monkeypatch):
    """A tiny run of the script (a thin wrapper over metatut.cli.train, in resumed chunks) writes a checkpoint
    whose provenance has every field the pretrained ones have, and which the script's evaluation reads."""
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("METATUT_SHARED_OMNIGLOT", str(SHARED))
    output = tmp_path / "checkpoints" / "protonet_tiny.pt"
    assert script.main(["--algorithm", "protonet", "--steps", "4", "--chunk", "2", "--hidden", "4", "--meta-batch",
                        "1", "--output", str(output), "--run-dir", str(tmp_path / "run")]) == 0
    info, recorded = json.loads(output.with_suffix(".json").read_text()), json.loads((CHECKPOINTS / f"{NAMES[0]}.json").read_text())
    assert set(recorded) <= set(info) and "training_command" in info
    checkpoint = mt.load_checkpoint(output, requires_grad=False)
    assert checkpoint["config"] == info["config"] and checkpoint["step"] == info["config"]["steps"] == 4
    assert info["checkpoint"] == {"file": output.name, "sha256": sha256(output), "bytes": output.stat().st_size}
    assert "--steps 4" in info["reproduce"] and "metatut-train --set" in info["training_command"]
    model = script.build_model(info["config"])
    assert {k: v.shape for k, v in model.named_parameters()} == {k: v.shape for k, v in checkpoint["params"].items()}
    assert sorted(info["evaluation"]["episodes"]) == ["20way1shot", "5way1shot"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4                                            # one row per iteration, resumed once
