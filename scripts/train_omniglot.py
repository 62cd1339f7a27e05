"""Train MAML, first-order MAML or Prototypical Networks on Omniglot and save a checkpoint with its provenance.

Usage (from the repository root)::

    python scripts/train_omniglot.py --algorithm protonet --n-way 5 --k-shot 1 --steps 2000 \\
        --hidden 32 --seed 0 --output checkpoints/protonet_5way1shot.pt

Data: the two small background sets (``images_background_small1/2.zip``, 242 characters; **not** the full
background set of 964 characters, so accuracies are not comparable to the papers'), split by character
with :func:`metatut.data.fraction_split` (seed 0: 146 training characters, each rotated by 0/90/180/270
degrees into 584 training classes; 48 validation and 48 test characters, never rotated). The zips are
looked for in ``$METATUT_SHARED_OMNIGLOT``, then ``METATUT_DATA/omniglot``, then ``<repo>/../shared/data/omniglot``.

Training: the training command (:func:`metatut.cli.train`, ``metatut-train``) with ``task='omniglot'``,
``dataset='small'`` and ``data_root`` = that folder: its run folder (``--run-dir``, default
``runs/train_omniglot/<name>``) holds ``config.json``, ``metrics.csv`` (one row per iteration) and
``checkpoint.pt``. The script runs it in chunks of ``--chunk`` iterations (each chunk resumes the previous
one exactly), so ``--max-minutes`` stops early at a whole chunk; the checkpoint's ``config['steps']`` is the
number of iterations actually run, and the provenance's ``reproduce`` command runs exactly those. The
checkpoint's ``config`` is the training command's configuration (:class:`metatut.cli.TrainConfig`); the
checkpoints in ``checkpoints/`` written before this script used the command record the script's own keys
(``hidden``, ``k_shot``, ``q_query``, ``test_inner_steps``), which :func:`build_model` and the evaluation
read too.

Next to ``OUTPUT`` (``name.pt``) the script writes ``name.json``: command, configuration, seed, data files
with their SHA-256, git commit, hardware, torch version, wall time, and the accuracy on fixed, seeded test
episodes (per episode for the first chunk, so that ``tests/test_pretrained.py`` can re-check it).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import metatut as mt
from metatut import cli
from metatut.fileio import atomic_write_text
from metatut.data import (ONE_SHOT_RUNS_ZIP, SMALL_ZIPS, evaluate_one_shot, fraction_split, load_omniglot,
                          load_one_shot_runs, offline_omniglot_dir)

REPO = Path(__file__).resolve().parent.parent
ALGORITHMS = ("maml", "fomaml", "protonet")

#: Fixed evaluation protocol (recorded in every provenance file).
SPLIT_SEED = 0
EVAL_SEED = 2015
EVAL_EPISODES = 600
EVAL_CHUNK = 100          # episodes drawn per call; the first chunk is what the test re-checks
EVAL_QUERY = 5            # query images per class in a test episode


# ------------------------------------------------------------------------------------------------ data
def shared_omniglot_dir() -> Path:
    """The folder holding the small background zips and ``all_runs.zip`` (:func:`metatut.data.offline_omniglot_dir`)."""
    folder = offline_omniglot_dir()
    if folder is None:
        raise FileNotFoundError("the small Omniglot background sets and all_runs.zip were not found (see "
                                "metatut.data.offline_omniglot_dir); set METATUT_SHARED_OMNIGLOT, or call "
                                "metatut.data.load_omniglot('small', download=True) and "
                                "metatut.data.load_one_shot_runs(download=True) once")
    return folder


def load_split(folder: Path | None = None, cache_dir=None):
    """The character-level split used for training and testing (rotations for training classes only)."""
    folder = shared_omniglot_dir() if folder is None else folder
    data = load_omniglot("small", root=folder, download=False, cache_dir=cache_dir)
    return fraction_split(data, seed=SPLIT_SEED)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- models
#: the keys of the checkpoints written before the script used the training command -> TrainConfig's
OLD_KEYS = {"hidden": "width", "k_shot": "shots", "q_query": "query", "test_inner_steps": "eval_inner_steps"}


def setting(config: dict, key: str, default=None):
    """``config[key]`` in either format: the training command's (``width``) or the old script's (``hidden``)."""
    if key in config:
        return config[key]
    if key in OLD_KEYS and OLD_KEYS[key] in config:
        return config[OLD_KEYS[key]]
    return default


def build_model(config: dict) -> torch.nn.Module:
    """conv4 with a head of ``n_way`` outputs (MAML, FOMAML) or none (ProtoNets: an embedding)."""
    head = None if config["algorithm"] == "protonet" else config["n_way"]
    return mt.conv4(head, hidden=setting(config, "hidden"), seed=config["seed"])


# ------------------------------------------------------------------------------------------ evaluation
def episode_accuracy(model, params, config: dict, batch: mt.TaskBatch, n_way: int) -> torch.Tensor:
    if config["algorithm"] == "protonet":
        return mt.protonet_accuracy(model, params, batch, n_way)
    return mt.adapted_accuracy(model, params, batch, inner_lr=config["inner_lr"],
                               steps=setting(config, "test_inner_steps"), loss_fn=torch.nn.functional.cross_entropy)


def evaluate_episodes(model, params, config: dict, images, *, n_way: int, episodes: int = EVAL_EPISODES,
                      seed: int = EVAL_SEED, chunk: int = EVAL_CHUNK, k_shot: int = 1,
                      q_query: int = EVAL_QUERY) -> torch.Tensor:
    """Accuracy on each of ``episodes`` seeded test episodes (:func:`metatut.held_out_episodes`: a shorter
    evaluation re-checks a prefix of a recorded one)."""
    batches = mt.held_out_episodes(images, episodes, n_way, k_shot, q_query, seed=seed, chunk=chunk)
    return torch.cat([episode_accuracy(model, params, config, batch, n_way) for batch in batches])


def one_shot_predictor(model, params, config: dict):
    """``predict(support_x, support_y, query_x)`` for Lake et al.'s runs (20-way: MAML needs a 20-way head)."""
    if config["algorithm"] == "protonet":
        return mt.protonet_predictor(model, params)
    return mt.adapted_predictor(model, params, inner_lr=config["inner_lr"], steps=setting(config, "test_inner_steps"))


