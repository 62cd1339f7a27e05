"""Pick the compute device once: CUDA, then Apple MPS, then CPU (overridable)."""
from __future__ import annotations

import os

import torch

__all__ = ["pick_device", "make_generator", "check_device_setting"]

_VALID = ("cpu", "cuda", "mps")


def _parse(choice, source: str) -> torch.device:
    """``choice`` as a torch.device of a supported type, or ValueError naming ``source``."""
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in _VALID:
        if source == "argument":
            raise ValueError(f"device must be one of {_VALID} (got {str(choice)!r})")
        raise ValueError(f"METATUT_DEVICE={str(choice)!r} is not a device this library runs on: device must be "
                         f"one of {_VALID}, optionally with an index such as 'cuda:1'; set one of those or unset "
                         "METATUT_DEVICE to choose automatically")
    return device


def _check_available(device: torch.device, source: str) -> None:
    """RuntimeError if ``device`` cannot be used on this machine (naming METATUT_DEVICE if it came from there)."""
    origin = f"METATUT_DEVICE={str(device)!r} asks for device {str(device)!r}" if source == "environment" \
        else f"device {str(device)!r} was asked for"
    fix = "; unset METATUT_DEVICE or set it to 'cpu'" if source == "environment" else ""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{origin}, but torch.cuda.is_available() is False{fix}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"{origin}, but only {torch.cuda.device_count()} CUDA device(s) are visible "
                               f"(torch.cuda.device_count()){fix}")
    if device.type == "mps" and not _mps_available():
        raise RuntimeError(f"{origin}, but torch.backends.mps.is_available() is False{fix}")


def check_device_setting() -> torch.device | None:
    """Check ``METATUT_DEVICE``: None when unset or empty, else the device it names.

    Raises :class:`ValueError` naming ``METATUT_DEVICE`` and the allowed values for an unknown device, and
    :class:`RuntimeError` naming it when the device is not available on this machine.

    Example::

        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"METATUT_DEVICE": "cpu"}):
        ...     check_device_setting()
        device(type='cpu')
        >>> with mock.patch.dict(os.environ, {"METATUT_DEVICE": ""}):
        ...     print(check_device_setting())                   # unset or empty: choose automatically
        None
        >>> with mock.patch.dict(os.environ, {"METATUT_DEVICE": "tpu"}):
        ...     check_device_setting()
        Traceback (most recent call last):
            ...
        ValueError: METATUT_DEVICE='tpu' is not a device this library runs on: device must be one of ...
    """
    value = (os.environ.get("METATUT_DEVICE") or "").strip()
    if not value:
        return None
    device = _parse(value, "environment")
    _check_available(device, "environment")
    return device


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on.

    Order: the ``prefer`` argument, then the ``METATUT_DEVICE`` environment variable, then CUDA,
    then Apple MPS, then CPU. Asking for a device that is not available raises a clear error
    instead of silently falling back (naming ``METATUT_DEVICE`` when the request came from there).

    Example::

        >>> pick_device("cpu")
        device(type='cpu')
        >>> pick_device().type in ("cuda", "mps", "cpu")      # METATUT_DEVICE, else the best available
        True
        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"METATUT_DEVICE": "cpu"}):
        ...     pick_device()
        device(type='cpu')
        >>> pick_device("tpu")
        Traceback (most recent call last):
            ...
        ValueError: device must be one of ('cpu', 'cuda', 'mps') (got 'tpu')
    """
    if prefer is None:
        from_env = check_device_setting()
        if from_env is not None:
            return from_env
    else:
        device = _parse(prefer, "argument")
        _check_available(device, "argument")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` living on ``device`` (so sampling happens there).

    Example::

        >>> g = make_generator(0)
        >>> g.device
        device(type='cpu')
        >>> torch.equal(torch.randn(2, 3, generator=make_generator(0)),  # same seed, same draws
        ...             torch.randn(2, 3, generator=make_generator(0)))
        True
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int (got {type(seed).__name__})")
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
