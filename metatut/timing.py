"""Interleaved timing: compare implementations fairly on a noisy, shared machine.

Timing ``a`` for a while and then ``b`` lets a change in the machine's load (another job starting, a
thermal limit) masquerade as a difference between them. :func:`interleaved_timings` runs the candidates
round-robin instead: in each round every function runs ``iters`` times, in an order rotated by one from
round to round (so no function always runs first, or always right after the same neighbour), and the
result is the per-name **median** of the per-round times with the **inter-quartile range** (IQR): robust
to the odd round a background job spoiled. Before each clock reading the device is synchronised
(``torch.cuda.synchronize`` / ``torch.mps.synchronize``), since GPU kernels run asynchronously and the
clock would otherwise measure only how fast Python queues them.

Timings are for reports, never for asserts: machines are noisy.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .progress import progress
from .tasks.base import check_positive_int

__all__ = ["Timing", "synchronize", "rotated_order", "interleaved_timings", "speedups", "format_table",
           "backward_memory"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one function: median and quartiles over rounds, and the per-round values.

    :func:`interleaved_timings` returns one per timed function; ``times`` has one entry per round.

    Example::

        >>> t = Timing(median=0.004, q1=0.003, q3=0.005, times=(0.003, 0.004, 0.005))
        >>> t.rounds, round(t.iqr, 6)
        (3, 0.002)
        >>> print(t)
        4.000 ms (IQR 3.000-5.000 ms, 3 rounds)
    """

    median: float
    q1: float
    q3: float
    times: tuple[float, ...]  # seconds per call in each round, in round order

    @property
    def iqr(self) -> float:
        """Inter-quartile range ``q3 - q1`` in seconds."""
        return self.q3 - self.q1

    @property
    def rounds(self) -> int:
        """Number of rounds timed (``len(times)``)."""
        return len(self.times)

    def __str__(self) -> str:
        return f"{1e3 * self.median:.3f} ms (IQR {1e3 * self.q1:.3f}-{1e3 * self.q3:.3f} ms, {self.rounds} rounds)"


def _device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be None, a torch.device or a device string such as 'cpu' or 'cuda' "
                         f"(got {device!r})") from None