def evaluation_ways(config: dict) -> list[int]:
    """ProtoNets have no head: evaluate at 5 and 20 ways. MAML models: at the way they were trained for."""
    return [5, 20] if config["algorithm"] == "protonet" else [config["n_way"]]


def evaluate_checkpoint(model, params, config: dict, split, runs=None, *, episodes: int = EVAL_EPISODES) -> dict:
    """Everything the provenance file records about accuracy (see the module docstring)."""
    record = {"protocol": {"images": "split.test (48 held-out characters, never rotated)", "seed": EVAL_SEED,
                           "episodes": episodes, "chunk": EVAL_CHUNK, "k_shot": 1, "q_query": EVAL_QUERY,
                           "split_seed": SPLIT_SEED,
                           "test_inner_steps": (setting(config, "test_inner_steps")
                                                if config["algorithm"] != "protonet" else None)},
              "episodes": {}}
    for n_way in evaluation_ways(config):
        acc = evaluate_episodes(model, params, config, split.test, n_way=n_way, episodes=episodes)
        summary = mt.summarize(acc)
        correct = (acc[:EVAL_CHUNK] * n_way * EVAL_QUERY).round().long().tolist()
        record["episodes"][f"{n_way}way1shot"] = {"mean": summary.mean, "ci95": summary.ci95, "n": summary.n,
                                                  "first_chunk_correct": correct,
                                                  "first_chunk_mean": float(acc[:EVAL_CHUNK].mean())}
    if runs is not None and (config["algorithm"] == "protonet" or config["n_way"] == 20):
        result = evaluate_one_shot(one_shot_predictor(model, params, config), runs)
        record["one_shot_runs"] = {"error": result.error, "errors": result.errors.tolist(), "runs": list(result.runs)}
    return record


# ------------------------------------------------------------------------------------------ provenance
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "metatut", "scripts"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes in metatut/ or scripts/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reproduce_command(args, steps: int) -> str:
    return (f"python scripts/train_omniglot.py --algorithm {args.algorithm} --n-way {args.n_way} "
            f"--k-shot {args.k_shot} --q-query {args.q_query} --meta-batch {args.meta_batch} --steps {steps} "
            f"--hidden {args.hidden} --meta-lr {args.meta_lr} --inner-lr {args.inner_lr} "
            f"--inner-steps {args.inner_steps} --test-inner-steps {args.test_inner_steps} --seed {args.seed} "
            f"--threads {args.threads} --output {args.output}")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithm", choices=ALGORITHMS, required=True)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--q-query", type=int, default=5, help="query images per class in a training episode")
    p.add_argument("--meta-batch", type=int, default=8, help="episodes per meta-iteration")
    p.add_argument("--steps", type=int, default=2000, help="meta-iterations (at most; see --max-minutes)")
    p.add_argument("--hidden", type=int, default=32, help="conv4 filters per layer (the papers use 64)")
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--inner-lr", type=float, default=0.4, help="MAML's inner step size (MAML paper: 0.4)")
    p.add_argument("--inner-steps", type=int, default=1, help="MAML's inner steps in training")
    p.add_argument("--test-inner-steps", type=int, default=3, help="MAML's inner steps at test time")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and training episodes")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the chunk that passes this")
    p.add_argument("--chunk", type=int, default=50, help="iterations between time checks")
    p.add_argument("--output", type=Path, required=True, help="checkpoint path (.pt); provenance goes to .json")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the training command's run folder (default runs/train_omniglot/<output name>)")
    p.add_argument("--eval-tasks", type=int, default=EVAL_CHUNK,
                   help="episodes of the training command's own final evaluation (metrics.csv)")
    return p.parse_args(argv)


