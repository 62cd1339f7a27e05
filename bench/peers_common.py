"""Shared pieces of the peer benchmark (``bench_peers.py``): constants, messages, and importing the peers.

The peers (learn2learn, higher, TorchOpt) are found in ``bench/.peers`` (``bash bench/setup_peers.sh``) or in
the environment; one that cannot be imported is skipped, not fatal.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import sys
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PEER_PATHS = (BENCH_DIR / ".peers" / "site", BENCH_DIR / ".peers" / "learn2learn-0.2.0")
for _path in PEER_PATHS:  # appended: PYTHONPATH and the environment's own packages take precedence
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.append(str(_path))

try:
    import metatut as mt
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(BENCH_DIR.parent))
    import metatut as mt

__all__ = ["mt"]  # re-exported: the other bench modules take metatut from here (checkout fallback included)

META_LR = 1e-3
WORKLOADS = ("W1", "W2", "W3")
ORDERS = ("second", "first")
METATUT_IMPLS = ("metatut", "metatut-loop", "metatut-workers", "metatut-bf16", "metatut-compile")
#: "plain-vmap" is not a library: torch.func's vmap over grad written out by hand, the pattern of TorchOpt's
#: functorch MAML example; it is a peer because it is what a user gets without any MAML library.
PEER_IMPLS = ("learn2learn", "higher", "torchopt", "plain-vmap")
FLOOR_IMPLS = ("floor-one-batch", "floor-per-task")
ALL_IMPLS = METATUT_IMPLS + PEER_IMPLS + FLOOR_IMPLS
PEER_MODULES = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt"}
GATE_RTOL = 1e-4
BF16_GATE = 0.2
#: (warm-up iterations, iterations per round, rounds) per workload, overridable on the command line
DEFAULTS = {"W1": (20, 10, 30), "W2": (2, 1, 5), "W3": (1, 1, 3)}
MEMORY_TAG = "MEMORY-RESULT "

def describe(error: BaseException) -> str:
    """``'TypeName: first line of the message'``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def progress(message: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(message, file=sys.stderr, flush=True)



# ----------------------------------------------------------------------------------------- libraries
def import_quietly(name: str):
    """Import a module with its import-time warnings and prints (gym's notice) silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def import_peers(names) -> tuple[dict, dict]:
    """Import the peers among ``names``: ``({impl: module}, {impl: why it was skipped})``."""
    modules, skipped = {}, {}
    for impl in names:
        if impl not in PEER_MODULES:  # plain-vmap needs nothing but torch
            continue
        try:
            modules[impl] = import_quietly(PEER_MODULES[impl])
            if impl == "learn2learn":
                import_quietly("learn2learn.algorithms")
        except Exception as error:  # any import failure: the peer is skipped, not the benchmark
            skipped[impl] = f"import failed: {describe(error)}"
    return modules, skipped


def import_accel():
    """``metatut.accel`` (bf16 autocast, compile), or None with a reason."""
    try:
        return importlib.import_module("metatut.accel"), ""
    except Exception as error:  # a broken or missing module only disables bf16 and compile
        return None, f"metatut.accel unavailable: {describe(error)}"


def library_version(module_name: str, module=None) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(module_name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

