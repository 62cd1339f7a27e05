"""The budget profiles: how much compute a notebook, an exercise or a test run spends.

Three profiles:

* ``ci``     - seconds to a few minutes on 2 CPU cores; chosen by ``METATUT_FAST=1``
  (the test command sets it).
* ``laptop`` - the default on a CPU: minutes.
* ``gpu``    - paper scale; chosen automatically when CUDA is available.

``METATUT_BUDGET=ci|laptop|gpu`` overrides the automatic choice. Notebooks never hard-code two
versions of a cell: they call :func:`pick` with the three values. :func:`quiet` silences progress bars
in the ``ci`` profile (``METATUT_PROGRESS`` decides when set).

This module needs torch only (no course extra); :mod:`metatut.budget` re-exports it, so ``mt.pick``,
``mt.profile`` and ``metatut.budget.quiet`` keep working, and :mod:`metatut.progress` reads
:func:`quiet` from here.
"""
from __future__ import annotations

from typing import TypeVar

import torch

from ..budget import _setting, env_flag

__all__ = ["PROFILES", "profile", "pick", "quiet"]

#: The budget profiles, from the smallest to the largest.
PROFILES = ("ci", "laptop", "gpu")
T = TypeVar("T")


def _budget() -> str | None:
    value = _setting("METATUT_BUDGET")
    if value is None:
        return None
    if value.lower() not in PROFILES:
        raise ValueError(f"METATUT_BUDGET must be one of {PROFILES} (case-insensitive), or unset to choose "
                         f"automatically (got {value!r})")
    return value.lower()


def profile() -> str:
    """The active budget profile: ``'ci'``, ``'laptop'`` or ``'gpu'``.

    ``METATUT_BUDGET`` if set, else ``ci`` under ``METATUT_FAST=1``, else ``gpu`` with CUDA, else ``laptop``.
    A value outside the allowed ones (see :mod:`metatut.budget`) raises :class:`ValueError`.

    Example::

        >>> import os
        >>> saved = os.environ.get("METATUT_BUDGET")
        >>> os.environ["METATUT_BUDGET"] = "Laptop"
        >>> profile()
        'laptop'
        >>> _ = os.environ.pop("METATUT_BUDGET") if saved is None else os.environ.update(METATUT_BUDGET=saved)
    """
    forced = _budget()
    fast = env_flag("METATUT_FAST")      # checked even when METATUT_BUDGET decides
    if forced:
        return forced
    if fast:
        return "ci"
    if torch.cuda.is_available():
        return "gpu"
    return "laptop"


def pick(*, ci: T, laptop: T, gpu: T | None = None) -> T:
    """Return the value for the active profile (``gpu`` defaults to ``laptop``).

    Example::

        >>> steps = pick(ci=200, laptop=5_000, gpu=70_000)
        >>> steps == {"ci": 200, "laptop": 5_000, "gpu": 70_000}[profile()]
        True
    """
    active = profile()
    if active == "ci":
        return ci
    if active == "gpu" and gpu is not None:
        return gpu
    return laptop


def quiet() -> bool:
    """True when progress bars should stay silent (CI profile, or ``METATUT_PROGRESS=0``).

    ``METATUT_PROGRESS`` takes the yes/no values of :func:`metatut.budget.env_flag`; another value raises
    ValueError.

    Example::

        >>> import os
        >>> saved = os.environ.get("METATUT_PROGRESS")
        >>> os.environ["METATUT_PROGRESS"] = "off"
        >>> quiet()
        True
        >>> _ = os.environ.pop("METATUT_PROGRESS") if saved is None else os.environ.update(METATUT_PROGRESS=saved)
    """
    setting = env_flag("METATUT_PROGRESS")
    if setting is not None:
        return not setting
    return profile() == "ci"