def training_config(args, folder: Path, steps: int | None = None) -> cli.TrainConfig:
    """The training command's configuration for these options (``steps`` defaults to ``--steps``)."""
    return cli.TrainConfig(
        name=args.output.stem, task="omniglot", dataset="small", data_root=str(folder), algorithm=args.algorithm,
        n_way=args.n_way, shots=args.k_shot, query=args.q_query, meta_batch=args.meta_batch,
        steps=args.steps if steps is None else steps, width=args.hidden, meta_lr=args.meta_lr,
        inner_lr=args.inner_lr, inner_steps=args.inner_steps, eval_inner_steps=args.test_inner_steps,
        seed=args.seed, device="cpu", log_every=1, eval_every=10_000_000,
        eval_tasks=args.eval_tasks, checkpoint_every=args.chunk, progress=False,
        out_dir=str(args.run_dir or Path("runs") / "train_omniglot" / args.output.stem)).validate()


def run_training(args, folder: Path) -> tuple[cli.TrainConfig, int, float]:
    """Train in chunks of ``--chunk`` iterations with the training command (each chunk resumes the last),
    until ``--steps`` or past ``--max-minutes``; returns the configuration, the iterations run and seconds."""
    cfg = training_config(args, folder)
    start, done = time.perf_counter(), 0
    while done < args.steps:
        outcome = cli.train(cfg, resume=done > 0, overwrite=done == 0, stop_after=args.chunk)
        done = outcome["step"]
        loss = read_losses(Path(cfg.out_dir))[-min(args.chunk, done):]
        print(f"{args.algorithm} {args.n_way}-way: {done} iterations, loss {sum(loss) / len(loss):.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            break
    return cfg, done, time.perf_counter() - start


def read_losses(run_dir: Path) -> list[float]:
    """The training loss of every iteration, from the run's ``metrics.csv`` (``log_every=1``)."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]


def training_command(cfg: cli.TrainConfig) -> str:
    """The ``metatut-train`` command line that runs the same training (in one go)."""
    values = {k: v for k, v in cfg.to_dict().items() if v != getattr(cli.TrainConfig, k, None)}
    return "metatut-train --set " + " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = shared_omniglot_dir()
    split = load_split(folder)
    runs = load_one_shot_runs(folder / ONE_SHOT_RUNS_ZIP)
    load_start = os.getloadavg()
    try:
        cfg, done, train_seconds = run_training(args, folder)
    except cli.ConfigError as e:
        print(f"train_omniglot: configuration error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"train_omniglot: {e}", file=sys.stderr)
        return 3
    losses = read_losses(Path(cfg.out_dir))[:done]
    config = {**cfg.to_dict(), "steps": done}
    params = mt.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt", requires_grad=False)["params"]
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    mt.save_checkpoint(output, params, config=config, step=done)
    eval_start = time.perf_counter()
    model = build_model(config)
    evaluation = evaluate_checkpoint(model, params, config, split, runs)
    provenance = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reproduce": reproduce_command(args, done),
        "training_command": training_command(training_config(args, folder, steps=done)),
        "config": config,
        "seed": args.seed,
        "data": {"folder_name": folder.name,
                 "files": {name: sha256(folder / name) for name in (*SMALL_ZIPS, ONE_SHOT_RUNS_ZIP)},
                 "note": "the small background sets only (242 characters), not Omniglot's full background set "
                         "(964 characters): numbers are not comparable to the papers'"},
        "git_commit": git_commit(),
        "hardware": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "load_average_at_start": [round(x, 2) for x in load_start],
                     "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "software": {"torch": str(torch.__version__), "python": platform.python_version(),
                     "metatut": mt.__version__},
        "wall_time_s": {"training": round(train_seconds, 1), "per_iteration": round(train_seconds / done, 4),
                        "evaluation": round(time.perf_counter() - eval_start, 1)},
        "training_loss": {"first_50": sum(losses[:50]) / len(losses[:50]),
                          "last_50": sum(losses[-50:]) / len(losses[-50:])},
        "checkpoint": {"file": output.name, "sha256": sha256(output), "bytes": output.stat().st_size},
        "evaluation": evaluation,
    }
    atomic_write_text(output.with_suffix(".json"), json.dumps(provenance, indent=1) + "\n")
    for name, e in evaluation["episodes"].items():
        print(f"{name}: {100 * e['mean']:.1f} ± {100 * e['ci95']:.1f}% over {e['n']} test episodes")
    if "one_shot_runs" in evaluation:
        print(f"one-shot runs: {100 * evaluation['one_shot_runs']['error']:.1f}% error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
