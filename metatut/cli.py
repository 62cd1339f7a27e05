"""The training command: ``python -m metatut.cli CONFIG.json`` (or the ``metatut-train`` console script).

A run writes to ``out_dir``: ``config.json``, ``metrics.csv`` (and TensorBoard events when the
``tensorboard`` package is present), and ``checkpoint.pt`` every ``checkpoint_every`` steps, before every
evaluation and on Ctrl-C. ``--resume`` continues a run exactly: parameters, optimiser, RNG streams and step
are restored, so an interrupted and resumed run ends with the same parameters as an uninterrupted one.

Guarantees under faults:

* **Checked before anything is written.** Every configuration value (types, ranges, the Omniglot splits'
  class counts against ``n_way`` and their images per class against ``shots + query``, ``compile`` and
  ``task_workers`` against the model), the ``METATUT_*`` environment settings, the device and ``out_dir``
  itself (a folder, writable) are checked before any file is written; a bad one is a :class:`ConfigError`
  (exit code 2) naming the setting and the allowed values. Booleans given with ``--set`` take JSON
  ``true``/``false`` or the strings ``"true"``/``"false"`` in any case, nothing else.
* **One run per folder.** A run holds an exclusive lock on ``out_dir/.metatut-run.lock`` for its lifetime
  (only the main process of a distributed run); a second run on the same folder is refused. A lock left by a
  run that was killed is reported on stderr and taken over. A new run refuses a folder that already holds a
  run (``config.json``, ``metrics.csv`` or ``checkpoint.pt``) unless ``--resume`` continues it or
  ``--overwrite`` replaces it (its files are removed once the lock is held). Temporaries that a killed
  writer left in ``out_dir`` are removed when a run starts. Every file is written atomically
  (:mod:`metatut.fileio`); ``metrics.csv`` is appended to, and rewritten atomically when a resume truncates it.
* **No NaN checkpoints.** Training stops at the first step whose loss or meta-gradient is not finite, before
  the optimiser applies it (one host synchronisation per step checks this), and raises
  :class:`TrainingDiverged` (exit code 3); the last checkpoint, written before, stays as it was, and
  :func:`train` refuses to save non-finite parameters at all. ``--resume`` refuses a checkpoint that holds
  non-finite parameters or optimiser state.
* **Save, then evaluate.** The checkpoint is written before each evaluation, so a failing evaluation
  (:class:`EvaluationError`, exit code 4) loses no training: change the evaluation settings
  (``eval_inner_steps``, ``eval_tasks``, which may change on resume) and ``--resume``; a resume at the final
  step runs just the final evaluation.
* **Resume checks.** Only the settings in ``RESUMABLE_CHANGES`` may differ on ``--resume``; ``steps`` may not
  change under ``lr_schedule='cosine'`` (the schedule is defined over ``steps``, so the learning rate would
  jump). A damaged checkpoint or a damaged ``metrics.csv`` row is a :class:`ConfigError` naming the file
  (and line) before anything is written.

Exit codes of :func:`main`: 0 done, 2 configuration or resume error, 3 training diverged, 4 evaluation
failed (training saved), 130 interrupted with Ctrl-C (checkpoint saved).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import budget
from . import functional as fn
from .accel import compile_objective
from .checkpoint import load_checkpoint, save_checkpoint
from .device import make_generator, pick_device
from .distributed import DistributedContext, init_distributed, stream_seed
from .evaluate import adapted_accuracy, evaluate_adaptation, summarize
from .fileio import FileLock, LockTimeout, atomic_write_text, remove_stale_temporaries
from .models import init_params, mlp
from .tasks.base import TaskBatch
from .tasks.regression import SinusoidTasks
from .train import StopTraining, meta_train

__all__ = ["TrainConfig", "ConfigError", "TrainingDiverged", "EvaluationError", "load_config", "train", "main"]

TASKS = ("sinusoid", "omniglot")
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet")
# Settings that may change between an interrupted run and its resumption (steps: not with lr_schedule='cosine').
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "checkpoint_every", "device", "out_dir", "progress",
                     "compile", "task_workers", "eval_inner_steps", "eval_tasks"}
BOOL_FIELDS = ("progress", "compile")
# Upper bounds of the integer settings (lower bounds are in TrainConfig.validate).
INT_LIMITS = {"steps": 10_000_000, "meta_batch": 100_000, "task_streams": 100_000, "shots": 100_000,
              "query": 100_000, "width": 4096, "log_every": 10_000_000, "eval_every": 10_000_000,
              "checkpoint_every": 10_000_000, "task_workers": 256, "eval_tasks": 100_000, "inner_steps": 10_000,
              "eval_inner_steps": 10_000, "seed": 2**40, "n_way": 10_000}
# Classes per split (train with its rotations, validation, test) of the Omniglot sets the command trains on;
# load_omniglot checks the character counts, and _build checks these again on the loaded data.
OMNIGLOT_SPLIT_CLASSES = {"full": {"train": 4400, "validation": 100, "test": 423},
                          "small": {"train": 584, "validation": 48, "test": 48}}
IMAGES_PER_CLASS = 20
LOCK_NAME = ".metatut-run.lock"
RUN_FILES = ("config.json", "metrics.csv", "checkpoint.pt")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (or the run folder cannot be used)."""


