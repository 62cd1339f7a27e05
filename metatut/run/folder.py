"""The run folder (``out_dir``): its checks, its lock, the metrics log, and the checks of a resumed state.

A run holds an exclusive lock on ``out_dir/.metatut-run.lock`` for its lifetime; a new run refuses a
folder that already holds a run unless it resumes or overwrites it; ``metrics.csv`` is appended to, and
rewritten atomically when a resume truncates it.
"""
from __future__ import annotations

import csv
import io
import shutil
import sys
import os
from pathlib import Path

import torch

from ..fileio import FileLock, LockTimeout, atomic_write_text
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, TrainingDiverged

__all__ = ["LOCK_NAME", "RUN_FILES", "MetricsLog", "diverged"]

LOCK_NAME = ".metatut-run.lock"
RUN_FILES = ("config.json", "metrics.csv", "checkpoint.pt")


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


def _tensorboard(out_dir: Path):
    """A TensorBoard ``SummaryWriter`` for ``out_dir/tensorboard`` when the package is installed, else None."""
    import importlib.util
    try:
        if importlib.util.find_spec("tensorboard") is None:   # the optional ``tensorboard`` extra
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out_dir / "tensorboard"))
    except Exception:  # tensorboard is optional
        return None


class MetricsLog:
    """``metrics.csv`` (and TensorBoard when available): rows are appended; on resume the file is first
    rewritten atomically, truncated to ``start_step``.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     log = MetricsLog(Path(folder), [])
        ...     log.write({"step": 1, "loss": 0.5})
        ...     log.close()
        ...     print([row["loss"] for row in MetricsLog.read(Path(folder) / "metrics.csv", start_step=1)])
        ['0.5']
    """

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
        self.tensorboard = _tensorboard(out_dir)

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


def _checkpoint_params(state: dict, params: dict, model: torch.nn.Module, checkpoint_path: Path) -> dict:
    """``state`` with its parameters keyed as this run's ``params`` (same keys, same order: the optimiser's state
    is by position). A checkpoint of an earlier metatut holds Meta-SGD's step sizes under the legacy keys
    ``inner_lr.<name>``: they are read with the model's own names (:meth:`metatut.MetaParams.from_flat`)."""
    from ..engine.conventions import MetaParams

    saved = state["params"]
    if list(saved) != list(params):
        try:
            migrated = MetaParams.from_flat(saved, model=model)
        except ValueError:
            migrated = saved
        saved = migrated if list(migrated) == list(params) else saved
    if list(saved) != list(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ConfigError(f"the checkpoint {checkpoint_path} does not hold this run's meta-parameters "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]}"
                          + ("" if missing or unexpected else ", or in another order") + "): it was written for "
                          "another model or algorithm. Resume with the settings that wrote it, or start a new run "
                          "(--overwrite or another out_dir)")
    return {**state, "params": saved}


def _check_resume_state(cfg: TrainConfig, state: dict, checkpoint_path: Path) -> None:
    old = state["config"]
    current = cfg.to_dict()
    differing = {k for k, v in old.items() if current.get(k) != v}
    changed = differing - RESUMABLE_CHANGES
    if changed:
        hint = ""
        if "width" in changed:
            hint = (f" (width: the run used {old.get('width')}, this configuration means {current.get('width')}; "
                    "a width left out means the task's default, sinusoid 40 and omniglot 64: give "
                    f"width={old.get('width')} to resume)")
        raise ConfigError(f"cannot resume with different settings for {sorted(changed)}{hint}")
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


def diverged(cfg: TrainConfig, step: int, what: str, saved: int | None, checkpoint_path: Path) -> TrainingDiverged:
    """The :class:`TrainingDiverged` error for step ``step``, saying what became non-finite, which checkpoint is
    kept, and which settings to lower.

    Example::

        >>> err = diverged(TrainConfig(), 7, "gradient", 5, Path("runs/run/checkpoint.pt"))
        >>> str(err).split(";")[0]
        'training diverged at step 7: the meta-gradient became non-finite (NaN or infinity)'
    """
    quantity = {"loss": "the loss", "gradient": "the meta-gradient"}.get(what, f"the {what}")
    kept = (f"the last finite checkpoint is kept at {checkpoint_path} (step {saved})" if saved is not None else
            f"no checkpoint was written (the first was due at step {min(cfg.checkpoint_every, cfg.steps)})")
    return TrainingDiverged(
        f"training diverged at step {step}: {quantity} became non-finite (NaN or infinity); lower inner_lr "
        f"(now {cfg.inner_lr}), meta_lr (now {cfg.meta_lr}) or inner_steps (now {cfg.inner_steps}); {kept}. "
        "These settings cannot change on --resume: start again with --overwrite (or another out_dir)",
        step=step, what=what)
