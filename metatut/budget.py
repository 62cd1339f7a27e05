"""One place that decides how much compute a notebook or script spends, and checks the environment.

Three profiles:

* ``ci``     - seconds to a few minutes on 2 CPU cores; chosen by ``METATUT_FAST=1``
  (the test command sets it).
* ``laptop`` - the default on a CPU: minutes.
* ``gpu``    - paper scale; chosen automatically when CUDA is available.

``METATUT_BUDGET=ci|laptop|gpu`` overrides the automatic choice. Notebooks never hard-code two
versions of a cell: they call :func:`pick` with the three values.

The settings metatut reads from the environment (an empty value counts as unset):

============================  =====================================================================
``METATUT_BUDGET``            ``ci``, ``laptop`` or ``gpu`` (case-insensitive)
``METATUT_FAST``              yes/no: ``1 0 true false yes no on off`` (case-insensitive)
``METATUT_PROGRESS``          yes/no, as ``METATUT_FAST``
``METATUT_DEVICE``            ``cpu``, ``cuda``, ``mps``, optionally with an index (``cuda:1``)
``METATUT_DATA``              a folder (created if missing) for datasets, caches and downloads
============================  =====================================================================

A value outside these raises :class:`ValueError` naming the variable and the allowed values, never a
silent fallback; :func:`check_environment` checks them all at once (a command calls it before it writes
anything).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["PROFILES", "FLAG_VALUES", "profile", "pick", "data_dir", "quiet", "env_flag", "check_environment"]

PROFILES = ("ci", "laptop", "gpu")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
#: The values a yes/no setting (``METATUT_FAST``, ``METATUT_PROGRESS``) accepts, case-insensitive.
FLAG_VALUES = _TRUE + _FALSE
T = TypeVar("T")


def _setting(name: str) -> str | None:
    """The stripped value of environment variable ``name``; None when unset or empty."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def env_flag(name: str) -> bool | None:
    """A yes/no environment setting: True, False, or None when unset or empty.

    Accepts ``1``/``true``/``yes``/``on`` and ``0``/``false``/``no``/``off`` (case-insensitive); anything
    else raises :class:`ValueError` naming the variable and the allowed values.

    Example::

        >>> import os
        >>> os.environ["METATUT_EXAMPLE_FLAG"] = "Off"
        >>> env_flag("METATUT_EXAMPLE_FLAG")
        False
        >>> os.environ["METATUT_EXAMPLE_FLAG"] = "maybe"
        >>> try:
        ...     env_flag("METATUT_EXAMPLE_FLAG")
        ... except ValueError as err:
        ...     print(str(err)[:55])
        METATUT_EXAMPLE_FLAG='maybe' is not a yes/no value: use
        >>> del os.environ["METATUT_EXAMPLE_FLAG"]
    """
    value = _setting(name)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no value: use one of {', '.join(FLAG_VALUES)} "
                     "(case-insensitive), or unset it")


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
    A value outside the allowed ones (see the module docstring) raises :class:`ValueError`.
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
    """Return the value for the active profile (``gpu`` defaults to ``laptop``)."""
    active = profile()
    if active == "ci":
        return ci
    if active == "gpu" and gpu is not None:
        return gpu
    return laptop


def _data_problem(path: Path, writable: bool = True) -> str | None:
    """Why ``path`` cannot serve as METATUT_DATA (without creating anything), or None. ``writable``: also
    require that it can be written (or created)."""
    shown = f"METATUT_DATA={str(path)!r}"
    if path.exists() and not path.is_dir():
        return f"{shown} is a file; it must be a folder (created if missing)"
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        return f"{shown} lies under the file {ancestor}; it must be a folder (created if missing)"
    if writable and ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is" if ancestor == path else f"would be created in {ancestor}, which is"
        return (f"{shown} {what} not writable; metatut writes downloads, extracted data and caches there. "
                "Point it at a writable folder")
    return None


def data_dir(create: bool = True) -> Path:
    """Folder for datasets, caches and downloads: ``METATUT_DATA`` or ``<repo>/data``.

    Raises :class:`ValueError` if ``METATUT_DATA`` names a file (or a path under one), or cannot be created.
    """
    env = _setting("METATUT_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "data"
    if env:
        if path.exists() and not path.is_dir():
            raise ValueError(f"METATUT_DATA={env!r} is a file; it must be a folder (created if missing)")
        if create and not path.is_dir():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(_data_problem(path) or f"METATUT_DATA={env!r} cannot be created "
                                 f"({err.strerror or err}); point it at a writable folder") from err
    elif create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def quiet() -> bool:
    """True when progress bars should stay silent (CI profile, or ``METATUT_PROGRESS=0``).

    ``METATUT_PROGRESS`` takes the yes/no values of :func:`env_flag`; another value raises ValueError.
    """
    setting = env_flag("METATUT_PROGRESS")
    if setting is not None:
        return not setting
    return profile() == "ci"


def check_environment() -> dict:
    """Check every ``METATUT_*`` setting at once (budget, fast, progress, device, data folder).

    Raises one :class:`ValueError` listing every bad setting, each naming the variable, its value and the
    allowed values; creates nothing. Returns the settings in effect, e.g.
    ``{'budget': 'ci', 'fast': True, 'progress': False, 'device': None, 'data': Path(...)}`` (``device`` is
    None when ``METATUT_DEVICE`` is unset: then :func:`metatut.pick_device` chooses).

    Example::

        >>> import os
        >>> os.environ["METATUT_PROGRESS"] = "maybe"
        >>> try:
        ...     check_environment()
        ... except ValueError as err:
        ...     print("METATUT_PROGRESS='maybe'" in str(err))
        True
        >>> del os.environ["METATUT_PROGRESS"]
    """
    from .device import check_device_setting

    problems: list[str] = []
    settings: dict = {}

    def attempt(key: str, fn) -> None:
        try:
            settings[key] = fn()
        except (ValueError, RuntimeError) as err:
            problems.append(str(err))

    attempt("fast", lambda: env_flag("METATUT_FAST"))
    attempt("progress", lambda: env_flag("METATUT_PROGRESS"))
    attempt("budget", _budget)
    attempt("device", check_device_setting)
    env = _setting("METATUT_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "data"
    problem = _data_problem(path, writable=bool(env))   # the default folder is only needed by data loading
    if problem:
        problems.append(problem if env else problem.replace("METATUT_DATA=", "the default data folder (METATUT_DATA "
                                                            "unset) ", 1))
    settings["data"] = path
    if problems:
        raise ValueError("invalid metatut environment settings:\n  " + "\n  ".join(problems))
    if settings["budget"] is None:
        settings["budget"] = profile()
    return settings