class TrainingDiverged(FloatingPointError):
    """The loss or the meta-gradient became NaN or infinite at ``step`` (1-based); nothing non-finite was
    saved. ``what`` is ``'loss'``, ``'gradient'`` or ``'parameters'``."""

    def __init__(self, message: str, *, step: int | None = None, what: str = "loss") -> None:
        super().__init__(message)
        self.step, self.what = step, what


class EvaluationError(RuntimeError):
    """An evaluation failed after the training up to ``step`` was saved."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


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

        def boolean(name):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"{name} must be true or false (got {v!r}); with --set, {name} must be one of "
                                  'true, false (JSON) or the strings "true", "false" in any case')

        def integer(name, minimum):
            v = getattr(self, name)
            maximum = INT_LIMITS[name]
            if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
                raise ConfigError(f"{name} must be an int >= {minimum} and <= {maximum} (got {v!r})")

        def number(name, low, high=math.inf, low_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
            ok = ok and (v > low if low_open else v >= low)
            if not ok:
                bracket = "(" if low_open else "["
                raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}] (got {v!r})")

        def text(name, v, what):
            if not isinstance(v, str) or not v.strip() or "\0" in v:
                raise ConfigError(f"{name} must be {what} (got {v!r})")

        text("name", self.name, "a non-empty string")
        text("out_dir", self.out_dir, "a non-empty folder path (a string; e.g. \"runs/my_run\")")
        if self.data_root is not None:
            text("data_root", self.data_root, "a folder path (a non-empty string) or null for the default")
        one_of("task", TASKS)
        one_of("algorithm", ALGORITHMS)
        one_of("lr_schedule", ("constant", "cosine"))
        one_of("dataset", ("full", "small"))
        one_of("precision", ("float32", "bfloat16"))
        for name in BOOL_FIELDS:
            boolean(name)
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
        if self.task == "omniglot":
            if self.shots + self.query > IMAGES_PER_CLASS:
                raise ConfigError(f"shots + query must be <= {IMAGES_PER_CLASS} (Omniglot has {IMAGES_PER_CLASS} "
                                  f"drawings per character; got {self.shots} + {self.query})")
            _check_classes(self, OMNIGLOT_SPLIT_CLASSES[self.dataset])
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_classes(cfg: TrainConfig, classes: dict[str, int]) -> None:
    """``n_way`` must fit every split (train, validation, test): episodes draw ``n_way`` distinct classes."""
    smallest = min(classes, key=classes.get)
    if cfg.n_way > classes[smallest]:
        sizes = ", ".join(f"{k} {v}" for k, v in classes.items())
        raise ConfigError(f"n_way={cfg.n_way} is more than the {classes[smallest]} classes of the {smallest} split "
                          f"of Omniglot dataset={cfg.dataset!r} (classes per split: {sizes}); "
                          f"n_way must be in [2, {classes[smallest]}]")


def _override_value(key: str, raw: str):
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if key in BOOL_FIELDS and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON configuration (unknown keys are an error), apply ``key=value`` overrides, validate.

    An override's value is read as JSON, else taken as a string; for the boolean settings (``progress``,
    ``compile``) the strings ``true``/``false`` in any case count as booleans and anything else is refused.
    """
    values: dict = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no configuration file at {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the configuration file {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a JSON object")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"overrides must look like key=value (got {item!r})")
        values[key] = _override_value(key, raw)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown}; allowed: {sorted(known)}")
    return TrainConfig(**values).validate()


# ------------------------------------------------------------------------------------- environment
def _check_environment() -> None:
    """The ``METATUT_*`` settings (budget, fast, progress, device, data folder), as a ConfigError."""
    check = getattr(budget, "check_environment", None)
    try:
        if check is not None:
            check()
            return
        budget.profile()  # METATUT_BUDGET
        setting = (os.environ.get("METATUT_PROGRESS") or "").strip().lower()
        flags = ("1", "true", "yes", "on", "0", "false", "no", "off")
        if setting and setting not in flags:
            raise ValueError(f"METATUT_PROGRESS must be one of {flags} or unset "
                             f"(got {os.environ['METATUT_PROGRESS']!r})")
        data = (os.environ.get("METATUT_DATA") or "").strip()
        if data and Path(data).expanduser().exists() and not Path(data).expanduser().is_dir():
            raise ValueError(f"METATUT_DATA={data!r} is a file; it must be a folder (created if missing)")
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"environment: {e}") from None


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` must be a folder, or creatable as one, and writable; nothing is created here."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {str(out_dir)!r} is a file, not a folder; choose another out_dir")
    ancestor = out_dir
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ConfigError(f"out_dir {str(out_dir)!r} cannot be created: {ancestor} is a file; choose another out_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        where = "is" if ancestor == out_dir else f"would be created in {ancestor}, which is"
        raise ConfigError(f"out_dir {str(out_dir)!r} {where} not writable; choose another out_dir")


# ----------------------------------------------------------------------------------------- pieces
def _omniglot_split(cfg: TrainConfig):
    """The full set with the MAML split, or the small offline sets with the split that notebooks 05/06 and
    the pretrained checkpoints use (``fraction_split(seed=0)``)."""
    from .data import SMALL_ZIPS, fraction_split, load_omniglot, maml_split, offline_omniglot_dir
    if cfg.dataset == "full":
        return maml_split(load_omniglot("full", root=cfg.data_root, download=True))
    root = cfg.data_root or offline_omniglot_dir(SMALL_ZIPS)
    return fraction_split(load_omniglot("small", root=root, download=root is None), seed=0)


def _model(cfg: TrainConfig):
    if cfg.task == "sinusoid":
        return mlp(hidden=(cfg.width, cfg.width), seed=cfg.seed)
    from .conv import conv4
    return conv4(None if cfg.algorithm == "protonet" else cfg.n_way, hidden=cfg.width, seed=cfg.seed)


FIRST_ORDER = ("fomaml", "reptile", "protonet")


def _no_objective(*args, **kwargs):  # pragma: no cover - never called
    raise AssertionError


def _check_speed_options(cfg: TrainConfig, model) -> None:
    """``compile`` and ``task_workers`` against the model, before any data is loaded."""
    if cfg.compile and not fn.prefers_vmap(model) and cfg.algorithm not in FIRST_ORDER:
        try:  # raises before compiling anything for this combination; its message names the reason
            compile_objective(_no_objective, enabled=True, vectorized=False, first_order=False)
            reason = "compile=True needs the vmap path or first-order MAML"
        except ValueError as e:
            reason = str(e)
        raise ConfigError(f"compile: {reason} (task={cfg.task!r} runs the per-task loop, algorithm={cfg.algorithm!r} "
                          f"is second order); set compile=false or use one of {FIRST_ORDER}")
    if (cfg.task_workers > 1 and cfg.algorithm in ("maml", "fomaml", "anil", "metasgd")
            and any(True for _ in model.buffers())):
        raise ConfigError(f"task_workers={cfg.task_workers} needs a model without buffers (batch-norm running "
                          "statistics would be updated in a thread's copy only); set task_workers=1")


def _check_split(cfg: TrainConfig, split) -> None:
    classes = {"train": len(split.train.images), "validation": len(split.val.images), "test": len(split.test.images)}
    _check_classes(cfg, classes)
    per_class = min(int(s.images.shape[1]) for s in (split.train, split.val, split.test))
    if cfg.shots + cfg.query > per_class:
        raise ConfigError(f"shots + query must be <= {per_class} (the images per class of this Omniglot data; "
                          f"got {cfg.shots} + {cfg.query})")


def _build(cfg: TrainConfig, device: torch.device, model):
    """Objective, loss function and a sampler of ``n`` tasks from one stream, for ``model`` on ``device``."""
    model = model.to(device)
    if cfg.task == "sinusoid":
        loss_fn = F.mse_loss
        tasks = SinusoidTasks()

        def sample(n, generator):
            return tasks.sample(n, cfg.shots, cfg.query, generator=generator)
        held_out = None
    else:
        from .tasks.episodes import sample_episodes
        try:
            split = _omniglot_split(cfg)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"Omniglot data (dataset={cfg.dataset!r}, data_root={cfg.data_root!r}): {e}") from None
        _check_split(cfg, split)
        images = split.train.images.to(device)
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
                                      first_order=cfg.algorithm in FIRST_ORDER)
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
    """``metrics.csv`` (and TensorBoard when available): rows are appended; on resume the file is first
    rewritten atomically, truncated to ``start_step``."""

    FIELDS = ["step", "loss", "meta_lr", "seconds", "eval_mse", "eval_mse_ci95", "eval_accuracy", "eval_accuracy_ci95"]

    @classmethod
    def read(cls, path: Path, start_step: int) -> list[dict]:
        """The rows of ``path`` up to ``start_step``; a ConfigError naming the file and line for a damaged one."""
        if not path.exists():
            return []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path} to resume: {e}; move it away and resume again") from None
        lines = text.splitlines()
        if not lines:
            return []
        header = next(csv.reader([lines[0]]), [])
        if header != cls.FIELDS:
            raise ConfigError(f"{path} line 1: the header is {lines[0]!r}, expected {','.join(cls.FIELDS)!r}; "
                              "fix or move that file and resume again")
        rows = []
        for number, line in enumerate(lines[1:], start=2):
            values = next(csv.reader([line]), [])
            problem = None
            if len(values) != len(cls.FIELDS):
                problem = f"{len(values)} fields instead of {len(cls.FIELDS)}"
            else:
                row = dict(zip(cls.FIELDS, values, strict=True))
                try:
                    step = int(row["step"])
                    for k in cls.FIELDS[1:]:
                        if row[k] != "":
                            float(row[k])
                    if step < 1 or (rows and step <= int(rows[-1]["step"])):
                        problem = f"step {step} is not after the previous row's"
                except ValueError:
                    problem = "a value is not a number"
            if problem:
                raise ConfigError(f"{path} line {number}: {line[:80]!r} is not a metrics row ({problem}); "
                                  "fix or delete that line and resume again")
            if step <= start_step:
                rows.append(row)
        return rows

    def __init__(self, out_dir: Path, rows: list[dict]) -> None:
        self.path = out_dir / "metrics.csv"
        self.rows_written = [dict(r) for r in rows]
        atomic_write_text(self.path, self._format(self.rows_written, header=True))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tensorboard = None

    def _format(self, rows: list[dict], header: bool = False) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.FIELDS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in self.FIELDS} for row in rows)
        return buffer.getvalue()

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in self.FIELDS}
        if self.rows_written and str(self.rows_written[-1]["step"]) == str(row["step"]):
            # the same step again (a resume that only evaluates): replace that row, atomically
            self.rows_written[-1] = {**self.rows_written[-1], **{k: v for k, v in row.items() if v != ""}}
            atomic_write_text(self.path, self._format(self.rows_written, header=True))
        else:
            self.rows_written.append(row)
            with self.path.open("a", newline="", encoding="utf-8") as f:
                f.write(self._format([row]))
                f.flush()
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.tensorboard.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------------------------- out_dir
def _take_lock(out_dir: Path) -> FileLock:
    """The exclusive lock on ``out_dir`` for this run's lifetime; reports a crashed previous holder."""
    lock = FileLock(out_dir / LOCK_NAME, timeout=0, purpose=f"metatut-train run in {out_dir}")
    try:
        lock.acquire()
    except (LockTimeout, RuntimeError) as e:  # RuntimeError: held by this very process (another train call)
        holder = lock.holder() or {}
        raise ConfigError(f"out_dir {str(out_dir)!r} is in use by another run (pid {holder.get('pid', '?')}): "
                          f"{e}; wait for it to end, or choose another out_dir") from None
    except OSError as e:
        raise ConfigError(f"out_dir {str(out_dir)!r} cannot be locked: {e}") from None
    stale = lock.stale_holder
    if stale:
        print(f"metatut-train: a previous run (pid {stale.get('pid', '?')}) ended without releasing "
              f"{lock.path}; continuing", file=sys.stderr)
    return lock


def _check_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """What ``out_dir`` holds must fit the request (run under the lock)."""
    checkpoint_path = out_dir / "checkpoint.pt"
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume and not checkpoint_path.is_file():
        raise ConfigError(f"--resume was given but there is no checkpoint at {checkpoint_path}")
    if present and not resume and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(present)}): pass --resume to continue that "
                          "run, --overwrite to replace it, or choose another out_dir")


def _remove_previous_run(out_dir: Path) -> None:
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    events = out_dir / "tensorboard"
    if events.is_dir() and not events.is_symlink():
        shutil.rmtree(events)


def _nonfinite(tensors: dict) -> list[str]:
    return [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def _check_resume_state(cfg: TrainConfig, state: dict, checkpoint_path: Path) -> None:
    old = state["config"]
    current = cfg.to_dict()
    differing = {k for k, v in old.items() if current.get(k) != v}
    changed = differing - RESUMABLE_CHANGES
    if changed:
        raise ConfigError(f"cannot resume with different settings for {sorted(changed)}")
    if "steps" in differing and cfg.lr_schedule == "cosine":
        raise ConfigError(f"steps cannot change on --resume with lr_schedule='cosine' (the schedule is defined "
                          f"over steps={old['steps']}); the learning rate would jump back up. Resume with "
                          f"steps={old['steps']}, or start a new run (--overwrite or another out_dir)")
    if state["step"] > cfg.steps:
        raise ConfigError(f"steps={cfg.steps} is below the step of the checkpoint {checkpoint_path} "
                          f"({state['step']}); resume with steps >= {state['step']}")
    bad = _nonfinite(state["params"])
    optimizer_state = (state.get("optimizer") or {}).get("state", {})
    bad_moments = sorted({str(i) for i, s in optimizer_state.items() for k in _nonfinite(s)})
    if bad or bad_moments:
        what = f"parameters {bad}" if bad else f"optimiser state (of parameters {bad_moments})"
        raise ConfigError(f"the checkpoint {checkpoint_path} (step {state['step']}) holds non-finite {what}: it "
                          "comes from a run that diverged. Start again with --overwrite and a lower inner_lr, "
                          "meta_lr or inner_steps, or resume from an earlier copy of the checkpoint")


# ------------------------------------------------------------------------------------------- run
def _diverged(cfg: TrainConfig, step: int, what: str, saved: int | None, checkpoint_path: Path) -> TrainingDiverged:
    quantity = {"loss": "the loss", "gradient": "the meta-gradient"}.get(what, f"the {what}")
    kept = (f"the last finite checkpoint is kept at {checkpoint_path} (step {saved})" if saved is not None else
            f"no checkpoint was written (the first was due at step {min(cfg.checkpoint_every, cfg.steps)})")
    return TrainingDiverged(
        f"training diverged at step {step}: {quantity} became non-finite (NaN or infinity); lower inner_lr "
        f"(now {cfg.inner_lr}), meta_lr (now {cfg.meta_lr}) or inner_steps (now {cfg.inner_steps}); {kept}. "
        "These settings cannot change on --resume: start again with --overwrite (or another out_dir)",
        step=step, what=what)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          context: DistributedContext | None = None) -> dict:
    """Run (or resume) the training that ``cfg`` describes; returns ``{'params', 'step', 'metrics'}``.

    ``resume=True`` continues the run in ``cfg.out_dir`` from its checkpoint; ``overwrite=True`` replaces the
    run there (its files are removed once the folder's lock is held); without either, a folder that holds a
    run is refused. ``stop_after=n`` ends the run cleanly after ``n`` iterations of this call, as Ctrl-C does
    (for tests). Raises :class:`ConfigError` before anything is written for a bad setting,
    :class:`TrainingDiverged` when the loss or the meta-gradient stops being finite (nothing non-finite is
    saved) and :class:`EvaluationError` when an evaluation fails (after the checkpoint of that step is saved).
    """
    _check_environment()
    cfg.validate()
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in out_dir, "
                          "--overwrite replaces it")
    out_dir = Path(cfg.out_dir)
    _check_out_dir(out_dir)
    try:
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"device: {e}") from None
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    ctx = context or init_distributed(device)
    if cfg.task_streams % ctx.world_size:
        raise ConfigError(f"task_streams ({cfg.task_streams}) must be a multiple of the number of processes "
                          f"({ctx.world_size})")
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        raise ConfigError(f"--resume was given but there is no checkpoint at {checkpoint_path}")

    torch.manual_seed(cfg.seed)
    model = _model(cfg)
    _check_speed_options(cfg, model)
    model, params, objective, loss_fn, sample, held_out = _build(cfg, device, model)
    optimizer = torch.optim.Adam(params.values(), lr=cfg.meta_lr)
    per_stream = cfg.meta_batch // cfg.task_streams
    streams_here = range(ctx.rank * cfg.task_streams // ctx.world_size,
                         (ctx.rank + 1) * cfg.task_streams // ctx.world_size)
    generators = [make_generator(stream_seed(cfg.seed, s), device) for s in streams_here]

    lock: FileLock | None = None
    log: _MetricsLog | None = None
    previous_handler = None
    try:
        # ---- the folder: locked, checked, the checkpoint read; all before the first write
        error: ConfigError | None = None
        state = None
        rows: list[dict] = []
        try:
            if ctx.is_main:
                lock = _take_lock(out_dir)
                _check_folder(out_dir, resume, overwrite)
            if resume:
                try:
                    state = load_checkpoint(checkpoint_path, device=device)
                except Exception as e:  # CheckpointError and whatever torch.load raises for a damaged file
                    raise ConfigError(f"cannot resume from {checkpoint_path}: {e}") from None
                _check_resume_state(cfg, state, checkpoint_path)
                if ctx.is_main:
                    rows = _MetricsLog.read(out_dir / "metrics.csv", state["step"])
        except ConfigError as e:
            error = e
        if not ctx.all_ok(error is None, device):
            raise error or ConfigError("the main process refused to start the run (see its error)")
        start_step = 0
        if state is not None:
            with torch.no_grad():
                for k in params:
                    params[k].copy_(state["params"][k])
            optimizer.load_state_dict(state["optimizer"])
            stream_states = state["extra"]["stream_states"]
            for g, s in zip(generators, streams_here, strict=True):
                g.set_state(stream_states[s])
            torch.set_rng_state(state["extra"]["torch_rng"])
            start_step = state["step"]

        if ctx.is_main:
            if overwrite:
                _remove_previous_run(out_dir)
            remove_stale_temporaries(out_dir)
            atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            log = _MetricsLog(out_dir, rows)

        def sample_batch(_generator) -> TaskBatch:
            batches = [sample(per_stream, g) for g in generators]
            if len(batches) == 1:
                return batches[0]
            return TaskBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                               ("support_x", "support_y", "query_x", "query_y")))

        interrupted = {"flag": False}
        if ctx.is_main and _in_main_thread():
            def on_sigint(signum, frame):
                interrupted["flag"] = True
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
                print("\nCtrl-C: finishing this step, saving a checkpoint; --resume continues", file=sys.stderr)
            previous_handler = signal.signal(signal.SIGINT, on_sigint)

        window: list[torch.Tensor] = []
        started = time.perf_counter()
        metrics: dict = {}
        # index: 0-based index of the step running now; saved: the step of the checkpoint on disk
        track = {"iterations": 0, "index": start_step, "saved": start_step if state is not None else None,
                 "loss": None}

        def save(step_done: int) -> None:
            bad = _nonfinite(params)  # second line of defence: never write non-finite parameters
            if bad:
                raise TrainingDiverged(f"refusing to save non-finite parameters {bad} at step {step_done}",
                                       step=step_done, what="parameters")
            states = [g.get_state() for g in generators]
            if ctx.enabled:  # every rank's stream state goes into the one checkpoint
                gathered = [ctx.gather(s) for s in states]
                states = [gathered[i][r] for r in range(ctx.world_size) for i in range(len(states))]
            if ctx.is_main:
                save_checkpoint(checkpoint_path, params, optimizer=optimizer, config=cfg.to_dict(), step=step_done,
                                extra={"stream_states": states, "torch_rng": torch.get_rng_state()})
            track["saved"] = step_done

        def evaluate_into(row: dict, done: int) -> None:
            """Evaluate (main process) after the checkpoint of step ``done`` is saved."""
            failure = None
            if ctx.is_main:
                try:
                    row.update(_evaluate(cfg, model, params, loss_fn, sample, held_out, device))
                except Exception as e:  # noqa: BLE001 - reported with the settings, training is safe
                    failure = e
            if not ctx.all_ok(failure is None, device):
                if log is not None:
                    log.write(row)  # the training part of the row
                settings = f"eval_inner_steps={cfg.eval_inner_steps}, inner_lr={cfg.inner_lr}, eval_tasks={cfg.eval_tasks}"
                if cfg.task == "omniglot":
                    settings += f", n_way={cfg.n_way}, shots={cfg.shots}, query={cfg.query}"
                hint = ""
                if failure is not None and ("NaN" in str(failure) or "infinit" in str(failure)):
                    hint = (f" (the adapted model overflowed: lower eval_inner_steps, now {cfg.eval_inner_steps})")
                raise EvaluationError(
                    f"the evaluation at step {done} failed: {failure or 'on the main process'}{hint}; evaluation "
                    f"settings: {settings}. Training up to step {done} is saved in {checkpoint_path} and "
                    f"{out_dir / 'metrics.csv'}; change eval_inner_steps or eval_tasks (they may change on "
                    "--resume) and run again with --resume to evaluate", step=done) from failure
            metrics.update(row)

        def watched(p, batch, **kwargs):
            loss = objective(p, batch, **kwargs)
            track["loss"] = loss
            return loss
        watched.uses_step = bool(getattr(objective, "uses_step", False))

        def after_backward(p) -> None:
            """All-reduce the gradients, then stop before the optimiser step if the loss or a gradient is not
            finite. This costs one host synchronisation per step (``bool`` of one small tensor)."""
            ctx.average_gradients(p)
            loss, track["loss"] = track["loss"], None
            # the largest magnitude of each gradient (a norm could overflow for large finite values)
            values = [g.detach().abs().amax().float() for g in (t.grad for t in p.values())
                      if g is not None and g.numel()]
            if loss is not None:
                values.append(loss.detach().float().abs().amax())
            finite = torch.isfinite(torch.stack(values)).all() if values else torch.tensor(True)
            if not ctx.all_ok(finite, device):
                what = "loss" if loss is not None and not bool(torch.isfinite(loss.detach()).all()) else "gradient"
                raise TrainingDiverged(f"the {what} became non-finite", step=track["index"] + 1, what=what)

        def on_step(step: int, loss: torch.Tensor) -> None:
            done = step + 1
            track["index"] = done
            track["iterations"] += 1
            window.append(loss)
            stop = interrupted["flag"] or (stop_after is not None and track["iterations"] >= stop_after)
            if ctx.enabled:  # every rank must agree to stop at the same step
                stop = bool(ctx.mean(torch.tensor(float(stop))).item() > 0)
            row = None
            if done % cfg.log_every == 0 or done == cfg.steps or stop:
                mean_loss = ctx.mean(torch.stack(window).mean()).item()
                window.clear()
                row = {"step": done, "loss": mean_loss, "meta_lr": optimizer.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - started, 3)}
            evaluate_now = row is not None and (done % cfg.eval_every == 0 or done == cfg.steps)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop or evaluate_now:
                save(done)  # before evaluating: a failing evaluation loses no training
            if evaluate_now:
                evaluate_into(row, done)
            if row is not None and log is not None:
                log.write(row)
            if stop:
                raise StopTraining

        # after_backward checks every step (agreeing across processes); meta_train's own check would be a
        # second host synchronisation per step
        engine_check = {"stop_on_nonfinite": False} if "stop_on_nonfinite" in _parameters(meta_train) else {}
        try:
            result = meta_train(watched, params, sample_batch, steps=cfg.steps, meta_lr=cfg.meta_lr,
                                optimizer=optimizer, lr_schedule=cfg.lr_schedule, start_step=start_step,
                                on_step=on_step, after_backward=after_backward, log_every=cfg.log_every,
                                desc=cfg.name, progress_bar=None if (cfg.progress and ctx.is_main) else False,
                                check=False, precision=cfg.precision, **engine_check)
        except FloatingPointError as err:
            step = getattr(err, "step", None)
            if step is None:
                step = track["index"] + 1
            elif not isinstance(err, TrainingDiverged):  # meta_train's own check counts from 0
                step += 1
            what = getattr(err, "what", None) or "loss"
            raise _diverged(cfg, step, what, track["saved"], checkpoint_path) from err
        if start_step == cfg.steps and not interrupted["flag"]:
            # resumed at the final step (e.g. after a failed final evaluation): evaluate only
            row = {"step": cfg.steps, "meta_lr": optimizer.param_groups[0]["lr"]}
            evaluate_into(row, cfg.steps)
            if log is not None:
                log.write(row)
        return {"params": params, "step": result.steps, "metrics": metrics, "interrupted": interrupted["flag"]}
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()


def _parameters(function) -> set[str]:
    import inspect
    return set(inspect.signature(function).parameters)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="metatut-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="JSON configuration (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override configuration values")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in out_dir (its config.json, metrics.csv, checkpoint.pt and "
                             "TensorBoard events are removed once the folder is locked)")
    args = parser.parse_args(argv)
    try:
        _check_environment()
        cfg = load_config(args.config, args.set)
        outcome = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"metatut-train: configuration error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"metatut-train: {e}", file=sys.stderr)
        return 3
    except EvaluationError as e:
        print(f"metatut-train: {e}", file=sys.stderr)
        return 4
    if outcome["interrupted"]:
        print(f"interrupted at step {outcome['step']}; resume with: --resume", file=sys.stderr)
        return 130
    summary = {k: v for k, v in outcome["metrics"].items() if k != "seconds"}
    if summary:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
