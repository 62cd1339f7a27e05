"""The training command's configuration: :class:`TrainConfig`, its checks, and :func:`load_config`.

Every value is checked here, before anything is read from disk or written (types, ranges, the Omniglot
splits' class counts against ``n_way`` and their images per class against ``shots + query``); a bad one is
a :class:`ConfigError` naming the setting and the allowed values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TrainConfig", "ConfigError", "TrainingDiverged", "EvaluationError", "load_config", "default_width",
           "TASKS", "ALGORITHMS", "SECOND_ORDER", "FIRST_ORDER", "RESUMABLE_CHANGES", "DEFAULT_WIDTH",
           "DERIVED_KEYS"]

TASKS = ("sinusoid", "omniglot")
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet")
#: Algorithms that differentiate through the inner loop (second order): they need double backward.
SECOND_ORDER = ("maml", "anil", "metasgd")
FIRST_ORDER = ("fomaml", "reptile", "protonet")
#: Algorithms that adapt with gradient steps (the MAML engine's options).
MAML_FAMILY = ("maml", "fomaml", "anil", "metasgd")
#: ``width`` when not given: the MAML paper's sinusoid MLP is 1-40-40-1, its Omniglot conv4 has 64 filters.
DEFAULT_WIDTH = {"sinusoid": 40, "omniglot": 64}
# Settings that may change between an interrupted run and its resumption (steps: not with lr_schedule='cosine').
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "checkpoint_every", "device", "out_dir", "progress",
                     "compile", "task_workers", "eval_inner_steps", "eval_tasks"}
BOOL_FIELDS = ("progress", "compile")
# Upper bounds of the integer settings (lower bounds are in _check_ranges).
INT_LIMITS = {"steps": 10_000_000, "meta_batch": 100_000, "task_streams": 100_000, "shots": 100_000,
              "query": 100_000, "width": 4096, "log_every": 10_000_000, "eval_every": 10_000_000,
              "checkpoint_every": 10_000_000, "task_workers": 256, "eval_tasks": 100_000, "inner_steps": 10_000,
              "eval_inner_steps": 10_000, "seed": 2**40, "n_way": 10_000}
# Classes per split (train with its rotations, validation, test) of the Omniglot sets the command trains on;
# load_omniglot checks the character counts, and the run checks these again on the loaded data.
OMNIGLOT_SPLIT_CLASSES = {"full": {"train": 4400, "validation": 100, "test": 423},
                          "small": {"train": 584, "validation": 48, "test": 48}}
IMAGES_PER_CLASS = 20
#: Keys of a configuration file that start with this are comments (JSON has none): they are ignored.
COMMENT_PREFIX = "//"
#: Keys a run adds to its ``config.json`` that are derived, not settings (e.g. ``execution_path``, the vmap-or-loop
#: choice on the run's device): a configuration file may hold them (a run's config.json), they are ignored.
DERIVED_KEYS = ("execution_path",)


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


def default_width(task: str) -> int:
    """The ``width`` a task gets when the configuration leaves it out (or sets it to null).

    Example::

        >>> default_width("sinusoid"), default_width("omniglot")
        (40, 64)
    """
    return DEFAULT_WIDTH[task]


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in ``config.json`` and in each checkpoint.

    Example::

        >>> cfg = TrainConfig(steps=10).validate()
        >>> cfg.width is None, cfg.resolved().width, TrainConfig(task="omniglot").resolved().width
        (True, 40, 64)
    """

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
    # hidden units per layer (sinusoid MLP 1-w-w-1) or conv4 filters (omniglot); None: the task's default,
    # sinusoid 40 (Finn et al. 2017: 1-40-40-1), omniglot 64; config.json records the resolved number
    width: int | None = None
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
        """Check every value (a :class:`ConfigError` for the first bad one); returns ``self``.

        Example::

            >>> try:
            ...     TrainConfig(meta_batch=10, task_streams=3).validate()
            ... except ConfigError as err:
            ...     print(err)
            meta_batch (10) must be a multiple of task_streams (3)
        """
        _check_text(self)
        _check_choices(self)
        _check_ranges(self)
        _check_task(self)
        return self

    def resolved(self) -> "TrainConfig":
        """A copy with the defaults that depend on the task filled in (``width``).

        Example::

            >>> TrainConfig(task="omniglot", width=32).resolved().width
            32
        """
        if self.width is not None:
            return dataclasses.replace(self)
        return dataclasses.replace(self, width=default_width(self.task))

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (what ``config.json`` holds).

        Example::

            >>> TrainConfig().to_dict()["algorithm"]
            'maml'
        """
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ checks
def _check_text(cfg: TrainConfig) -> None:
    def text(name, v, what):
        if not isinstance(v, str) or not v.strip() or "\0" in v:
            raise ConfigError(f"{name} must be {what} (got {v!r})")

    text("name", cfg.name, "a non-empty string")
    text("out_dir", cfg.out_dir, "a non-empty folder path (a string; e.g. \"runs/my_run\")")
    if cfg.data_root is not None:
        text("data_root", cfg.data_root, "a folder path (a non-empty string) or null for the default")


def _check_choices(cfg: TrainConfig) -> None:
    def one_of(name, allowed):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} must be one of {allowed} (got {getattr(cfg, name)!r})")

    one_of("task", TASKS)
    one_of("algorithm", ALGORITHMS)
    one_of("lr_schedule", ("constant", "cosine"))
    one_of("dataset", ("full", "small"))
    one_of("precision", ("float32", "bfloat16"))
    for name in BOOL_FIELDS:
        v = getattr(cfg, name)
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false (got {v!r}); with --set, {name} must be one of "
                              'true, false (JSON) or the strings "true", "false" in any case')
    if cfg.device is not None:
        one_of("device", ("cpu", "cuda", "mps"))


def _integer(cfg: TrainConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    maximum = INT_LIMITS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
        extra = " or null for the task's default (sinusoid 40, omniglot 64)" if name == "width" else ""
        raise ConfigError(f"{name} must be an int >= {minimum} and <= {maximum}{extra} (got {v!r})")


def _number(cfg: TrainConfig, name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
    ok = ok and (v > low if low_open else v >= low)
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}] (got {v!r})")


def _check_ranges(cfg: TrainConfig) -> None:
    for name in ("steps", "meta_batch", "task_streams", "shots", "query", "log_every", "eval_every",
                 "checkpoint_every", "task_workers"):
        _integer(cfg, name, 1)
    if cfg.width is not None:
        _integer(cfg, "width", 1)
    _integer(cfg, "eval_tasks", 2)
    _integer(cfg, "inner_steps", 0 if cfg.algorithm in MAML_FAMILY else 1)
    _integer(cfg, "eval_inner_steps", 0)
    _integer(cfg, "seed", 0)
    _integer(cfg, "n_way", 2)
    _number(cfg, "meta_lr", 0, 1, low_open=True)
    _number(cfg, "inner_lr", 0, 10)
    if cfg.meta_batch % cfg.task_streams:
        raise ConfigError(f"meta_batch ({cfg.meta_batch}) must be a multiple of task_streams ({cfg.task_streams})")


def _check_task(cfg: TrainConfig) -> None:
    if cfg.task == "sinusoid" and cfg.algorithm == "protonet":
        raise ConfigError("algorithm 'protonet' needs a classification task (task: omniglot)")
    if cfg.task == "omniglot":
        if cfg.shots + cfg.query > IMAGES_PER_CLASS:
            raise ConfigError(f"shots + query must be <= {IMAGES_PER_CLASS} (Omniglot has {IMAGES_PER_CLASS} "
                              f"drawings per character; got {cfg.shots} + {cfg.query})")
        check_classes(cfg, OMNIGLOT_SPLIT_CLASSES[cfg.dataset])


def check_classes(cfg: TrainConfig, classes: dict[str, int]) -> None:
    """``n_way`` must fit every split (train, validation, test): episodes draw ``n_way`` distinct classes.

    Example::

        >>> check_classes(TrainConfig(n_way=5), {"train": 100, "validation": 10, "test": 10})
        >>> try:
        ...     check_classes(TrainConfig(n_way=20), {"train": 100, "validation": 10, "test": 30})
        ... except ConfigError as err:
        ...     print(str(err)[:54])
        n_way=20 is more than the 10 classes of the validation
    """
    smallest = min(classes, key=classes.get)
    if cfg.n_way > classes[smallest]:
        sizes = ", ".join(f"{k} {v}" for k, v in classes.items())
        raise ConfigError(f"n_way={cfg.n_way} is more than the {classes[smallest]} classes of the {smallest} split "
                          f"of Omniglot dataset={cfg.dataset!r} (classes per split: {sizes}); "
                          f"n_way must be in [2, {classes[smallest]}]")


# -------------------------------------------------------------------------------------- loading
def _override_value(key: str, raw: str):
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if key in BOOL_FIELDS and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return value


def _read_file(path: str | os.PathLike) -> dict:
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
    return {k: v for k, v in values.items() if not k.startswith(COMMENT_PREFIX) and k not in DERIVED_KEYS}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON configuration (unknown keys are an error), apply ``key=value`` overrides, validate.

    An override's value is read as JSON, else taken as a string; for the boolean settings (``progress``,
    ``compile``) the strings ``true``/``false`` in any case count as booleans and anything else is refused.
    Keys of the file that start with ``//`` are comments.

    Example::

        >>> cfg = load_config(None, ["steps=10", "algorithm=fomaml", "progress=False"])
        >>> cfg.steps, cfg.algorithm, cfg.progress
        (10, 'fomaml', False)
        >>> try:
        ...     load_config(None, ["stpes=10"])
        ... except ConfigError as err:
        ...     print(str(err)[:40])
        unknown configuration keys ['stpes']; al
    """
    values: dict = {} if path is None else _read_file(path)
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
