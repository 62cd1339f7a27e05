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
* **No NaN checkpoints.** Training stops at the first step whose loss or meta-gradient is not finite; that step
  and any after it change nothing (a device-side flag guards each update, read only at the steps that log,
  save or stop: no host synchronisation in between, :func:`metatut.meta_train`), and it raises
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

``width`` left out (or null) means the task's default: the MAML paper's 40 hidden units per layer for the
sinusoid MLP (1-40-40-1), 64 conv4 filters for Omniglot; ``config.json`` and the checkpoints record the
resolved number. Algorithms that differentiate twice (maml, anil, metasgd) run on the CPU, with a warning,
on a device that cannot (:func:`metatut.accel.maml_device`). When the command joined a ``torchrun`` process
group itself, it leaves it (``destroy_process_group``) at the end of :func:`train`, also on an error.

The parts live in :mod:`metatut.run` (configuration, run folder, build, and the :class:`~metatut.run.Run`
object that :func:`train` drives); this module is the command line.

Exit codes of :func:`main`: 0 done, 2 configuration or resume error, 3 training diverged, 4 evaluation
failed (training saved), 130 interrupted with Ctrl-C (checkpoint saved).
"""
from __future__ import annotations

import argparse
import json
import sys

from . import budget
from .checkpoint import load_checkpoint
from .distributed import DistributedContext
from .fileio import atomic_write_text
from .run.build import check_split as _check_split
from .run.build import omniglot_split as _omniglot_split
from .run.config import (ALGORITHMS, RESUMABLE_CHANGES, TASKS, ConfigError, EvaluationError, TrainConfig,
                         TrainingDiverged, load_config)
from .run.folder import LOCK_NAME, RUN_FILES
from .run.session import Run
from .train import meta_train

__all__ = ["TrainConfig", "ConfigError", "TrainingDiverged", "EvaluationError", "load_config", "train", "main"]
# names kept for code that imports them from here (and for tests that replace meta_train or _omniglot_split)
_REEXPORTED = (ALGORITHMS, RESUMABLE_CHANGES, TASKS, LOCK_NAME, RUN_FILES, load_checkpoint, atomic_write_text,
               _check_split)


def _check_environment() -> None:
    """The ``METATUT_*`` settings (budget, fast, progress, device, data folder), as a ConfigError."""
    try:
        budget.check_environment()
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"environment: {e}") from None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          context: DistributedContext | None = None) -> dict:
    """Run (or resume) the training that ``cfg`` describes; returns ``{'params', 'step', 'metrics', 'interrupted'}``.

    ``resume=True`` continues the run in ``cfg.out_dir`` from its checkpoint; ``overwrite=True`` replaces the
    run there (its files are removed once the folder's lock is held); without either, a folder that holds a
    run is refused. ``stop_after=n`` ends the run cleanly after ``n`` iterations of this call, as Ctrl-C does
    (for tests). Raises :class:`ConfigError` before anything is written for a bad setting,
    :class:`TrainingDiverged` when the loss or the meta-gradient stops being finite (nothing non-finite is
    saved) and :class:`EvaluationError` when an evaluation fails (after the checkpoint of that step is saved).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cfg = load_config(None, ["steps=3", "meta_batch=2", "width=4", "eval_tasks=4", "progress=false",
        ...                              f"out_dir={folder}/run"])
        ...     outcome = train(cfg)
        >>> outcome["step"], sorted(outcome["metrics"])[:2]
        (3, ['eval_mse', 'eval_mse_ci95'])
    """
    _check_environment()
    cfg.validate()
    run = Run(cfg, resume=resume, overwrite=overwrite, stop_after=stop_after, trainer=meta_train,
              load_split=_omniglot_split)
    try:
        run.start(context)
        return run.execute()
    finally:
        run.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metatut-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="JSON configuration (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override configuration values")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in out_dir (its config.json, metrics.csv, checkpoint.pt and "
                             "TensorBoard events are removed once the folder is locked)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (see the module docstring).

    Example::

        >>> main(["--set", "steps=-1"])
        2
    """
    args = _parser().parse_args(argv)
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
