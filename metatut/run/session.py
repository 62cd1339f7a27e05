"""A training run as an object: :class:`Run` sets up (folder, lock, device, model, data, resume), runs the
loop through :func:`metatut.meta_train` with its hooks (checkpoint, metrics log, evaluation, the
synchronisation points of the non-finite stop, Ctrl-C), and cleans up (signal handler, log, lock, process group).

The order of the set-up is what the training command promises: every setting, the device and the folder
are checked, and the checkpoint of a resume is read and checked, before the first file is written.
"""
from __future__ import annotations

import inspect
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_checkpoint, save_checkpoint
from ..device import make_generator
from ..distributed import DistributedContext, init_distributed, stream_seed
from ..fileio import FileLock, atomic_write_text, remove_stale_temporaries
from ..tasks.base import TaskBatch
from ..train import StopTraining, meta_train
from .build import (
    Parts,
    build,
    check_speed_options,
    evaluate,
    execution_path,
    make_model,
    omniglot_split,
    select_device,
)
from .config import ConfigError, EvaluationError, TrainConfig, TrainingDiverged
from .folder import (MetricsLog, _check_folder, _check_out_dir, _check_resume_state, _checkpoint_params, _nonfinite,
                     _remove_previous_run, _take_lock, diverged)

__all__ = ["Run"]


