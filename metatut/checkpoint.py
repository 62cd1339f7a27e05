"""Checkpoints: parameters, optimiser state and configuration, written atomically, loaded safely.

Parameters are stored as their flat dict: a :class:`metatut.MetaParams` (model parameters, learned step sizes
``inner_lr:<name>``, per-step copies ``per_step:<k>:<name>``) is stored flat and loaded back as a
:class:`~metatut.MetaParams`. Checkpoints of format 1 (earlier metatut) load unchanged: their Meta-SGD step sizes
carry the legacy keys ``inner_lr.<name>``, which every function that takes ``params`` still reads, and which
``metatut.MetaParams.from_flat(params, model=model)`` turns into the structured form (the training command does
so when it resumes such a run).

Writing goes through :func:`metatut.fileio.atomic_save` (exclusive temporary file, fsync, rename), and
:func:`save_checkpoint` first deletes the temporaries that a writer killed between the fsync and the
rename left next to the checkpoint. Loading uses ``torch.load(weights_only=True)`` and turns every way a
file can be damaged or foreign into one error class, :class:`CheckpointError`, that names the file, what is
wrong and what to do.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch

from .fileio import atomic_save, remove_stale_temporaries
from .models import Params

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_save", "CheckpointError", "UnsafeCheckpointError"]

_WHAT_TO_DO = "delete it and start a fresh run, or resume from a copy"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, empty, not a torch file, not a metatut checkpoint,
    or holding entries of the wrong kind. The message names the file, what is wrong and what to do.

    Example::

        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "ckpt.pt"
        >>> _ = bad.write_bytes(b"")
        >>> try:
        ...     load_checkpoint(bad)
        ... except CheckpointError as err:
        ...     print(type(err).__name__, "ckpt.pt is empty" in str(err))
        CheckpointError True
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that holds objects other than tensors and plain data, refused by
    ``torch.load(weights_only=True)`` (loading it fully could run arbitrary code).

    Example::

        >>> import argparse, pickle, tempfile, pathlib
        >>> foreign = pathlib.Path(tempfile.mkdtemp()) / "foreign.pt"
        >>> torch.save({"config": argparse.Namespace(lr=0.1)}, foreign)   # an object, not plain data
        >>> try:
        ...     load_checkpoint(foreign)
        ... except pickle.UnpicklingError as err:                          # also a CheckpointError
        ...     print(type(err).__name__, "could run arbitrary code" in str(err))
        UnsafeCheckpointError True
    """


def _fail(path: Path, what: str, kind: type[CheckpointError] = CheckpointError, todo: str = _WHAT_TO_DO
          ) -> CheckpointError:
    shown = f"{path} (a symlink to {os.path.realpath(path)})" if path.is_symlink() else str(path)
    return kind(f"checkpoint {shown} {what}; {todo}")

#: The format written: 2 added ``meta_params`` (whether ``params`` was a :class:`metatut.MetaParams`).
FORMAT_VERSION = 2
#: The formats read (1: before :class:`metatut.MetaParams`; its parameters load as they were saved).
READABLE_FORMATS = (1, 2)
_PLAIN = (str, int, float, bool, type(None))


def _check_config(value, where: str = "config", tensors: bool = False) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings (got {k!r})")
            _check_config(v, f"{where}[{k!r}]", tensors)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_config(v, f"{where}[{i}]", tensors)
    elif tensors and isinstance(value, torch.Tensor):
        return
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} must hold only str, int, float, bool, None, lists and dicts "
                        f"(got {type(value).__name__}), so that it loads with weights_only=True")


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_cpu(v) for v in value]
    return value


