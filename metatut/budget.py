"""The environment settings metatut reads, the data folder, and (re-exported) the budget profiles.

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

The budget profiles (``ci``, ``laptop``, ``gpu``: :func:`profile`, :func:`pick`, :data:`PROFILES`,
:func:`quiet`) live in :mod:`metatut.course.budget` and are re-exported here (``mt.pick``, ``mt.profile``).

**Where data goes** (:func:`data_dir`), first match wins:

1. ``$METATUT_DATA`` when set;
2. the checkout's ``data/`` folder when metatut runs from a source checkout (the folder above the
   ``metatut`` package holds ``pyproject.toml`` and ``data/README.md``: an editable install or the
   repository on ``sys.path``);
3. a per-user cache folder, following the platform's convention (:func:`user_cache_dir`):
   Linux and other POSIX systems ``$XDG_CACHE_HOME/metatut`` or ``~/.cache/metatut``, macOS
   ``~/Library/Caches/metatut``, Windows ``%LOCALAPPDATA%\\metatut\\Cache``.

An installed wheel therefore never writes into ``site-packages``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["PROFILES", "FLAG_VALUES", "profile", "pick", "data_dir", "default_data_dir", "user_cache_dir",
           "quiet", "env_flag", "check_environment"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
#: The values a yes/no setting (``METATUT_FAST``, ``METATUT_PROGRESS``) accepts, case-insensitive.
FLAG_VALUES = _TRUE + _FALSE
#: The ``metatut`` package folder (tests point it elsewhere to exercise each branch of :func:`default_data_dir`).
_PACKAGE_DIR = Path(__file__).resolve().parent


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


def user_cache_dir(platform: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The per-user cache folder for metatut on ``platform`` (default ``sys.platform``).

    Linux and other POSIX systems: ``$XDG_CACHE_HOME/metatut`` (an absolute path; else ignored, as the XDG
    specification says) or ``~/.cache/metatut``; macOS (``darwin``): ``~/Library/Caches/metatut``; Windows
    (``win32``, ``cygwin``): ``%LOCALAPPDATA%\\metatut\\Cache`` or ``~/AppData/Local/metatut/Cache``.
    ``environ`` defaults to ``os.environ``; nothing is created.

    Example::

        >>> user_cache_dir("linux", {"XDG_CACHE_HOME": "/tmp/xdg"}).as_posix()
        '/tmp/xdg/metatut'
        >>> user_cache_dir("darwin", {}).parts[-3:]
        ('Library', 'Caches', 'metatut')
        >>> user_cache_dir("win32", {"LOCALAPPDATA": "/tmp/local"}).as_posix()
        '/tmp/local/metatut/Cache'
    """
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    if platform.startswith(("win32", "cygwin")):
        local = (environ.get("LOCALAPPDATA") or "").strip()
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "metatut" / "Cache"
    if platform == "darwin":
        return Path.home() / "Library" / "Caches" / "metatut"
    xdg = (environ.get("XDG_CACHE_HOME") or "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "metatut"


def _checkout_data_dir() -> Path | None:
    """``<checkout>/data`` when the package runs from a source checkout, else None."""
    root = _PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "data" / "README.md").is_file():
        return root / "data"
    return None


def default_data_dir() -> Path:
    """The data folder when ``METATUT_DATA`` is unset: the checkout's ``data/`` or :func:`user_cache_dir`.

    Example::

        >>> folder = default_data_dir()
        >>> folder.name in ("data", "metatut", "Cache") and "site-packages" not in folder.parts
        True
    """
    return _checkout_data_dir() or user_cache_dir()


def data_dir(create: bool = True) -> Path:
    """Folder for datasets, caches and downloads (created unless ``create=False``).

    ``$METATUT_DATA`` if set; else, in a source checkout, its ``data/``; else the per-user cache folder
    (:func:`user_cache_dir`: ``~/.cache/metatut`` on Linux, ``~/Library/Caches/metatut`` on macOS,
    ``%LOCALAPPDATA%\\metatut\\Cache`` on Windows) - never ``site-packages``. Raises :class:`ValueError`
    if ``METATUT_DATA`` names a file (or a path under one), or cannot be created.

    Example::

        >>> import os
        >>> saved = os.environ.get("METATUT_DATA")
        >>> os.environ["METATUT_DATA"] = "/tmp/metatut-example-data"
        >>> data_dir(create=False).as_posix()
        '/tmp/metatut-example-data'
        >>> _ = os.environ.pop("METATUT_DATA") if saved is None else os.environ.update(METATUT_DATA=saved)
    """
    env = _setting("METATUT_DATA")
    path = Path(env).expanduser() if env else default_data_dir()
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
    from .course.budget import _budget
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
    path = Path(env).expanduser() if env else default_data_dir()
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


# The budget profiles live with the course (metatut.course.budget: torch only, no course extra); re-exported
# here for ``mt.pick``/``mt.profile`` and the old import paths. Imported last: that module reads env_flag above.
from .course.budget import PROFILES, pick, profile, quiet  # noqa: E402
