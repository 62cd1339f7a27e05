"""Vmap or the loop: which models may run all tasks at once under ``torch.func.vmap``.

The per-task loop (``torch.autograd.grad`` one task at a time) is the reference; ``vmap`` over tasks gives the
same numbers only where every operation of the model batches correctly in second order. A model is judged by
its modules (:func:`judge`):

* a module of a **verified** type (:data:`VMAP_VERIFIED_LAYERS`, a class registered with
  :func:`register_vmap_verified`, or a module whose ``vmap_safe`` attribute is True: a class attribute, or a
  property deciding per instance, as :class:`metatut.TaskBatchNorm2d` does: True with batch statistics) is safe:
  its vmap path is checked against the loop by the test-suite (float64, both orders);
* a **known-unsafe** module makes the model run the loop: batch norm and instance norm (under vmap PyTorch's
  batch norm gives a second-order meta-gradient ~1e-2 off the loop's, even in float64; running statistics are
  updated in the forward pass), dropout (random), or a class with ``vmap_safe = False``;
* a module that owns **no parameters and no buffers** of its own (a container such as a user's
  ``class MLP(nn.Module)`` calling ``F.relu``, or a pure activation) is transparent: only its children count;
* anything else (a custom layer that owns an ``nn.Parameter`` or a buffer directly, an unlisted parameterised
  layer such as ``nn.LayerNorm``) cannot be judged statically: the first call with ``vectorize='auto'`` (or
  ``True``) checks vmap against the loop **once** on the first batch (float64 copies, both orders, relative
  tolerance 1e-9; see :mod:`metatut.engine.verify`) and caches the verdict for that model object. A model that
  fails runs the loop, with one :class:`VectorizeWarning` saying why; ``vectorize=True`` raises
  :class:`VectorizeError` instead.

``vectorize='auto'`` also keeps the loop for convolutional models on a CPU (batched on CUDA, and on MPS where it
differentiates twice: :func:`prefers_vmap`), per-step parameters (batched only with a vmap-safe batch norm such
as :class:`metatut.TaskBatchNorm2d` and no buffers), per-step buffers and ``checkpoint_steps``.

The policy reads :data:`VMAP_VERIFIED_LAYERS` here, in :mod:`metatut.engine.policy` (``metatut.functional`` only
re-exports it); to add a layer, prefer :func:`register_vmap_verified` or the class attribute to patching the tuple.
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..validate import check_vectorize

__all__ = ["VMAP_VERIFIED_LAYERS", "VMAP_UNSAFE_LAYERS", "VectorizeError", "VectorizeWarning", "VmapVerdict",
           "Probe", "register_vmap_verified", "judge", "can_vectorize", "prefers_vmap", "use_vmap",
           "forget_verdict"]

#: Layer types whose vmap-over-tasks path the tests check against the per-task loop (float64, both orders).
#: Batch norm is not among them: under ``vmap`` PyTorch's batch norm gives a second-order meta-gradient that
#: differs from the loop's by ~1e-2 relative even in float64, while the loop agrees with batch norm written
#: out in elementary operations (``tests/test_accel.py``). :class:`metatut.TaskBatchNorm2d` (conv4's
#: ``batch_norm='batch'``) is that elementary version on the batched path: it declares ``vmap_safe`` itself.
VMAP_VERIFIED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Identity, nn.Flatten,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d,
)

#: Layer types that always run the loop (they are judged before anything else but the verified types).
VMAP_UNSAFE_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)

_REGISTERED: set[type] = set()
_RUNTIME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> (agrees, why)


class VectorizeError(ValueError):
    """``vectorize=True`` was asked for a computation whose vmap path would not give the loop's numbers.

    Raised before anything is computed when the model holds known-unsafe layers (e.g. batch norm, whose
    second-order meta-gradient under ``torch.func.vmap`` differs from the loop's), when a model that could not
    be judged statically failed the runtime check against the loop, or when per-step parameters, per-step
    ``buffers`` or ``checkpoint_steps=True`` are used (they run the per-task loop only). ``vectorize=False`` or
    ``'auto'`` run the loop instead. A ``ValueError``.

    Example::

        >>> import torch, metatut as mt
        >>> model = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> batch = mt.SinusoidTasks().sample(2, 5, generator=mt.make_generator(0))
        >>> mt.maml_loss(model, mt.init_params(model), batch, inner_lr=0.1, vectorize=True)
        Traceback (most recent call last):
        ...
        metatut.engine.policy.VectorizeError: vectorize=True cannot run this model: its layers ['BatchNorm1d'] ...
    """


class VectorizeWarning(UserWarning):
    """``vectorize='auto'`` runs the per-task loop for a model whose vmap path failed the runtime check.

    Issued once per model object; the loop's numbers are the reference, so nothing is wrong, only slower.

    Example::

        >>> issubclass(VectorizeWarning, UserWarning)
        True
    """


class VmapVerdict(NamedTuple):
    """The static judgement of a model: ``kind`` is ``'safe'``, ``'unsafe'`` or ``'check'`` (needs the runtime
    check); ``layers`` names the classes that decided it (empty for ``'safe'``).

    Example::

        >>> judge(nn.Sequential(nn.Linear(1, 2), nn.Dropout()))
        VmapVerdict(kind='unsafe', layers=['Dropout'])
    """

    kind: str
    layers: list[str]


@dataclass(frozen=True, eq=False)
class Probe:
    """The first batch's data for the runtime check (tensors ``[tasks, shots, ...]``) and the loss and step size
    to check with. Cheap to build: nothing is copied until a check runs.

    Example::

        >>> import torch
        >>> x = torch.zeros(2, 3, 1)
        >>> Probe({}, x, x, x, x, loss_fn=None, inner_lr=0.1).num_tasks
        2
    """

    params: dict
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    loss_fn: Any
    inner_lr: Any = 0.01

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


def register_vmap_verified(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare a layer class verified under vmap (its forward gives the loop's numbers, both orders); returns
    ``cls``, so it also works as a class decorator. Setting the class attribute ``vmap_safe = True`` does the same.

    Example::

        >>> @register_vmap_verified
        ... class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.s = nn.Parameter(torch.ones(1))
        ...     def forward(self, x):
        ...         return self.s * x
        >>> import torch
        >>> judge(nn.Sequential(nn.Linear(1, 1), Scale())).kind
        'safe'
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_vmap_verified takes an nn.Module subclass (got {cls!r})")
    _REGISTERED.add(cls)
    return cls


def _verified(module: nn.Module) -> bool:
    cls = type(module)
    return cls in VMAP_VERIFIED_LAYERS or cls in _REGISTERED or getattr(module, "vmap_safe", None) is True


def _unsafe(module: nn.Module) -> bool:
    return isinstance(module, VMAP_UNSAFE_LAYERS) or getattr(module, "vmap_safe", None) is False


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def judge(model: nn.Module) -> VmapVerdict:
    """Judge ``model`` statically, module by module (see the module docstring): ``'unsafe'`` if any module is
    known-unsafe, else ``'check'`` if any module owns parameters or buffers of a type not verified, else
    ``'safe'``. Not cached (a model may be changed); a walk over its modules.

    Example::

        >>> class MLP(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)
        ...     def forward(self, x):
        ...         return self.b(torch.relu(self.a(x)))
        >>> judge(MLP())
        VmapVerdict(kind='safe', layers=[])
        >>> judge(nn.LayerNorm(3))
        VmapVerdict(kind='check', layers=['LayerNorm'])
    """
    unsafe, unknown = set(), set()
    for module in model.modules():
        if _verified(module):
            continue
        if _unsafe(module):
            unsafe.add(type(module).__name__)
        elif _owns_state(module):
            unknown.add(type(module).__name__)
    if unsafe:
        return VmapVerdict("unsafe", sorted(unsafe))
    return VmapVerdict("check", sorted(unknown)) if unknown else VmapVerdict("safe", [])


def can_vectorize(model: nn.Module) -> bool:
    """True when ``vectorize=True`` is known to give the loop's meta-gradient for ``model``: judged safe
    statically, or verified at run time already (:func:`judge`). A model still to be checked gives False.

    Example::

        >>> can_vectorize(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)))
        True
        >>> can_vectorize(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)))
        False
    """
    kind = _judged(model).kind
    return kind == "safe" or (kind == "check" and _RUNTIME.get(model, (False, ""))[0])


def _convolutional(model: nn.Module) -> bool:
    from ..validate import structure_cached

    return structure_cached(model, "convolutional",
                            lambda m: any(isinstance(x, nn.modules.conv._ConvNd) for x in m.modules()))


def _judged(model: nn.Module) -> VmapVerdict:
    """:func:`judge`, cached while the model's structure is unchanged (``validate.structure_cached``)."""
    from ..validate import structure_cached

    # the verdict also depends on the lists of verified and unsafe layers (which a user may extend), and on the
    # per-instance vmap_safe of the modules that decide it themselves (TaskBatchNorm2d): part of the key
    rules = (VMAP_VERIFIED_LAYERS, VMAP_UNSAFE_LAYERS, frozenset(_REGISTERED),
             tuple(m.vmap_safe for m in model.modules() if isinstance(getattr(type(m), "vmap_safe", None), property)))
    return structure_cached(model, ("vmap verdict", rules), judge)


