"""Checkpoints: parameters, optimiser state and configuration, written atomically, loaded safely."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .models import Params

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_save"]

FORMAT_VERSION = 1
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


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, params: Params, *, optimizer: torch.optim.Optimizer | None = None,
                    config: dict | None = None, step: int = 0, extra: dict | None = None) -> Path:
    """Save ``params`` (detached, on CPU), the optimiser's state, a plain-data ``config`` and ``step``.

    ``extra`` holds anything else needed to resume exactly (tensors such as RNG states, plain data).
    """
    config = dict(config or {})
    _check_config(config)
    extra = _to_cpu(dict(extra or {}))
    _check_config(extra, "extra", tensors=True)
    state = {
        "format_version": FORMAT_VERSION,
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": config,
        "step": int(step),
        "extra": extra,
        "torch_version": str(torch.__version__),
    }
    return atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, *, device=None, optimizer: torch.optim.Optimizer | None = None,
                    requires_grad: bool = True) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    Returns ``{'params', 'config', 'step', 'optimizer', 'extra'}``; ``params`` are leaf tensors on ``device``.
    When ``optimizer`` is given its state is restored (build it over the returned params first with
    ``load_checkpoint(path)['params']``, or pass one built over tensors of the same shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "params" not in state:
        raise ValueError(f"{path} is not a metatut checkpoint (format {FORMAT_VERSION})")
    params = {k: v.to(device).requires_grad_(requires_grad) for k, v in state["params"].items()}
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    return {"params": params, "config": state["config"], "step": state["step"], "optimizer": state["optimizer"],
            "extra": state.get("extra") or {}}