class Run:
    """One training run of ``cfg`` (see :func:`metatut.cli.train`, which drives it).

    ``trainer`` is the meta-training loop (:func:`metatut.meta_train`) and ``load_split`` the Omniglot loader
    (:func:`metatut.run.build.omniglot_split`); the training command passes its own names so that tests can
    replace them. Use it as ``run.start(context)`` then ``run.execute()``, and ``run.close()`` in any case.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cfg = TrainConfig(steps=2, meta_batch=2, eval_tasks=2, width=4, progress=False, out_dir=folder)
        ...     run = Run(cfg)
        ...     try:
        ...         run.start()
        ...         outcome = run.execute()
        ...     finally:
        ...         run.close()
        ...     print(outcome["step"], sorted(p.name for p in Path(folder).iterdir() if p.suffix != ".lock"))
        2 ['checkpoint.pt', 'config.json', 'metrics.csv']
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 stop_after: int | None = None, trainer: Callable = meta_train,
                 load_split: Callable = omniglot_split) -> None:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in out_dir, "
                              "--overwrite replaces it")
        self.cfg = cfg.resolved()            # config.json and the checkpoints record the resolved width
        self.resume, self.overwrite, self.stop_after = resume, overwrite, stop_after
        self.trainer, self.load_split = trainer, load_split
        self.out_dir = Path(self.cfg.out_dir)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        _check_out_dir(self.out_dir)
        self.ctx = DistributedContext()
        self.owns_process_group = False
        self.lock: FileLock | None = None
        self.log: MetricsLog | None = None
        self.previous_handler = None
        self.interrupted = False
        self.metrics: dict = {}
        self.window: list[torch.Tensor] = []
        self.started = time.perf_counter()
        # index: 0-based index of the step running now; saved: the step of the checkpoint on disk
        self.iterations, self.index, self.saved = 0, 0, None
        self.planned: tuple[int, tuple[bool, bool, bool]] | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def start(self, context: DistributedContext | None = None) -> None:
        """Device, process group, model, data and the folder (locked, checked, resumed), then the run's files."""
        self.device = select_device(self.cfg)
        self._join(context)
        if self.resume and not self.checkpoint_path.is_file():
            raise ConfigError(f"--resume was given but there is no checkpoint at {self.checkpoint_path}")
        self._build()
        state, rows = self._claim_folder()
        if state is not None:
            self._restore(state)
        self._open_files(rows)
        self._catch_sigint()

    def _join(self, context: DistributedContext | None) -> None:
        """The distributed context (joined here when not given; then :meth:`close` leaves the group again)."""
        cfg = self.cfg
        if context is None:
            initialised_before = dist.is_available() and dist.is_initialized()
            context = init_distributed(self.device)
            self.owns_process_group = not initialised_before and dist.is_available() and dist.is_initialized()
        self.ctx = context
        if cfg.task_streams % self.ctx.world_size:  # before any data is loaded
            raise ConfigError(f"task_streams ({cfg.task_streams}) must be a multiple of the number of processes "
                              f"({self.ctx.world_size})")

    def _build(self) -> None:
        """Model (``compile``/``task_workers`` checked before any data is loaded), data, optimiser, streams."""
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.seed)
        model = make_model(cfg)
        check_speed_options(cfg, model, self.device)
        self.parts: Parts = build(cfg, self.device, model, self.load_split)
        self.params = self.parts.params
        self.optimizer = torch.optim.Adam(self.params.values(), lr=cfg.meta_lr)
        self.per_stream = cfg.meta_batch // cfg.task_streams
        self.streams_here = range(ctx.rank * cfg.task_streams // ctx.world_size,
                                  (ctx.rank + 1) * cfg.task_streams // ctx.world_size)
        self.generators = [make_generator(stream_seed(cfg.seed, s), self.device) for s in self.streams_here]

    def _claim_folder(self) -> tuple[dict | None, list[dict]]:
        """Lock and check ``out_dir``, read the checkpoint and metrics to resume; all before the first write.
        Every process must agree (the main one holds the lock and reads the metrics)."""
        error: ConfigError | None = None
        state, rows = None, []
        try:
            if self.ctx.is_main:
                self.lock = _take_lock(self.out_dir)
                _check_folder(self.out_dir, self.resume, self.overwrite)
            if self.resume:
                state = self._read_checkpoint()
                if self.ctx.is_main:
                    rows = MetricsLog.read(self.out_dir / "metrics.csv", state["step"])
        except ConfigError as e:
            error = e
        if not self.ctx.all_ok(error is None, self.device):
            raise error or ConfigError("the main process refused to start the run (see its error)")
        return state, rows

    def _read_checkpoint(self) -> dict:
        try:
            state = load_checkpoint(self.checkpoint_path, device=self.device)
        except Exception as e:  # CheckpointError and whatever torch.load raises for a damaged file
            raise ConfigError(f"cannot resume from {self.checkpoint_path}: {e}") from None
        _check_resume_state(self.cfg, state, self.checkpoint_path)
        state = _checkpoint_params(state, self.params, self.parts.model, self.checkpoint_path)
        return state

    def _restore(self, state: dict) -> None:
        """Parameters, optimiser, task streams, torch's RNG and the step of a checkpoint."""
        with torch.no_grad():
            for k in self.params:
                self.params[k].copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        stream_states = state["extra"]["stream_states"]
        for g, s in zip(self.generators, self.streams_here, strict=True):
            g.set_state(stream_states[s])
        torch.set_rng_state(state["extra"]["torch_rng"])
        self.index = self.saved = state["step"]

    def _open_files(self, rows: list[dict]) -> None:
        """The first writes: the previous run removed (``--overwrite``), temporaries, config.json, metrics."""
        if not self.ctx.is_main:
            return
        if self.overwrite:
            _remove_previous_run(self.out_dir)
        remove_stale_temporaries(self.out_dir)
        # execution_path: derived from the settings and the device (not a setting: resume compares the checkpoint's)
        recorded = {**self.cfg.to_dict(), "execution_path": execution_path(self.cfg, self.parts.model, self.device)}
        atomic_write_text(self.out_dir / "config.json", json.dumps(recorded, indent=2) + "\n")
        self.log = MetricsLog(self.out_dir, rows)

    def _catch_sigint(self) -> None:
        """Ctrl-C finishes the step (under torchrun: up to the next logging step, where the ranks agree on it) and
        saves a checkpoint; a second Ctrl-C stops at once."""
        if not (self.ctx.is_main and threading.current_thread() is threading.main_thread()):
            return

        def on_sigint(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            when = ("the next logging step (at most log_every steps)" if self.ctx.enabled else "this step")
            print(f"\nCtrl-C: finishing {when}, saving a checkpoint; --resume continues", file=sys.stderr)
        self.previous_handler = signal.signal(signal.SIGINT, on_sigint)

    # -------------------------------------------------------------------------------------------- loop
    def execute(self) -> dict:
        """Train from the current step to ``cfg.steps`` (or until stopped); returns ``{'params', 'step',
        'metrics', 'interrupted'}``. Raises :class:`TrainingDiverged` or :class:`EvaluationError`."""
        cfg, start_step = self.cfg, self.index
        self.started = time.perf_counter()
        # meta_train's sync-free non-finite stop: the flag is read at the steps that log, save or stop only
        # (agreed across processes there), so nothing non-finite is logged or saved
        accepted = _parameters(self.trainer)
        engine_check = {k: v for k, v in (("sync_every", self._sync_due), ("reduce_bad", self.ctx.minimum))
                        if k in accepted or "**" in accepted}
        try:
            result = self.trainer(
                self.parts.objective, self.params, self._sample_batch, steps=cfg.steps, meta_lr=cfg.meta_lr,
                optimizer=self.optimizer, lr_schedule=cfg.lr_schedule, start_step=start_step,
                on_step=self._on_step, after_backward=self.ctx.average_gradients, log_every=cfg.log_every,
                desc=cfg.name, progress_bar=None if (cfg.progress and self.ctx.is_main) else False, check=False,
                precision=cfg.precision, **engine_check)
        except FloatingPointError as err:
            raise self._diverged(err) from err
        if start_step == cfg.steps and not self.interrupted:
            # resumed at the final step (e.g. after a failed final evaluation): evaluate only
            row = {"step": cfg.steps, "meta_lr": self.optimizer.param_groups[0]["lr"]}
            self._evaluate_into(row, cfg.steps)
            if self.log is not None:
                self.log.write(row)
        return {"params": self.params, "step": result.steps, "metrics": self.metrics,
                "interrupted": self.interrupted}

    def _diverged(self, err: FloatingPointError) -> TrainingDiverged:
        step = getattr(err, "step", None)
        if step is None:
            step = self.index + 1
        elif not isinstance(err, TrainingDiverged):  # meta_train's own check counts from 0
            step += 1
        what = getattr(err, "what", None) or "loss"
        return diverged(self.cfg, step, what, self.saved, self.checkpoint_path)

    def _sample_batch(self, _generator) -> TaskBatch:
        """The global meta-batch's share of this process: ``per_stream`` tasks from each of its streams."""
        batches = [self.parts.sample(self.per_stream, g) for g in self.generators]
        if len(batches) == 1:
            return batches[0]
        return TaskBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                           ("support_x", "support_y", "query_x", "query_y")))

    def _plan(self, done: int) -> tuple[bool, bool, bool]:
        """``(stop, log, save)`` after the step that brings the count to ``done``, decided once per step (every
        rank agrees to stop at the same step)."""
        if self.planned is None or self.planned[0] != done:
            cfg = self.cfg
            stop = self.stop_after is not None and self.iterations + 1 >= self.stop_after   # the same on every rank
            if not self.ctx.enabled:
                stop = stop or self.interrupted
            elif done % cfg.log_every == 0 or done == cfg.steps:
                # Ctrl-C reaches the main process only: the ranks agree on it at the logging steps (the same on
                # every rank), with one all-reduce on the collective's device there, not a host sync per step
                asked = self.ctx.mean(torch.tensor(float(self.interrupted), device=self.device))
                stop = bool(asked.item() > 0) or stop
            log = done % cfg.log_every == 0 or done == cfg.steps or stop
            save = done % cfg.checkpoint_every == 0 or done == cfg.steps or stop or (log and done % cfg.eval_every == 0)
            self.planned = (done, (stop, log, save))
        return self.planned[1]

    def _sync_due(self, done: int) -> bool:
        """meta_train's synchronisation points: the steps that log, save (and evaluate) or stop."""
        return any(self._plan(done))

    def _on_step(self, step: int, loss: torch.Tensor) -> None:
        """After each optimiser step: log, checkpoint (before evaluating), evaluate, stop when asked."""
        cfg, done = self.cfg, step + 1
        stop, log, save = self._plan(done)
        self.index = done
        self.iterations += 1
        self.window.append(loss)
        row = None
        if log:
            mean_loss = self.ctx.mean(torch.stack(self.window).mean()).item()
            self.window.clear()
            row = {"step": done, "loss": mean_loss, "meta_lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - self.started, 3)}
        evaluate_now = row is not None and (done % cfg.eval_every == 0 or done == cfg.steps)
        if save:
            self.save(done)  # before evaluating: a failing evaluation loses no training
        if evaluate_now:
            self._evaluate_into(row, done)
        if row is not None and self.log is not None:
            self.log.write(row)
        if stop:
            raise StopTraining

    def save(self, step_done: int) -> None:
        """Write the checkpoint of step ``step_done`` (every rank's stream state; refuses non-finite values)."""
        bad = _nonfinite(self.params)  # second line of defence: never write non-finite parameters
        if bad:
            raise TrainingDiverged(f"refusing to save non-finite parameters {bad} at step {step_done}",
                                   step=step_done, what="parameters")
        states = [g.get_state() for g in self.generators]
        ctx = self.ctx
        if ctx.enabled:  # every rank's stream state goes into the one checkpoint
            gathered = [ctx.gather(s) for s in states]
            states = [gathered[i][r] for r in range(ctx.world_size) for i in range(len(states))]
        if ctx.is_main:
            save_checkpoint(self.checkpoint_path, self.params, optimizer=self.optimizer, config=self.cfg.to_dict(),
                            step=step_done, extra={"stream_states": states, "torch_rng": torch.get_rng_state()})
        self.saved = step_done

    def _evaluate_into(self, row: dict, done: int) -> None:
        """Evaluate (main process) after the checkpoint of step ``done`` is saved."""
        failure = None
        if self.ctx.is_main:
            try:
                row.update(evaluate(self.cfg, self.parts, self.device))
            except Exception as e:  # noqa: BLE001 - reported with the settings, training is safe
                failure = e
        if not self.ctx.all_ok(failure is None, self.device):
            if self.log is not None:
                self.log.write(row)  # the training part of the row
            raise self._evaluation_error(failure, done) from failure
        self.metrics.update(row)

    def _evaluation_error(self, failure: Exception | None, done: int) -> EvaluationError:
        cfg = self.cfg
        settings = f"eval_inner_steps={cfg.eval_inner_steps}, inner_lr={cfg.inner_lr}, eval_tasks={cfg.eval_tasks}"
        if cfg.task == "omniglot":
            settings += f", n_way={cfg.n_way}, shots={cfg.shots}, query={cfg.query}"
        hint = ""
        if failure is not None and ("NaN" in str(failure) or "infinit" in str(failure)):
            hint = f" (the adapted model overflowed: lower eval_inner_steps, now {cfg.eval_inner_steps})"
        return EvaluationError(
            f"the evaluation at step {done} failed: {failure or 'on the main process'}{hint}; evaluation "
            f"settings: {settings}. Training up to step {done} is saved in {self.checkpoint_path} and "
            f"{self.out_dir / 'metrics.csv'}; change eval_inner_steps or eval_tasks (they may change on "
            "--resume) and run again with --resume to evaluate", step=done)

    # ------------------------------------------------------------------------------------------ clean-up
    def close(self) -> None:
        """Restore the Ctrl-C handler, close the log, release the lock, and leave the process group when
        this run joined it (whether it ended well or not). Safe to call more than once."""
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
            self.previous_handler = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.owns_process_group:
            self.owns_process_group = False
            if dist.is_initialized():
                dist.destroy_process_group()


def _parameters(function) -> set[str]:
    """The names of ``function``'s parameters, and ``'**'`` when it takes any keyword."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters} | {"**" for p in parameters if p.kind is p.VAR_KEYWORD}
