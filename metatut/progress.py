"""Progress bars that the budget profile can silence (``tqdm.auto`` ignores ``TQDM_DISABLE`` in a kernel)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

from .budget import quiet

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
             enabled: bool | None = None, **kwargs) -> tqdm:
    """A ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal), disabled when :func:`quiet`.

    With ``enabled=None`` the environment decides (``METATUT_PROGRESS``, else the budget profile); a
    ``METATUT_PROGRESS`` value other than 1/0/true/false/yes/no/on/off raises :class:`ValueError`.
    Other keyword arguments go to ``tqdm`` (``leave=True`` unless given).

    Example::

        >>> bar = progress(range(3), desc="tasks", enabled=False)   # disabled: prints nothing
        >>> [i * i for i in bar]
        [0, 1, 4]
        >>> bar.close()
        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"METATUT_PROGRESS": "0"}):
        ...     progress(total=10).disable                          # enabled=None: the environment decides
        True
        >>> with mock.patch.dict(os.environ, {"METATUT_PROGRESS": "maybe"}):
        ...     progress(range(3))
        Traceback (most recent call last):
            ...
        ValueError: METATUT_PROGRESS=...
    """
    disable = quiet() if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=kwargs.pop("leave", True), **kwargs)
