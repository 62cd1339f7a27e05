"""One place that decides how much compute a notebook or script spends.

Three profiles:

* ``ci``     - seconds to a few minutes on 2 CPU cores; chosen by ``METATUT_FAST=1``
  (the test command sets it).
* ``laptop`` - the default on a CPU: minutes.
* ``gpu``    - paper scale; chosen automatically when CUDA is available.

``METATUT_BUDGET=ci|laptop|gpu`` overrides the automatic choice. Notebooks never hard-code two
versions of a cell: they call :func:`pick` with the three values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["PROFILES", "profile", "pick", "data_dir", "quiet"]

PROFILES = ("ci", "laptop", "gpu")
T = TypeVar("T")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def profile() -> str:
    """The active budget profile: ``'ci'``, ``'laptop'`` or ``'gpu'``."""
    forced = os.environ.get("METATUT_BUDGET", "").strip().lower()
    if forced:
        if forced not in PROFILES:
            raise ValueError(f"METATUT_BUDGET must be one of {PROFILES} (got {forced!r})")
        return forced
    if _truthy(os.environ.get("METATUT_FAST")):
        return "ci"
    if torch.cuda.is_available():
        return "gpu"
    return "laptop"


def pick(*, ci: T, laptop: T, gpu: T | None = None) -> T:
    """Return the value for the active profile (``gpu`` defaults to ``laptop``)."""
    active = profile()
    if active == "ci":
        return ci
    if active == "gpu" and gpu is not None:
        return gpu
    return laptop


def data_dir(create: bool = True) -> Path:
    """Folder for datasets, caches and downloads: ``METATUT_DATA`` or ``<repo>/data``."""
    env = os.environ.get("METATUT_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "data"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def quiet() -> bool:
    """True when progress bars should stay silent (CI profile, or ``METATUT_PROGRESS=0``)."""
    setting = os.environ.get("METATUT_PROGRESS")
    if setting is not None and setting.strip() != "":
        return not _truthy(setting)
    return profile() == "ci"
