"""The training command: ``python -m metatut.cli CONFIG.json`` (or the ``metatut-train`` console script).

A run writes to ``out_dir``: ``config.json``, ``metrics.csv`` (and TensorBoard events when the
``tensorboard`` package is present), and ``checkpoint.pt`` every ``checkpoint_every`` steps and on
Ctrl-C. ``--resume`` continues a run exactly: parameters, optimiser, RNG streams and step are restored,
so an interrupted and resumed run ends with the same parameters as an uninterrupted one.
Every configuration value is checked before any work starts.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import functional as fn
from .accel import compile_objective
from .checkpoint import load_checkpoint, save_checkpoint
from .device import make_generator, pick_device
from .distributed import DistributedContext, init_distributed, stream_seed
from .evaluate import adapted_accuracy, evaluate_adaptation, summarize
from .models import init_params, mlp
from .tasks.base import TaskBatch
from .tasks.regression import SinusoidTasks
from .train import StopTraining, meta_train

__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "main"]

TASKS = ("sinusoid", "omniglot")
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet")
# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "checkpoint_every", "device", "out_dir", "progress",
                     "compile", "task_workers"}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in ``config.json`` and in each checkpoint."""

    name: str = "run"
    task: str = "sinusoid"            # sinusoid | omniglot
    algorithm: str = "maml"           # maml | fomaml | anil | metasgd | reptile | protonet
    steps: int = 70_000
    meta_batch: int = 25              # tasks per meta-iteration (global, across all processes)
    task_streams: int = 1             # the meta-batch is drawn from this many seeded streams (one or more per rank)
    meta_lr: float = 1e-3
    lr_schedule: str = "constant"     # constant | cosine
    inner_lr: float = 0.01
    inner_steps: int = 1
    eval_inner_steps: int = 10
    shots: int = 10                   # K: support examples per task (sinusoid) or per class (omniglot)
    query: int = 10                   # query examples per task (sinusoid) or per class (omniglot)
    n_way: int = 5                    # omniglot only
    width: int = 64                   # conv4 filters (omniglot); hidden units per layer (sinusoid: 40)
    dataset: str = "full"             # omniglot: full | small (the offline subset used by tests)
    data_root: str | None = None      # where the Omniglot zips are (default METATUT_DATA/omniglot)
    seed: int = 0
    device: str | None = None         # cpu | cuda | mps | None (pick automatically)
    log_every: int = 100
    eval_every: int = 1000
    eval_tasks: int = 600
    checkpoint_every: int = 1000
    out_dir: str = "runs/run"
    progress: bool = True
    # speed switches (metatut.accel), off by default; each is recorded in config.json with the run
    precision: str = "float32"        # float32 | bfloat16 (autocast; parameters and optimiser stay float32)
    compile: bool = False             # torch.compile the meta-loss (vmap path, or first order only)
    task_workers: int = 1             # threads that run the per-task loop's tasks in parallel (CPU)

    def validate(self) -> "TrainConfig":
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")

        def integer(name, minimum):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ConfigError(f"{name} must be an int >= {minimum} (got {v!r})")

        def number(name, low, high=math.inf, low_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
            ok = ok and (v > low if low_open else v >= low)
            if not ok:
                bracket = "(" if low_open else "["
                raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}] (got {v!r})")

        one_of("task", TASKS)
        one_of("algorithm", ALGORITHMS)
        one_of("lr_schedule", ("constant", "cosine"))
        one_of("dataset", ("full", "small"))
        one_of("precision", ("float32", "bfloat16"))
        one_of("compile", (False, True))
        if self.device is not None:
            one_of("device", ("cpu", "cuda", "mps"))
        for name in ("steps", "meta_batch", "task_streams", "shots", "query", "width", "log_every", "eval_every",
                     "checkpoint_every", "task_workers"):
            integer(name, 1)
        integer("eval_tasks", 2)
        integer("inner_steps", 0 if self.algorithm in ("maml", "fomaml", "anil", "metasgd") else 1)
        integer("eval_inner_steps", 0)
        integer("seed", 0)
        integer("n_way", 2)
        number("meta_lr", 0, 1, low_open=True)
        number("inner_lr", 0, 10)
        if self.meta_batch % self.task_streams:
            raise ConfigError(f"meta_batch ({self.meta_batch}) must be a multiple of task_streams "
                              f"({self.task_streams})")
        if self.task == "sinusoid" and self.algorithm == "protonet":
            raise ConfigError("algorithm 'protonet' needs a classification task (task: omniglot)")
        if self.task == "omniglot" and self.shots + self.query > 20:
            raise ConfigError(f"shots + query must be <= 20 (Omniglot has 20 drawings per character; "
                              f"got {self.shots} + {self.query})")
        if not isinstance(self.name, str) or not self.name or not isinstance(self.out_dir, str):
            raise ConfigError("name and out_dir must be non-empty strings")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON configuration (unknown keys are an error), apply ``key=value`` overrides, validate."""
    values: dict = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no configuration file at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a JSON object")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"overrides must look like key=value (got {item!r})")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown}; allowed: {sorted(known)}")
    return TrainConfig(**values).validate()


# ----------------------------------------------------------------------------------------- pieces
def _omniglot_split(cfg: TrainConfig):
    """The full set with the MAML split, or the small offline sets with the split that notebooks 05/06 and
    the pretrained checkpoints use (``fraction_split(seed=0)``)."""
    from .data import SMALL_ZIPS, fraction_split, load_omniglot, maml_split, offline_omniglot_dir
    if cfg.dataset == "full":
        return maml_split(load_omniglot("full", root=cfg.data_root, download=True))
    root = cfg.data_root or offline_omniglot_dir(SMALL_ZIPS)
    return fraction_split(load_omniglot("small", root=root, download=root is None), seed=0)


def _build(cfg: TrainConfig, device: torch.device):
    """Model, initial parameters, objective, loss function and a sampler of ``n`` tasks from one stream."""
    if cfg.task == "sinusoid":
        model = mlp(hidden=(cfg.width, cfg.width), seed=cfg.seed).to(device)
        loss_fn = F.mse_loss
        tasks = SinusoidTasks()

        def sample(n, generator):
            return tasks.sample(n, cfg.shots, cfg.query, generator=generator)
        held_out = None
    else:
        from .conv import conv4
        from .tasks.episodes import sample_episodes
        split = _omniglot_split(cfg)
        images = split.train.images.to(device)
        model = conv4(None if cfg.algorithm == "protonet" else cfg.n_way, hidden=cfg.width, seed=cfg.seed).to(device)
        loss_fn = F.cross_entropy

        def sample(n, generator):
            return sample_episodes(images, n, cfg.n_way, cfg.shots, cfg.query, generator=generator)
        held_out = split.test.images.to(device)
    params = init_params(model)
    options = dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, loss_fn=loss_fn)
    if cfg.algorithm in ("maml", "fomaml", "anil", "metasgd"):
        # each task's graph is freed as soon as it is differentiated: memory of one task, not of the meta-batch
        options.update(task_workers=cfg.task_workers, per_task_backward=True)
    if cfg.algorithm in ("maml", "fomaml"):
        objective = fn.maml_objective(model, first_order=cfg.algorithm == "fomaml", **options)
    elif cfg.algorithm == "anil":
        objective = fn.maml_objective(model, adapt_names=fn.final_layer_names(model), **options)
    elif cfg.algorithm == "metasgd":
        params.update(fn.learned_inner_lrs(params, init=cfg.inner_lr))
        objective = fn.maml_objective(model, **{**options, "inner_lr": "learned"})
    elif cfg.algorithm == "reptile":
        objective = fn.reptile_objective(model, **options)
    else:
        from .protonet import protonet_objective
        objective = protonet_objective(model, cfg.n_way)
    try:
        objective = compile_objective(objective, enabled=cfg.compile, vectorized=fn.prefers_vmap(model),
                                      first_order=cfg.algorithm in ("fomaml", "reptile", "protonet"))
    except ValueError as e:
        raise ConfigError(f"compile: {e}") from None
    return model, params, objective, loss_fn, sample, held_out


def _evaluate(cfg: TrainConfig, model, params, loss_fn, sample, held_out, device) -> dict:
    generator = make_generator(stream_seed(cfg.seed, 999_983), device)
    adapt_lr = "learned" if cfg.algorithm == "metasgd" else cfg.inner_lr
    adapt_names = fn.final_layer_names(model) if cfg.algorithm == "anil" else None
    if cfg.task == "sinusoid":
        batch = sample(cfg.eval_tasks, generator)
        scores = evaluate_adaptation(model, params, batch, inner_lr=adapt_lr, steps=(0, cfg.eval_inner_steps),
                                     adapt_names=adapt_names)
        return {"eval_mse": scores[cfg.eval_inner_steps].mean, "eval_mse_ci95": scores[cfg.eval_inner_steps].ci95}
    from .tasks.episodes import sample_episodes
    batch = sample_episodes(held_out, cfg.eval_tasks, cfg.n_way, cfg.shots, cfg.query, generator=generator)
    if cfg.algorithm == "protonet":
        from .protonet import protonet_accuracy
        acc = protonet_accuracy(model, params, batch, cfg.n_way)
    else:
        acc = adapted_accuracy(model, params, batch, inner_lr=adapt_lr, steps=cfg.eval_inner_steps,
                               adapt_names=adapt_names, loss_fn=loss_fn)
    s = summarize(acc)
    return {"eval_accuracy": s.mean, "eval_accuracy_ci95": s.ci95}


class _MetricsLog:
    """``metrics.csv`` (and TensorBoard when available), truncated to ``start_step`` on resume."""

    FIELDS = ["step", "loss", "meta_lr", "seconds", "eval_mse", "eval_mse_ci95", "eval_accuracy", "eval_accuracy_ci95"]

    def __init__(self, out_dir: Path, start_step: int) -> None:
        self.path = out_dir / "metrics.csv"
        rows = []
        if start_step and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tensorboard = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.tensorboard.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# ------------------------------------------------------------------------------------------- run
def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          context: DistributedContext | None = None) -> dict:
    """Run (or resume) the training that ``cfg`` describes; returns ``{'params', 'step', 'metrics'}``.

    ``stop_after=n`` ends the run cleanly after ``n`` iterations of this call, as Ctrl-C does (for tests).
    """
    cfg.validate()
    device = pick_device(cfg.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    ctx = context or init_distributed(device)
    if cfg.task_streams % ctx.world_size:
        raise ConfigError(f"task_streams ({cfg.task_streams}) must be a multiple of the number of processes "
                          f"({ctx.world_size})")
    out_dir = Path(cfg.out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise ConfigError(f"{checkpoint_path} exists: pass --resume to continue that run, or choose another out_dir")
    if resume and not checkpoint_path.exists():
        raise ConfigError(f"--resume was given but there is no checkpoint at {checkpoint_path}")

    torch.manual_seed(cfg.seed)
    model, params, objective, loss_fn, sample, held_out = _build(cfg, device)
    optimizer = torch.optim.Adam(params.values(), lr=cfg.meta_lr)
    per_stream = cfg.meta_batch // cfg.task_streams
    streams_here = range(ctx.rank * cfg.task_streams // ctx.world_size,
                         (ctx.rank + 1) * cfg.task_streams // ctx.world_size)
    generators = [make_generator(stream_seed(cfg.seed, s), device) for s in streams_here]
    start_step = 0
    if resume:
        state = load_checkpoint(checkpoint_path, device=device)
        changed = {k for k, v in state["config"].items() if cfg.to_dict().get(k) != v} - RESUMABLE_CHANGES
        if changed:
            raise ConfigError(f"cannot resume with different settings for {sorted(changed)}")
        with torch.no_grad():
            for k in params:
                params[k].copy_(state["params"][k])
        optimizer.load_state_dict(state["optimizer"])
        stream_states = state["extra"]["stream_states"]
        for g, s in zip(generators, streams_here):
            g.set_state(stream_states[s])
        torch.set_rng_state(state["extra"]["torch_rng"])
        start_step = state["step"]

    def sample_batch(_generator) -> TaskBatch:
        batches = [sample(per_stream, g) for g in generators]
        if len(batches) == 1:
            return batches[0]
        return TaskBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                           ("support_x", "support_y", "query_x", "query_y")))

    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = _MetricsLog(out_dir, start_step) if ctx.is_main else None
    interrupted = {"flag": False}
    previous_handler = None
    if ctx.is_main and _in_main_thread():
        def on_sigint(signum, frame):
            interrupted["flag"] = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            print("\nCtrl-C: finishing this step, saving a checkpoint; --resume continues", file=sys.stderr)
        previous_handler = signal.signal(signal.SIGINT, on_sigint)

    window: list[torch.Tensor] = []
    started = time.perf_counter()
    metrics: dict = {}
    iterations = {"n": 0}

    def save(step_done: int) -> None:
        states = [g.get_state() for g in generators]
        if ctx.enabled:  # every rank's stream state goes into the one checkpoint
            gathered = [ctx.gather(s) for s in states]
            states = [gathered[i][r] for r in range(ctx.world_size) for i in range(len(states))]
        if ctx.is_main:
            save_checkpoint(checkpoint_path, params, optimizer=optimizer, config=cfg.to_dict(), step=step_done,
                            extra={"stream_states": states, "torch_rng": torch.get_rng_state()})

    def on_step(step: int, loss: torch.Tensor) -> None:
        done = step + 1
        iterations["n"] += 1
        window.append(loss)
        stop = interrupted["flag"] or (stop_after is not None and iterations["n"] >= stop_after)
        if ctx.enabled:  # every rank must agree to stop at the same step
            stop = bool(ctx.mean(torch.tensor(float(stop))).item() > 0)
        if done % cfg.log_every == 0 or done == cfg.steps or stop:
            mean_loss = ctx.mean(torch.stack(window).mean()).item()
            window.clear()
            row = {"step": done, "loss": mean_loss, "meta_lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - started, 3)}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                if ctx.is_main:
                    row.update(_evaluate(cfg, model, params, loss_fn, sample, held_out, device))
                metrics.update(row)
            if log is not None:
                log.write(row)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            save(done)
        if stop:
            raise StopTraining

    try:
        result = meta_train(objective, params, sample_batch, steps=cfg.steps, meta_lr=cfg.meta_lr,
                            optimizer=optimizer, lr_schedule=cfg.lr_schedule, start_step=start_step,
                            on_step=on_step, after_backward=ctx.average_gradients, log_every=cfg.log_every,
                            desc=cfg.name, progress_bar=None if (cfg.progress and ctx.is_main) else False, check=False,
                            precision=cfg.precision)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if log is not None:
            log.close()
    return {"params": params, "step": result.steps, "metrics": metrics, "interrupted": interrupted["flag"]}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metatut-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="JSON configuration (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override configuration values")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        outcome = train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"metatut-train: configuration error: {e}", file=sys.stderr)
        return 2
    if outcome["interrupted"]:
        print(f"interrupted at step {outcome['step']}; resume with: --resume", file=sys.stderr)
        return 130
    summary = {k: v for k, v in outcome["metrics"].items() if k != "seconds"}
    if summary:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
