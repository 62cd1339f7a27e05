"""Time to quality: training wall-clock until 90% held-out 5-way 1-shot accuracy on the small Omniglot sets.

    python bench/time_to_quality.py run --row metatut --seed 0          # one run, appended to --results
    python bench/time_to_quality.py run --row learn2learn-cnn --seed 1 --cap-minutes 20
    python bench/time_to_quality.py run --row metatut --device cuda     # on a GPU (default: the best device)
    python bench/time_to_quality.py report                              # the table (medians over seeds)
    python bench/time_to_quality.py all --seeds 0,1,2 --parallel 2      # every row and seed, then the table
    python bench/time_to_quality.py run --row metatut --quick           # tiny sizes, seconds (tests)

Rows (``--row``):

- ``metatut``: the shipped configuration ``configs/omniglot_5way_1shot.json`` (conv4, 64 filters, max-pool,
  meta-batch 32, 15 queries per class, one inner step of 0.4, Adam 1e-3), trained with the training command's
  own objective (``metatut.run.build``: the path it chooses for the device);
- ``metatut-l2l-settings``: metatut with learn2learn's example settings (below) and learn2learn's network shape
  (conv4 with stride-2 convolutions and mean pooling, ``conv4(downsample="stride")``): the libraries compared
  on the same configuration;
- ``learn2learn-fc``: learn2learn's own Omniglot MAML example as it ships (``examples/vision/maml_omniglot.py``:
  ``OmniglotFC``; 5 ways, 1 shot, 1 query image per class, ``fast_lr`` 0.5, one adaptation step, second order,
  Adam 0.003, meta-batch 32, ``backward()`` per task) run with learn2learn 0.2.0;
- ``learn2learn-cnn``: the same example with ``OmniglotCNN``, the swap its README gives for the CNN results.

Same data, same machine, same evaluation for every row: episodes are drawn from the same in-memory images
(the small background sets, ``fraction_split(seed=0)``: 146 training characters with rotations, 48 held-out
characters) by ``metatut.sample_episodes`` (learn2learn's ``TaskDataset`` would need its own download of
Omniglot); every ``--eval-every-s`` seconds of training (120 for the shipped row, 30 for the others),
training pauses and the model is scored on the same fixed held-out episodes (``--eval-tasks`` 5-way 1-shot tasks, 5 queries per class, seed 2015), adapted with the
row's inner learning rate for 3 steps (the MAML paper's test-time protocol; learn2learn's README notes it).
The clock counts training only (sampling included, evaluation excluded). A run stops at its first score
>= ``--target`` or at ``--cap-minutes`` of training. Each run is one process with ``--threads`` intra-op
threads; its result is one JSON line in ``--results`` (``bench/out/ttq.jsonl``). On a GPU the images,
episodes and model live on the device (training episodes drawn there; the evaluation episodes are drawn on
the CPU, the same as on a CPU, and moved), metatut's steps do not synchronise with the host (losses are checked at each evaluation), learn2learn's
example reads each task's loss with ``.item()`` as it does itself, and the clock waits for the device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from machine import cpu_model  # noqa: E402
from peers_common import import_peers, mt  # noqa: E402  (metatut from the checkout when not installed)

from metatut.fileio import FileLock, atomic_write_text  # noqa: E402
from metatut.timing import synchronize  # noqa: E402

ROWS = ("metatut", "metatut-l2l-settings", "learn2learn-fc", "learn2learn-cnn")
#: learn2learn's examples/vision/maml_omniglot.py defaults (ways, shots, meta_lr, fast_lr, meta_batch_size,
#: adaptation_steps; train_samples = 2 * shots, i.e. one query image per class).
L2L_EXAMPLE = {"n_way": 5, "shots": 1, "query": 1, "meta_lr": 0.003, "inner_lr": 0.5, "meta_batch": 32,
               "inner_steps": 1}
EVAL_SEED, EVAL_QUERY, EVAL_STEPS = 2015, 5, 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one training run; appends its result to --results")
    run.add_argument("--row", required=True, choices=ROWS)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--target", type=float, default=0.90, help="held-out accuracy to reach (default 0.90)")
    run.add_argument("--cap-minutes", type=float, default=30.0, help="training minutes before giving up")
    run.add_argument("--eval-every-s", type=float, default=None,
                     help="training seconds between evaluations (default: 120 for the metatut row, whose "
                          "evaluation takes ~24 s on a CPU thread, 30 for the others; on a GPU use a few seconds)")
    run.add_argument("--eval-tasks", type=int, default=400, help="fixed held-out episodes (default 400)")
    run.add_argument("--threads", type=int, default=1, help="intra-op threads of this process (default 1)")
    run.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    run.add_argument("--quick", action="store_true",
                     help="tiny sizes for tests: 8 filters, meta-batch 2, 10 evaluation tasks, 3 s of training")
    run.add_argument("--results", default=str(BENCH_DIR / "out" / "ttq.jsonl"))
    every = sub.add_parser("all", help="every row (learn2learn's if importable) for every seed, each run in its "
                           "own process, then the report")
    every.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    every.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    every.add_argument("--parallel", type=int, default=1,
                       help="runs at a time (default 1; on a CPU at most cores / --threads)")
    every.add_argument("--threads", type=int, default=1, help="intra-op threads per run (default 1)")
    every.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    every.add_argument("--cap-minutes", type=float, default=30.0, help="training minutes per run before giving up")
    every.add_argument("--eval-every-s", type=float, default=None, help="as for run (default: per row)")
    every.add_argument("--quick", action="store_true", help="pass --quick to every run (tests)")
    every.add_argument("--results", default=str(BENCH_DIR / "out" / "ttq.jsonl"))
    report = sub.add_parser("report", help="the Markdown table of --results (medians over seeds)")
    report.add_argument("--results", default=str(BENCH_DIR / "out" / "ttq.jsonl"))
    report.add_argument("--out", default=None, help="also write the table here")
    report.add_argument("--quick", action="store_true", help="tabulate the --quick runs (tests) instead")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.eval_every_s is None:
            args.eval_every_s = 120.0 if args.row == "metatut" else 30.0
        for name in ("cap_minutes", "eval_every_s"):
            if not getattr(args, name) > 0:
                parser.error(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
        if not 0 < args.target <= 1:
            parser.error(f"--target must be in (0, 1] (got {args.target})")
        if args.eval_tasks < 1 or args.threads < 1:
            parser.error("--eval-tasks and --threads must be >= 1")
        if args.quick:
            args.cap_minutes, args.eval_every_s, args.eval_tasks = 0.05, 1.0, 10
    if args.command == "all":
        try:
            args.seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers (got {args.seeds!r})")
        args.rows = [r.strip() for r in args.rows.split(",")]
        unknown = [r for r in args.rows if r not in ROWS]
        if unknown:
            parser.error(f"--rows: unknown {unknown}; allowed: {', '.join(ROWS)}")
        if args.parallel < 1 or args.threads < 1 or not args.cap_minutes > 0:
            parser.error("--parallel and --threads must be >= 1 and --cap-minutes > 0")
    return args


def run_all(args) -> None:
    """Every (seed, row) in its own process, ``--parallel`` at a time; the runs append to ``--results``."""
    import subprocess
    rows = list(args.rows)
    if any(r.startswith("learn2learn") for r in rows):
        modules, skipped = import_peers(["learn2learn"])
        if "learn2learn" not in modules:
            print(f"learn2learn rows skipped: {skipped.get('learn2learn')} (bash bench/setup_peers.sh)", flush=True)
            rows = [r for r in rows if not r.startswith("learn2learn")]
    jobs = [[sys.executable, __file__, "run", "--row", row, "--seed", str(seed), "--threads", str(args.threads),
             "--cap-minutes", f"{args.cap_minutes:g}", "--results", args.results,
             *(["--eval-every-s", f"{args.eval_every_s:g}"] if args.eval_every_s else []),
             *(["--quick"] if args.quick else []),
             *(["--device", args.device] if args.device else [])] for seed in args.seeds for row in rows]
    running: list[subprocess.Popen] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            running.append(subprocess.Popen(jobs.pop(0)))
        time.sleep(1)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            if process.returncode != 0:
                failed.append(" ".join(process.args[3:7]))
    if failed:
        raise SystemExit(f"error: these runs failed: {'; '.join(failed)}")


def load_split():
    """The small Omniglot sets with the training command's split (that of notebooks 05/06 and the checkpoints):
    :func:`metatut.run.build.omniglot_split`, which finds the offline copy or downloads the sets."""
    from metatut.run.build import omniglot_split
    from metatut.run.config import TrainConfig
    return omniglot_split(TrainConfig(task="omniglot", dataset="small"))


class MetatutTrainer:
    """The training command's pieces for a :class:`metatut.run.config.TrainConfig` (``build``'s objective)."""

    def __init__(self, row: str, seed: int, split, quick: bool, device: torch.device) -> None:
        from metatut.conv import conv4
        from metatut.run.build import build, make_model
        from metatut.run.config import TrainConfig
        if row == "metatut":
            shipped = json.loads((BENCH_DIR.parent / "configs" / "omniglot_5way_1shot.json").read_text())
            options = {k: shipped[k] for k in ("n_way", "shots", "query", "meta_lr", "inner_lr", "meta_batch",
                                               "inner_steps", "width")}
        else:
            options = {**L2L_EXAMPLE, "width": 64}
        if quick:
            options.update(width=8, meta_batch=2)
        self.cfg = TrainConfig(task="omniglot", dataset="small", algorithm="maml", seed=seed, device=device.type,
                               progress=False, **options).resolved()
        model = (make_model(self.cfg) if row == "metatut" else
                 conv4(self.cfg.n_way, hidden=self.cfg.width, downsample="stride", seed=seed))
        self.parts = build(self.cfg, device, model, lambda cfg: split)
        self.optimizer = torch.optim.Adam(self.parts.params.values(), lr=self.cfg.meta_lr)
        self.generator = mt.make_generator(seed, device)
        self.settings = {k: getattr(self.cfg, k) for k in ("n_way", "shots", "query", "meta_lr", "inner_lr",
                                                             "meta_batch", "inner_steps", "width")}
        self.settings["network"] = "conv4 max-pool" if row == "metatut" else "conv4 stride-2"

    def step(self) -> torch.Tensor:
        batch = self.parts.sample(self.cfg.meta_batch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.parts.objective(self.parts.params, batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()        # no host synchronisation: checked at the next evaluation

    def accuracy(self, episodes) -> torch.Tensor:
        return mt.adapted_accuracy(self.parts.model, self.parts.params, episodes, inner_lr=self.cfg.inner_lr,
                                   steps=EVAL_STEPS, loss_fn=F.cross_entropy)


class Learn2LearnTrainer:
    """learn2learn's Omniglot MAML example (its model, ``MAML`` wrapper, loss and per-task ``backward``)."""

    def __init__(self, row: str, seed: int, split, quick: bool, device: torch.device) -> None:
        modules, skipped = import_peers(["learn2learn"])
        if "learn2learn" not in modules:
            raise SystemExit(f"error: learn2learn is not importable ({skipped.get('learn2learn')}); "
                             "run bash bench/setup_peers.sh")
        l2l = modules["learn2learn"]
        self.cfg = dict(L2L_EXAMPLE, meta_batch=2 if quick else L2L_EXAMPLE["meta_batch"])
        torch.manual_seed(seed)
        if row == "learn2learn-fc":
            model = l2l.vision.models.OmniglotFC(28 ** 2, self.cfg["n_way"])
        else:
            model = l2l.vision.models.OmniglotCNN(self.cfg["n_way"], hidden_size=8 if quick else 64)
        self.maml = l2l.algorithms.MAML(model.to(device), lr=self.cfg["inner_lr"], first_order=False)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), lr=self.cfg["meta_lr"])
        self.loss = torch.nn.CrossEntropyLoss(reduction="mean")
        self.images = split.train.images.to(device)
        self.generator = mt.make_generator(seed, device)
        self.settings = {**self.cfg, "width": 8 if quick else (64 if row == "learn2learn-cnn" else 256),
                         "network": "OmniglotFC 256-128-64-64" if row == "learn2learn-fc" else "OmniglotCNN"}

    def _adapt(self, x, y, steps: int):
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(self.loss(learner(x), y))
        return learner

    def step(self) -> torch.Tensor:
        batch = mt.sample_episodes(self.images, self.cfg["meta_batch"], self.cfg["n_way"], self.cfg["shots"],
                                   self.cfg["query"], generator=self.generator)
        self.optimizer.zero_grad()
        total = 0.0
        for t in range(batch.num_tasks):
            learner = self._adapt(batch.support_x[t], batch.support_y[t], self.cfg["inner_steps"])
            error = self.loss(learner(batch.query_x[t]), batch.query_y[t])
            error.backward()
            total += error.item()
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / batch.num_tasks)
        self.optimizer.step()
        return torch.tensor(total / batch.num_tasks)

    def accuracy(self, episodes) -> torch.Tensor:
        scores = []
        for t in range(episodes.num_tasks):
            learner = self._adapt(episodes.support_x[t], episodes.support_y[t], EVAL_STEPS)
            with torch.no_grad():
                scores.append((learner(episodes.query_x[t]).argmax(1) == episodes.query_y[t]).float().mean())
        return torch.stack(scores)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    try:
        device = mt.pick_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: --device: {e}") from None
    split = load_split()
    episodes = mt.sample_episodes(split.test.images, args.eval_tasks, 5, 1, EVAL_QUERY,
                                  generator=mt.make_generator(EVAL_SEED)).to(device)
    trainer = (MetatutTrainer if args.row.startswith("metatut") else Learn2LearnTrainer)(
        args.row, args.seed, split, args.quick, device)
    cap_s = args.cap_minutes * 60
    trained_s, iterations, curve, reached_s, reached_iterations = 0.0, 0, [], None, None
    while reached_s is None and trained_s < cap_s:
        synchronize(device)
        start, losses = time.perf_counter(), []
        while time.perf_counter() - start < args.eval_every_s and trained_s + time.perf_counter() - start < cap_s:
            losses.append(trainer.step())
            iterations += 1
        synchronize(device)
        trained_s += time.perf_counter() - start
        finite = torch.isfinite(torch.stack(losses).float())
        if not bool(finite.all()):
            first = iterations - len(losses) + 1 + int((~finite).nonzero()[0])
            raise SystemExit(f"error: non-finite training loss at iteration {first} ({args.row}); nothing recorded")
        accuracy = trainer.accuracy(episodes)
        score = mt.summarize(accuracy)
        curve.append([round(trained_s, 1), iterations, round(score.mean, 4)])
        print(f"{args.row} seed {args.seed}: {trained_s:7.1f} s, {iterations:5d} iterations, "
              f"held-out {score.mean:.3f} ± {score.ci95:.3f}", flush=True)
        if score.mean >= args.target:
            reached_s, reached_iterations = trained_s, iterations
    result = {"row": args.row, "seed": args.seed, "target": args.target, "reached_s": reached_s,
              "reached_iterations": reached_iterations, "trained_s": round(trained_s, 1), "iterations": iterations,
              "ms_per_iteration": round(1000 * trained_s / max(iterations, 1), 1), "final_accuracy": curve[-1][2],
              "eval_tasks": args.eval_tasks, "eval_every_s": args.eval_every_s, "cap_minutes": args.cap_minutes,
              "threads": args.threads, "settings": trainer.settings, "curve": curve, "quick": args.quick,
              "device": device.type, "cpu": cpu_model(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock"), purpose="time_to_quality results"):
        before = path.read_text() if path.is_file() else ""
        atomic_write_text(path, before + json.dumps(result) + "\n")   # whole file or nothing, never half a line
    return result


def report(args) -> str:
    path = Path(args.results)
    if not path.is_file():
        raise SystemExit(f"error: no results at {path}; run: python bench/time_to_quality.py run --row ...")
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    results = [r for r in results if bool(r.get("quick")) == args.quick]
    if not results:
        raise SystemExit(f"error: no {'--quick ' if args.quick else ''}runs in {path}")
    lines = ["| row | network | settings | seeds | reached 90% | median minutes to 90% | minutes (per seed) | "
             "median iterations to 90% | median ms/iteration | scored every | held-out accuracy at stop (per seed) |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for row in ROWS:
        runs = sorted((r for r in results if r["row"] == row), key=lambda r: r["seed"])
        if not runs:
            continue
        s = runs[0]["settings"]
        settings = (f"meta-batch {s['meta_batch']}, {s['query']} quer{'y' if s['query'] == 1 else 'ies'}/class, "
                    f"inner lr {s['inner_lr']}, meta lr {s['meta_lr']}")
        hits = [r for r in runs if r["reached_s"] is not None]
        # a run that did not reach the target counts as +inf: the median is finite only if most runs reached it
        inf = float("inf")
        times = [r["reached_s"] / 60 if r["reached_s"] is not None else inf for r in runs]
        median_min = statistics.median(times)
        median_its = statistics.median(r["reached_iterations"] if r["reached_iterations"] is not None else inf
                                       for r in runs)
        cap = max(r["cap_minutes"] for r in runs)
        minutes = f"{median_min:.1f}" if median_min != inf else f"> {cap:g} (cap)"
        per_seed = ", ".join(f"{t:.1f}" if t != inf else f"> {r['cap_minutes']:g}" for t, r in zip(times, runs, strict=True))
        iterations = f"{median_its:.0f}" if median_its != inf else "–"
        ms = statistics.median(r["ms_per_iteration"] for r in runs)
        final = ", ".join(f"{100 * r['final_accuracy']:.1f}%" for r in runs)
        lines.append(f"| {row} | {s['network']} | {settings} | {len(runs)} | {len(hits)}/{len(runs)} | {minutes} | "
                     f"{per_seed} | {iterations} | {ms:.0f} | {runs[0]['eval_every_s']:g} s | {final} |")
    first = results[0]
    devices = sorted({r.get("gpu") or f"{r['cpu']} CPU, {r['threads']} intra-op thread(s) per run" for r in results})
    dates = sorted({r["date"] for r in results})
    lines += ["", f"Machine: {'; '.join(devices)}; torch {first['torch']}; {' to '.join(dates[::max(len(dates) - 1, 1)])}. "
              f"Held-out: {first['eval_tasks']} fixed 5-way 1-shot episodes of the 48 test characters "
              f"({EVAL_QUERY} queries per class), {EVAL_STEPS} adaptation steps, scored after each 'scored every' "
              "of training (the clock counts training only)."]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "all":
        run_all(args)
        print(report(argparse.Namespace(results=args.results, out=None, quick=args.quick)), end="")
    elif args.command == "run":
        result = run(args)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    else:
        print(report(args), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
