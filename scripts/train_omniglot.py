"""Train MAML, first-order MAML or Prototypical Networks on Omniglot and save a checkpoint with its provenance.

Usage (from the repository root)::

    python scripts/train_omniglot.py --algorithm protonet --n-way 5 --k-shot 1 --steps 2000 \\
        --hidden 32 --seed 0 --output checkpoints/protonet_5way1shot.pt

Data: the two small background sets (``images_background_small1/2.zip``, 242 characters; **not** the full
background set of 964 characters, so accuracies are not comparable to the papers'), split by character
with :func:`metatut.data.fraction_split` (seed 0: 146 training characters, each rotated by 0/90/180/270
degrees into 584 training classes; 48 validation and 48 test characters, never rotated). The zips are
looked for in ``$METATUT_SHARED_OMNIGLOT``, then ``METATUT_DATA/omniglot``, then ``<repo>/../shared/data/omniglot``.

Training: :func:`metatut.meta_train` (Adam) on episodes from the training classes. ``--max-minutes`` stops
early at a whole chunk of ``--chunk`` iterations; the checkpoint's ``config['steps']`` is the number of
iterations actually run, and the provenance's ``reproduce`` command runs exactly those.

Next to ``OUTPUT`` (``name.pt``) the script writes ``name.json``: command, configuration, seed, data files
with their SHA-256, git commit, hardware, torch version, wall time, and the accuracy on fixed, seeded test
episodes (per episode for the first chunk, so that ``tests/test_pretrained.py`` can re-check it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import metatut as mt
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
def build_model(config: dict) -> torch.nn.Module:
    """conv4 with a head of ``n_way`` outputs (MAML, FOMAML) or none (ProtoNets: an embedding)."""
    head = None if config["algorithm"] == "protonet" else config["n_way"]
    return mt.conv4(head, hidden=config["hidden"], seed=config["seed"])


def build_objective(model, config: dict):
    if config["algorithm"] == "protonet":
        return mt.protonet_objective(model, config["n_way"])
    return mt.maml_objective(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                             first_order=config["algorithm"] == "fomaml", loss_fn=F.cross_entropy)


# ------------------------------------------------------------------------------------------ evaluation
def episode_accuracy(model, params, config: dict, batch: mt.TaskBatch, n_way: int) -> torch.Tensor:
    if config["algorithm"] == "protonet":
        return mt.protonet_accuracy(model, params, batch, n_way)
    return mt.adapted_accuracy(model, params, batch, inner_lr=config["inner_lr"], steps=config["test_inner_steps"],
                               loss_fn=F.cross_entropy)


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
    return mt.adapted_predictor(model, params, inner_lr=config["inner_lr"], steps=config["test_inner_steps"])


def evaluation_ways(config: dict) -> list[int]:
    """ProtoNets have no head: evaluate at 5 and 20 ways. MAML models: at the way they were trained for."""
    return [5, 20] if config["algorithm"] == "protonet" else [config["n_way"]]


def evaluate_checkpoint(model, params, config: dict, split, runs=None, *, episodes: int = EVAL_EPISODES) -> dict:
    """Everything the provenance file records about accuracy (see the module docstring)."""
    record = {"protocol": {"images": "split.test (48 held-out characters, never rotated)", "seed": EVAL_SEED,
                           "episodes": episodes, "chunk": EVAL_CHUNK, "k_shot": 1, "q_query": EVAL_QUERY,
                           "split_seed": SPLIT_SEED, "test_inner_steps": config.get("test_inner_steps")},
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = shared_omniglot_dir()
    split = load_split(folder)
    runs = load_one_shot_runs(folder / ONE_SHOT_RUNS_ZIP)
    config = {"algorithm": args.algorithm, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
              "meta_batch": args.meta_batch, "hidden": args.hidden, "meta_lr": args.meta_lr, "seed": args.seed,
              "model": "conv4", "batch_norm": "batch", "downsample": "maxpool", "split_seed": SPLIT_SEED,
              "data": "small background sets, fraction_split(seed=0) training classes (146 characters x 4 rotations)"}
    if args.algorithm != "protonet":
        config.update(inner_lr=args.inner_lr, inner_steps=args.inner_steps, test_inner_steps=args.test_inner_steps)
    model = build_model(config)
    params = mt.init_params(model)
    objective = build_objective(model, config)
    sampler = mt.EpisodeSampler(split.train, n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query,
                                num_tasks=args.meta_batch)
    generator = torch.Generator().manual_seed(args.seed)
    load_start = os.getloadavg()
    start = time.perf_counter()
    optimizer, losses, done = None, [], 0
    while done < args.steps:
        n = min(args.chunk, args.steps - done)
        result = mt.meta_train(objective, params, sampler, steps=n, meta_lr=args.meta_lr, generator=generator,
                               optimizer=optimizer, progress_bar=False, check=False)
        optimizer, done = result.optimizer, done + n
        losses.append(result.losses)
        mean = float(result.losses.mean())
        print(f"{args.algorithm} {args.n_way}-way: {done} iterations, loss {mean:.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if not math.isfinite(mean):
            raise FloatingPointError("the training loss is not finite")
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            break
    train_seconds = time.perf_counter() - start
    losses = torch.cat(losses)
    config["steps"] = done
    output = args.output
    mt.save_checkpoint(output, params, config=config, step=done)
    eval_start = time.perf_counter()
    evaluation = evaluate_checkpoint(model, params, config, split, runs)
    provenance = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reproduce": reproduce_command(args, done),
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
        "training_loss": {"first_50": float(losses[:50].mean()), "last_50": float(losses[-50:].mean())},
        "checkpoint": {"file": output.name, "sha256": sha256(output), "bytes": output.stat().st_size},
        "evaluation": evaluation,
    }
    json_path = output.with_suffix(".json")
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(provenance, indent=1) + "\n")
    os.replace(tmp, json_path)
    for name, e in evaluation["episodes"].items():
        print(f"{name}: {100 * e['mean']:.1f} ± {100 * e['ci95']:.1f}% over {e['n']} test episodes")
    if "one_shot_runs" in evaluation:
        print(f"one-shot runs: {100 * evaluation['one_shot_runs']['error']:.1f}% error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