def synchronize(device: str | torch.device | None) -> None:
    """Wait until every kernel queued on ``device`` has finished (nothing to do on the CPU or for None).

    Example::

        >>> x = torch.ones(64, 64)
        >>> y = x @ x                       # on a GPU this only queues the kernel ...
        >>> synchronize(x.device)           # ... and this waits for it (a no-op on the CPU)
        >>> synchronize(None), synchronize("cpu")
        (None, None)
    """
    device = _device(device)
    if device is None or device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    else:  # e.g. xpu: use the backend's synchronize when it has one
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def rotated_order(names, round_index: int) -> list:
    """The order of round ``round_index``: ``names`` rotated left by ``round_index`` places.

    Example::

        >>> [rotated_order(["a", "b", "c"], r) for r in range(4)]
        [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'], ['a', 'b', 'c']]
    """
    names = list(names)
    if not names:
        return names
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def interleaved_timings(functions: Mapping[str, Callable[[], object]], *, rounds: int, iters: int = 1,
                        warmup: int = 1, device: str | torch.device | None = None,
                        clock: Callable[[], float] = time.perf_counter, desc: str | None = None) -> dict[str, Timing]:
    """Time each of ``functions`` (``{name: callable without arguments}``), interleaved; seconds per call.

    First every function runs ``warmup`` times (caches, lazy initialisation, autotuning; not timed).
    Then ``rounds`` rounds: in round ``r`` the functions run in :func:`rotated_order` ``(names, r)``, each
    ``iters`` times in a row between two clock readings, with the device synchronised before each reading.
    Returns ``{name: Timing}`` in the order of ``functions``, where ``Timing.times[r]`` is the time per call
    in round ``r`` (elapsed / ``iters``). ``clock`` is the clock to read (default ``time.perf_counter``);
    ``desc`` shows a progress bar over the rounds with that label (:func:`metatut.progress`: silent in CI).

    Example (a fake clock that advances one second per reading, so the numbers are reproducible: each
    round reads it before and after ``iters=2`` calls, so 1 s elapsed, 0.5 s per call)::

        >>> import itertools
        >>> ticks = itertools.count()
        >>> timings = interleaved_timings({"sum": lambda: sum(range(100)), "formula": lambda: 99 * 100 // 2},
        ...                               rounds=3, iters=2, clock=lambda: float(next(ticks)))
        >>> timings["sum"]
        Timing(median=0.5, q1=0.5, q3=0.5, times=(0.5, 0.5, 0.5))

    With the real clock, on tensors (``device`` synchronises a GPU before each reading)::

        >>> a = torch.randn(32, 32)
        >>> timings = interleaved_timings({"matmul": lambda: a @ a, "einsum": lambda: torch.einsum("ij,jk->ik", a, a)},
        ...                               rounds=5, iters=3, device=a.device)
        >>> list(timings), timings["matmul"].rounds, timings["matmul"].median > 0
        (['matmul', 'einsum'], 5, True)
    """
    if not isinstance(functions, Mapping) or not functions:
        raise ValueError("functions must be a non-empty dict {name: callable taking no arguments}")
    for name, fn in functions.items():
        if not isinstance(name, str):
            raise TypeError(f"functions must be keyed by str names (got key {name!r})")
        if not callable(fn):
            raise TypeError(f"functions[{name!r}] must be callable with no arguments (got {type(fn).__name__})")
    check_positive_int("rounds", rounds)
    check_positive_int("iters", iters)
    check_positive_int("warmup", warmup, minimum=0)
    device = _device(device)
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds (got {clock!r})")
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a str or None (got {desc!r})")

    names = list(functions)
    for name in names:
        for _ in range(warmup):
            functions[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    bar = progress(range(rounds), desc=desc, enabled=None if desc is not None else False)
    for r in bar:
        for name in rotated_order(names, r):
            fn = functions[name]
            synchronize(device)
            start = clock()
            for _ in range(iters):
                fn()
            synchronize(device)
            times[name].append((clock() - start) / iters)
    bar.close()
    out = {}
    for name in names:
        q1, median, q3 = _quartiles(times[name])
        out[name] = Timing(median=median, q1=q1, q3=q3, times=tuple(times[name]))
    return out


def speedups(timings: Mapping[str, Timing], baseline: str) -> dict[str, float]:
    """``{name: baseline's median / name's median}``: above 1 means faster than ``baseline``.

    Example::

        >>> timings = {"loop": Timing(0.004, 0.003, 0.005, (0.003, 0.004, 0.005)),
        ...            "vmap": Timing(0.001, 0.001, 0.001, (0.001, 0.001, 0.001))}
        >>> speedups(timings, baseline="loop")
        {'loop': 1.0, 'vmap': 4.0}
    """
    if baseline not in timings:
        raise KeyError(f"baseline {baseline!r} is not one of the timed names {list(timings)}")
    reference = timings[baseline].median
    return {name: (reference / t.median if t.median > 0 else math.inf) for name, t in timings.items()}


def format_table(timings: Mapping[str, Timing], *, baseline: str | None = None, unit: str = "ms",
                 title: str = "implementation") -> str:
    """A Markdown table: median and IQR per call in ``unit`` (``'s'``, ``'ms'`` or ``'us'``), and with
    ``baseline`` a column of speed-ups relative to it.

    Example::

        >>> timings = {"loop": Timing(0.004, 0.003, 0.005, (0.003, 0.004, 0.005)),
        ...            "vmap": Timing(0.001, 0.001, 0.001, (0.001, 0.001, 0.001))}
        >>> print(format_table(timings, baseline="loop"))
        | implementation | median ms / call | IQR (ms) | speed-up vs loop |
        | -------------- | ---: | ---: | ---: |
        | loop           | 4.000 | 3.000 - 5.000 | 1.00x |
        | vmap           | 1.000 | 1.000 - 1.000 | 4.00x |
    """
    scales = {"s": 1.0, "ms": 1e3, "us": 1e6}
    if unit not in scales:
        raise ValueError(f"unit must be one of {tuple(scales)} (got {unit!r})")
    if not timings:
        raise ValueError("timings must not be empty")
    scale = scales[unit]
    ratios = speedups(timings, baseline) if baseline is not None else None
    width = max(len(title), *(len(n) for n in timings))
    header = f"| {title:<{width}} | median {unit} / call | IQR ({unit}) |"
    rule = f"| {'-' * width} | ---: | ---: |"
    if ratios is not None:
        header += f" speed-up vs {baseline} |"
        rule += " ---: |"
    lines = [header, rule]
    for name, t in timings.items():
        row = f"| {name:<{width}} | {scale * t.median:.3f} | {scale * t.q1:.3f} - {scale * t.q3:.3f} |"
        if ratios is not None:
            row += f" {ratios[name]:.2f}x |"
        lines.append(row)
    return "\n".join(lines)


def backward_memory(compute_loss: Callable[[], torch.Tensor]) -> int:
    """Bytes that autograd holds for the backward pass of ``compute_loss()``, then runs that backward pass.

    Counts the distinct storages of the tensors saved for backward (a ``saved_tensors_hooks`` pack hook records
    them) that are still alive when the forward pass ends: the memory that second-order terms, extra inner steps
    or learned step sizes add and that checkpointing removes. Device-independent, so it works where
    ``torch.cuda.max_memory_allocated`` does not (a CPU). The hooks do not see inside ``torch.func`` transforms:
    measure the per-task loop path (``vectorize=False``).

    Example::

        >>> w = torch.ones(1000, dtype=torch.float64, requires_grad=True)
        >>> x = torch.ones(1000, dtype=torch.float64)
        >>> backward_memory(lambda: (w * x).sum())          # the product saves x (8,000 bytes) for w's gradient
        8000
        >>> w.grad.shape
        torch.Size([1000])
    """
    import weakref

    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss()
    storages = {}
    for ref in saved:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    loss.backward()
    return sum(storages.values())
