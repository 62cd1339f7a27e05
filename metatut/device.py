"""Pick the compute device once: CUDA, then Apple MPS, then CPU (overridable)."""
from __future__ import annotations

import os

import torch

__all__ = ["pick_device", "make_generator"]

_VALID = ("cpu", "cuda", "mps")


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on.

    Order: the ``prefer`` argument, then the ``METATUT_DEVICE`` environment variable, then CUDA,
    then Apple MPS, then CPU. Asking for a device that is not available raises a clear error
    instead of silently falling back.
    """
    choice = prefer if prefer is not None else os.environ.get("METATUT_DEVICE") or None
    if choice is not None:
        try:
            device = torch.device(choice)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in _VALID:
            raise ValueError(f"device must be one of {_VALID} (got {str(choice)!r})")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
        if device.type == "mps" and not _mps_available():
            raise RuntimeError("device 'mps' was asked for, but torch.backends.mps.is_available() is False")
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
    """A seeded ``torch.Generator`` living on ``device`` (so sampling happens there)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int (got {type(seed).__name__})")
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
