"""The engine: the MAML family's meta-loss as pure functions of ``(model, params, batch)``, split along its seams.

* :mod:`~metatut.engine.options`: :class:`MetaOptions` (what to compute) and :class:`ExecutionOptions` (how);
* :mod:`~metatut.engine.policy`: vmap over tasks or the per-task loop (verified layers, the static judgement,
  the runtime check's cache; :mod:`~metatut.engine.verify` runs that check);
* :mod:`~metatut.engine.conventions`: :class:`MetaParams` (model parameters, learned step sizes, per-step copies)
  and the legacy keys of a plain parameter dict (``inner_lr.*``, ``per_step.*``);
* :mod:`~metatut.engine.inner_loop`: the inner loop on closures ``loss(params, task)``, the trajectory,
  :func:`inner_step`, :func:`adapt` (the ``TaskBatch`` + ``loss_fn`` form as a thin layer on top);
* :mod:`~metatut.engine.inner_optimizers`: the inner optimisers (:func:`sgd`, :func:`sgd_momentum`, :func:`adam`,
  TorchOpt's transformations) behind the :class:`InnerOptimizer` protocol;
* :mod:`~metatut.engine.execution`: the loop, vmap, task threads, per-task backward, checkpointing;
* :mod:`~metatut.engine.meta_loss`: task losses, :func:`maml_loss`, the objectives;
* :mod:`~metatut.engine.reptile`: Reptile's surrogate loss.

Input checks live in :mod:`metatut.validate`; :mod:`metatut.functional` re-exports the public names.
"""
from .conventions import (
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
from .execution import accumulated_meta_loss, batched_tasks, tasks_batched
from .inner_loop import ClosureLoss, LossFn, Task, adapt, closure_losses, inner_step
from .inner_optimizers import (
    Adam,
    InnerOptimizer,
    SGD,
    SGDMomentum,
    TorchOptAdapter,
    adam,
    as_inner_optimizer,
    inner_adam,
    inner_sgd,
    inner_sgd_momentum,
    sgd,
    sgd_momentum,
)
from .meta_loss import (
    MAMLObjective,
    maml_loss,
    maml_objective,
    meta_gradient,
    compute_maml_loss,
    msl_weights,
    per_task_losses,
    summed_loss_objective,
    summed_task_loss,
    task_loss,
)
from .options import ExecutionOptions, MetaOptions
from .policy import (
    VMAP_UNSAFE_LAYERS,
    VMAP_VERIFIED_LAYERS,
    VectorizeError,
    VectorizeWarning,
    can_vectorize,
    forget_verdict,
    judge,
    prefers_vmap,
    register_vmap_verified,
)
from .reptile import reptile_loss, reptile_objective

__all__ = [
    "MetaOptions", "ExecutionOptions", "LossFn", "VMAP_VERIFIED_LAYERS", "VMAP_UNSAFE_LAYERS", "VectorizeError",
    "VectorizeWarning", "can_vectorize", "prefers_vmap", "judge", "register_vmap_verified", "forget_verdict",
    "MetaParams", "LEARNED_LR_PREFIX", "PER_STEP_PREFIX", "learned_inner_lrs", "split_learned_lrs", "final_layer_names",
    "batch_norm_names", "per_step_params", "per_step_buffers", "inner_step", "adapt", "accumulated_meta_loss",
    "batched_tasks", "tasks_batched",
    "task_loss", "per_task_losses", "summed_task_loss", "maml_loss", "compute_maml_loss", "MAMLObjective", "maml_objective",
    "msl_weights", "meta_gradient", "summed_loss_objective", "reptile_loss", "reptile_objective",
    "ClosureLoss", "Task", "closure_losses", "InnerOptimizer", "SGD", "SGDMomentum", "Adam", "TorchOptAdapter", "sgd",
    "sgd_momentum", "adam", "as_inner_optimizer", "inner_sgd", "inner_sgd_momentum", "inner_adam",
]