def save_checkpoint(path: str | os.PathLike, params: Params, *, optimizer: torch.optim.Optimizer | None = None,
                    config: dict | None = None, step: int = 0, extra: dict | None = None) -> Path:
    """Save ``params`` (detached, on CPU), the optimiser's state, a plain-data ``config`` and ``step``.

    ``params`` is a dict of tensors or a :class:`metatut.MetaParams` (stored as its flat dict, and loaded back
    as a :class:`~metatut.MetaParams` by :func:`load_checkpoint`).

    ``extra`` holds anything else needed to resume exactly (tensors such as RNG states, plain data).
    The file is replaced atomically (a reader, or a run killed at any instant, sees the old checkpoint or
    the new one); temporaries of earlier writers of ``path`` that were killed before renaming are deleted.
    ``config`` and ``extra`` must load with ``weights_only=True``: :class:`TypeError` otherwise. Returns
    ``path`` as a :class:`~pathlib.Path`.

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "step10.pt"
        >>> params = {"w": torch.zeros(2, 3, requires_grad=True), "b": torch.zeros(3, requires_grad=True)}
        >>> optimizer = torch.optim.Adam(params.values(), lr=1e-3)
        >>> save_checkpoint(path, params, optimizer=optimizer, config={"inner_lr": 0.01}, step=10,
        ...                 extra={"rng": torch.get_rng_state()}).name
        'step10.pt'
        >>> save_checkpoint(path, params, config={"model": object()})
        Traceback (most recent call last):
            ...
        TypeError: config['model'] must hold only str, int, float, bool, None, lists and dicts (got object), ...
    """
    from .engine.conventions import MetaParams

    config = dict(config or {})
    _check_config(config)
    if not isinstance(params, dict) or any(not isinstance(k, str) or not isinstance(v, torch.Tensor)
                                           for k, v in params.items()):
        raise TypeError("params must be a dict of name -> tensor (or a metatut.MetaParams)")
    extra = _to_cpu(dict(extra or {}))
    _check_config(extra, "extra", tensors=True)
    state = {
        "format_version": FORMAT_VERSION,
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "meta_params": isinstance(params, MetaParams),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": config,
        "step": int(step),
        "extra": extra,
        "torch_version": str(torch.__version__),
    }
    path = Path(path)
    remove_stale_temporaries(path.parent)
    return atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, *, device=None, optimizer: torch.optim.Optimizer | None = None,
                    requires_grad: bool = True) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    Returns ``{'params', 'config', 'step', 'optimizer', 'extra'}``; ``params`` are leaf tensors on ``device``,
    in a :class:`metatut.MetaParams` when one was saved, else in a dict keyed as saved (a format-1 checkpoint's
    legacy ``inner_lr.<name>`` keys too: ``metatut.MetaParams.from_flat(params, model=model)`` converts them).
    When ``optimizer`` is given its state is restored (build it over the returned params first with
    ``load_checkpoint(path)['params']``, or pass one built over tensors of the same shapes).

    Raises :class:`FileNotFoundError` if there is no file at ``path``, :class:`UnsafeCheckpointError` (a
    :class:`CheckpointError` and a :class:`pickle.UnpicklingError`) if it holds objects that are not
    tensors or plain data, and :class:`CheckpointError` for anything else wrong with it (a folder, an
    empty or truncated file, random bytes, another program's file, missing or mistyped entries, optimiser
    state that does not fit ``optimizer``).

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "step10.pt"
        >>> params = {"w": torch.zeros(2, 3, requires_grad=True)}
        >>> _ = save_checkpoint(path, params, optimizer=torch.optim.Adam(params.values()),
        ...                     config={"inner_lr": 0.01}, step=10)
        >>> state = load_checkpoint(path)
        >>> state["step"], state["config"], state["params"]["w"].shape, state["params"]["w"].requires_grad
        (10, {'inner_lr': 0.01}, torch.Size([2, 3]), True)

    Resuming: build the optimiser over the loaded parameters, then restore its state into it::

        >>> params = load_checkpoint(path)["params"]
        >>> optimizer = torch.optim.Adam(params.values())
        >>> _ = load_checkpoint(path, optimizer=optimizer)   # keep training ``params`` with ``optimizer``
        >>> load_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "missing.pt")
        Traceback (most recent call last):
            ...
        FileNotFoundError: no checkpoint at .../missing.pt
    """
    path = Path(path)
    if not path.exists():
        broken = f" (a broken symlink to {os.readlink(path)})" if path.is_symlink() else ""
        raise FileNotFoundError(f"no checkpoint at {path}{broken}")
    if path.is_dir():
        raise _fail(path, "is a folder, not a checkpoint file (pass the path of the .pt file in it)")
    if not path.is_file():
        raise _fail(path, "is not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise _fail(path, f"cannot be read ({err.strerror or err})",
                    todo=f"fix its permissions, or {_WHAT_TO_DO}") from err
    if size == 0:
        raise _fail(path, "is empty (0 bytes): the run that wrote it was killed or the disk was full")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        after = message.split("WeightsUnpickler error:", 1)[-1]
        detail = next((line.strip() for line in after.splitlines()
                       if line.strip() and "Weights only load failed" not in line), "")
        if "global" in detail.lower() or "Unsupported class" in detail:
            raise _fail(path, "holds objects other than tensors and plain data, which "
                        f"torch.load(weights_only=True) refuses to unpickle ({detail[:300]}): loading it fully "
                        "could run arbitrary code", UnsafeCheckpointError,
                        todo=f"do not load it unless you wrote it yourself; {_WHAT_TO_DO}") from err
        raise _fail(path, "is truncated or not a torch checkpoint (torch.load(weights_only=True) cannot read it: "
                    f"{detail[:200] or type(err).__name__})") from err
    except Exception as err:  # EOFError, OSError, RuntimeError (bad zip), KeyError, IndexError, ...: damaged bytes
        reason = str(err).split(". ")[0][:200] or "no details"
        raise _fail(path, f"is truncated or not a torch checkpoint ({type(err).__name__}: {reason})") from err
    _check_state(path, state, requires_grad)
    params = {k: v.to(device).requires_grad_(requires_grad) for k, v in state["params"].items()}
    if state.get("meta_params"):
        from .engine.conventions import MetaParams

        try:
            params = MetaParams.from_flat(params)
        except ValueError as err:
            raise _fail(path, f"has meta-parameters whose keys cannot be read ({err})") from err
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state (it was saved without optimizer=); load it "
                                  "without optimizer= and start the optimizer afresh, or resume from a checkpoint "
                                  "that has one")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise CheckpointError(f"the optimizer state in checkpoint {path} does not fit this optimizer "
                                  f"({type(err).__name__}: {err}); build the optimizer over "
                                  "load_checkpoint(path)['params'] with the settings the run used") from err
    return {"params": params, "config": state["config"], "step": state["step"], "optimizer": state["optimizer"],
            "extra": state.get("extra") or {}}


def _check_state(path: Path, state, requires_grad: bool) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has the entries :func:`save_checkpoint` writes."""
    if not isinstance(state, dict) or "format_version" not in state:
        raise _fail(path, f"is not a metatut checkpoint (format {FORMAT_VERSION}): it holds "
                    + (f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict)
                       else f"a {type(state).__name__}"))
    if state["format_version"] not in READABLE_FORMATS:
        raise CheckpointError(f"checkpoint {path} is not a metatut checkpoint (format {FORMAT_VERSION}): it has "
                              f"format_version {state['format_version']!r}; load it with the metatut version that "
                              f"wrote it, or {_WHAT_TO_DO}")
    missing = [k for k in ("params", "config", "step", "optimizer") if k not in state]
    if missing:
        raise _fail(path, f"is not a metatut checkpoint (format {FORMAT_VERSION}): it lacks "
                    f"{', '.join(repr(k) for k in missing)} (it was edited or written by another program)")
    params = state["params"]
    if not isinstance(params, dict):
        raise _fail(path, f"has 'params' of the wrong kind (a {type(params).__name__}; expected a dict of "
                    "name -> tensor)")
    bad = [str(k) for k, v in params.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise _fail(path, f"has 'params' entries that are not named tensors: {bad[:5]}")
    wrong = [k for k, v in params.items() if not (v.is_floating_point() or v.is_complex())]
    if wrong and requires_grad:
        raise _fail(path, f"has 'params' that are not floating-point tensors, so they cannot require grad: "
                    f"{wrong[:5]}")
    checks = (("config", dict, False), ("optimizer", dict, True), ("extra", dict, True))
    for key, kind, nullable in checks:
        value = state.get(key)
        if not (isinstance(value, kind) or (nullable and value is None)):
            raise _fail(path, f"has {key!r} of the wrong kind (a {type(value).__name__}; expected a dict"
                        + (" or None)" if nullable else ")"))
    if not isinstance(state.get("meta_params", False), bool):
        raise _fail(path, f"has 'meta_params' {state['meta_params']!r}; expected True or False")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _fail(path, f"has 'step' {step!r}; expected an int >= 0")
