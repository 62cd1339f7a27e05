r"""The engine's public names in one module (a thin re-export of :mod:`metatut.engine`, :mod:`metatut.validate`
and :func:`metatut.evaluate.adaptation_curve`): task losses, inner-loop adaptation and the MAML meta-loss, as pure functions.

Notation (Finn et al., 2017). For a task :math:`t` with support set :math:`S_t` and query set
:math:`Q_t`, one inner step of size :math:`\alpha` gives

.. math:: \theta'_t = \theta - \alpha \nabla_\theta L_{S_t}(\theta),

and MAML minimises :math:`\sum_t L_{Q_t}(\theta'_t)`. Its gradient is
:math:`\sum_t (I - \alpha \nabla^2 L_{S_t}(\theta))^\top \nabla L_{Q_t}(\theta'_t)` (second order); first-order
MAML drops the Hessian term and uses :math:`\sum_t \nabla L_{Q_t}(\theta'_t)`.

Every function here takes ``(model, params, batch)`` and returns tensors that are differentiable
with respect to ``params`` (a dict of tensors). Nothing here keeps state.

Two execution paths give the same numbers:

* the **loop** path: one task at a time with ``torch.autograd.grad`` (the reference);
* the **vmap** path: all tasks at once with ``torch.func.vmap`` over ``torch.func.grad``.

``vectorize="auto"`` takes vmap for models whose vmap path is known to give the loop's numbers
(:mod:`metatut.engine.policy`: parameterised layers of the types the test-suite verifies,
:data:`VMAP_VERIFIED_LAYERS`, inside any containers; a model it cannot judge statically is checked against the
loop once, at run time); anything else runs the loop. ``vectorize=True``
takes vmap or raises :class:`VectorizeError` (unverified layers such as batch norm, per-step parameters or
buffers, ``checkpoint_steps``): it never falls back to the loop silently.

The public entry points check their inputs before computing: every parameter of the model has a value in
``params`` and every key names one (or is a buffer, a learned step size ``inner_lr.*`` or a per-step copy
``per_step.<k>.<name>``); parameters and data share one device and floating dtype; regression losses
(MSE, L1, ...) get targets of the prediction's shape and float dtype; classification labels (on the CPU)
lie within the model's output width.
"""
from __future__ import annotations

from .engine.conventions import (
    LEARNED_LR_PREFIX,
    PER_STEP_PREFIX,
    MetaParams,
    batch_norm_names,
    final_layer_names,
    learned_inner_lrs,
    per_step_buffers,
    per_step_params,
    split_learned_lrs,
)
from .engine.conventions import at_step as _at_step
from .engine.conventions import resolve_inner_lr as _resolve_inner_lr
from .engine.conventions import step_overrides as _step_overrides
from .engine.conventions import step_size as _rate
from .engine.conventions import updates_running_stats as _updates_running_stats
from .engine.execution import _PrecomputedGradient, accumulated_meta_loss
from .engine.execution import reduce as _reduce
from .engine.inner_loop import ClosureLoss, LossFn, Task, adapt, closure_losses, inner_step
from .engine.inner_optimizers import InnerOptimizer, as_inner_optimizer, inner_adam, inner_sgd, inner_sgd_momentum
from .engine.inner_loop import sgd_step as _sgd_step
from .engine.inner_loop import task_meta_loss as _task_meta_loss
from .engine.inner_loop import trajectory as _trajectory
from .engine.meta_loss import (
    MAMLObjective,
    maml_loss,
    maml_objective,
    meta_gradient,
    msl_weights,
    per_task_losses,
    summed_loss_objective,
    summed_task_loss,
    task_loss,
)
from .engine.options import ExecutionOptions, MetaOptions
from .engine.policy import (
    VMAP_VERIFIED_LAYERS,
    VectorizeError,
    can_vectorize,
    prefers_vmap,
    register_vmap_verified,
)
from .engine.policy import use_vmap as _use_vmap
from .engine.reptile import reptile_loss, reptile_objective
from .evaluate import adaptation_curve
from .validate import CheckedLoss as _CheckedLoss
from .validate import apply_loss as _apply_loss
from .validate import batch_tensors as _batch_tensors
from .validate import check_adapt_names as _check_adapt_names
from .validate import check_batch as _check_batch
from .validate import check_dtype_device as _check_dtype_device
from .validate import check_inputs as _check_inputs
from .validate import check_model_params as _check_model_params
from .validate import check_params as _check_params
from .validate import check_positive_int
from .validate import check_reduction as _check_reduction
from .validate import check_step_size as _check_step_size
from .validate import check_step_weights as _check_step_weights
from .validate import prepare_loss as _prepare_loss

__all__ = [
    "LossFn", "VMAP_VERIFIED_LAYERS", "LEARNED_LR_PREFIX", "can_vectorize", "prefers_vmap", "task_loss", "per_task_losses",
    "summed_task_loss", "inner_step", "adapt", "maml_loss", "maml_objective", "MAMLObjective", "msl_weights",
    "summed_loss_objective", "reptile_loss", "reptile_objective", "learned_inner_lrs", "split_learned_lrs",
    "final_layer_names", "meta_gradient", "adaptation_curve", "PER_STEP_PREFIX", "per_step_params",
    "per_step_buffers", "batch_norm_names", "accumulated_meta_loss", "VectorizeError", "MetaOptions",
    "ExecutionOptions", "register_vmap_verified", "MetaParams",
    "ClosureLoss", "Task", "closure_losses", "InnerOptimizer", "as_inner_optimizer", "inner_sgd", "inner_sgd_momentum",
    "inner_adam",
]

# Private names of the engine before the split, kept for code (and tests) that reached in.
_PRIVATE = (_at_step, _resolve_inner_lr, _step_overrides, _rate, _updates_running_stats, _PrecomputedGradient,
            _reduce, _sgd_step, _task_meta_loss, _trajectory, _use_vmap, _CheckedLoss, _apply_loss, _batch_tensors,
            _check_adapt_names, _check_batch, _check_dtype_device, _check_inputs, _check_model_params, _check_params,
            check_positive_int, _check_reduction, _check_step_size, _check_step_weights, _prepare_loss)