def _device_of(model: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _batches_convolutions(device: torch.device) -> bool:
    """Whether convolutional models run faster batched over tasks on ``device``: on CUDA (one big grouped
    convolution keeps the GPU busy), on MPS where second derivatives work there, not on a CPU (measured slower)."""
    if device.type == "cuda":
        return True
    if device.type == "mps":
        from ..accel import supports_double_backward

        return supports_double_backward(device) is True
    return False


def prefers_vmap(model: nn.Module, device=None) -> bool:
    """What ``vectorize='auto'`` picks once a model is judged: vmap (the batched-tasks path) for vmap-safe models,
    except convolutional ones on a CPU. ``device``: where it runs (default: the device of the model's parameters).

    For convolutional models vmap turns each convolution into a grouped convolution over tasks, which
    measured 3-4x slower than the per-task loop on a CPU (``bench/RESULTS.md``), so ``'auto'`` keeps the
    loop for them there; on CUDA (and on MPS where it can differentiate twice) it takes the batched path,
    which fills the GPU with one kernel per layer for all tasks; ``vectorize=True`` takes it everywhere.

    Example::

        >>> prefers_vmap(nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)))
        True
        >>> conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
        >>> prefers_vmap(conv), prefers_vmap(conv, device="cpu"), prefers_vmap(conv, device="cuda")
        (False, False, True)
    """
    return can_vectorize(model) and (not _convolutional(model) or _batches_convolutions(_device_of(model, device)))


def _per_step_batched(model: nn.Module) -> bool:
    """Per-step parameters (MAML++) may run batched: the model has a batch norm verified under vmap (batch
    statistics: :class:`metatut.TaskBatchNorm2d`) and no buffers (so no per-step running statistics)."""
    return not any(True for _ in model.buffers()) and any(
        isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "vmap_safe", None) is True for m in model.modules())


def forget_verdict(model: nn.Module) -> None:
    """Drop the cached runtime verdict of ``model`` (e.g. after changing its layers): the next call checks again.

    Example::

        >>> forget_verdict(nn.Linear(1, 1))
    """
    _RUNTIME.pop(model, None)


def _runtime_verdict(model: nn.Module, probe: Probe | None) -> tuple[bool, str] | None:
    """The cached verdict, or the runtime check's (cached when it could decide); None when it cannot run."""
    if model in _RUNTIME:
        return _RUNTIME[model]
    if probe is None:
        return None
    from .verify import vmap_matches_loop   # the check runs the engine's two paths: imported when needed

    why = vmap_matches_loop(model, probe)
    if why is None:
        return None
    verdict = (why == "", why)
    _RUNTIME[model] = verdict
    return verdict


def _refuse(layers: list[str], why: str = "") -> VectorizeError:
    reason = f"; checked against the loop at run time, {why}" if why else ""
    return VectorizeError(f"vectorize=True cannot run this model: its layers {layers} are not among those whose "
                          "vmap path is verified against the per-task loop (metatut.engine.policy.VMAP_VERIFIED_LAYERS; "
                          "under torch.func.vmap PyTorch's batch norm gives a wrong second-order meta-gradient, "
                          "metatut.TaskBatchNorm2d does not)"
                          f"{reason}; use vectorize=False or 'auto' (which runs the loop for this model)")


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside the metatut package (the user's call)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _auto(model: nn.Module, verdict: VmapVerdict, probe: Probe | None) -> bool:
    if verdict.kind == "unsafe":
        return False
    if _convolutional(model):
        data = probe.support_x if probe is not None and isinstance(probe.support_x, Tensor) else None
        if not _batches_convolutions(_device_of(model, data.device if data is not None else None)):
            return False
    if verdict.kind == "safe":
        return True
    cached = model in _RUNTIME
    result = _runtime_verdict(model, probe)
    if result is None:
        return False
    if not result[0] and not cached:
        warnings.warn(f"vectorize='auto' runs the per-task loop for {type(model).__name__}: its layers "
                      f"{verdict.layers} are not of a verified type, so vmap over tasks was checked against the loop "
                      f"once on the first batch, and {result[1]}. The loop gives the reference numbers (this model "
                      "is not checked again); pass vectorize=False to skip the check, or fix the layer and "
                      "metatut.engine.forget_verdict(model)", VectorizeWarning, stacklevel=_caller_level())
    return result[0]


def use_vmap(model: nn.Module, vectorize, *, per_step: bool = False, checkpoint_steps: bool = False,
             probe: Probe | None = None) -> bool:
    """Whether to take the vmap path. ``vectorize=True`` takes it or raises :class:`VectorizeError`: never a
    silent fall-back to the loop, never vmap where it is not verified to give the loop's numbers. ``probe``:
    the data for the runtime check of a model that cannot be judged statically (its device also decides
    ``'auto'`` for convolutional models: :func:`prefers_vmap`). ``per_step``: per-step parameters or buffers
    are used; they run batched only with a vmap-safe batch norm and no buffers (MAML++'s per-step batch norm
    with :class:`metatut.TaskBatchNorm2d`), else the loop.

    Example::

        >>> use_vmap(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)), "auto")
        True
        >>> use_vmap(nn.Linear(1, 1), True, checkpoint_steps=True)
        Traceback (most recent call last):
        ...
        metatut.engine.policy.VectorizeError: checkpoint_steps=True runs the per-task loop; ...
    """
    vectorize = check_vectorize(vectorize)
    if vectorize == "auto":
        return (not checkpoint_steps and (not per_step or _per_step_batched(model))
                and _auto(model, _judged(model), probe))
    if not vectorize:
        return False
    if checkpoint_steps:
        raise VectorizeError("checkpoint_steps=True runs the per-task loop; it cannot be combined with vectorize=True: "
                             "use vectorize=False or 'auto'")
    if per_step and not _per_step_batched(model):
        raise VectorizeError("vectorize=True cannot run per-step parameters (per_step.<k>.<name>) or per-step buffers "
                             "(buffers=) for this model: they run the per-task loop, except per-step parameters with batch-statistics "
                             "TaskBatchNorm2d (conv4's batch_norm='batch') and no buffers; use vectorize=False "
                             "or 'auto'")
    verdict = _judged(model)
    if verdict.kind == "unsafe":
        raise _refuse(verdict.layers)
    if verdict.kind == "check":
        result = _runtime_verdict(model, probe)
        if result is None or not result[0]:
            raise _refuse(verdict.layers, result[1] if result else "it could not be checked")
    return True
