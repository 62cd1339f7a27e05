"""metatut: a small, tested toolkit for meta-learning (MAML and friends) in functional PyTorch.

A model is an ``nn.Module`` plus a dict of parameters; algorithms are pure functions of
``(params, task batch)``. Start with::

    import metatut as mt
    model = mt.mlp()
    params = mt.init_params(model)
    loss = mt.maml_loss(model, params, batch, inner_lr=0.01)
"""
from .budget import data_dir, pick, profile
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .device import make_generator, pick_device
from .evaluate import (
    Summary,
    adaptation_curve,
    adapted_accuracy,
    adapted_logits,
    adapted_predictor,
    evaluate_adaptation,
    held_out_episodes,
    summarize,
)
from . import accel, data, engine, functional, validate
from . import timing
from .conv import Conv4, TaskBatchNorm2d, conv4
from .engine import (
    InnerOptimizer,
    inner_adam,
    inner_sgd,
    inner_sgd_momentum,
)
from .engine import (
    ExecutionOptions,
    MAMLObjective,
    MetaOptions,
    MetaParams,
    VectorizeError,
    VectorizeWarning,
    adapt,
    can_vectorize,
    register_vmap_verified,
    prefers_vmap,
    final_layer_names,
    inner_step,
    learned_inner_lrs,
    maml_loss,
    maml_objective,
    meta_gradient,
    msl_weights,
    batch_norm_names,
    per_step_buffers,
    per_step_params,
    per_task_losses,
    reptile_loss,
    reptile_objective,
    split_learned_lrs,
    summed_loss_objective,
    summed_task_loss,
    task_loss,
)
from .models import Params, count_parameters, forward, functional_model, init_params, mlp
from .progress import progress
from .protonet import (
    accuracy,
    embed_episodes,
    protonet_accuracy,
    protonet_logits,
    protonet_loss,
    protonet_objective,
    protonet_predictor,
    prototypes,
)
from .tasks import EpisodeSampler, LinearTasks, SinusoidTasks, TaskBatch, sample_episodes
from .train import NonFiniteLossError, TrainResult, meta_train

__version__ = "0.1.0"

__all__ = [
    "Params", "TaskBatch", "SinusoidTasks", "LinearTasks", "Summary", "TrainResult",
    "mlp", "init_params", "forward", "functional_model", "count_parameters",
    "task_loss", "per_task_losses", "summed_task_loss", "inner_step", "adapt", "maml_loss", "maml_objective",
    "summed_loss_objective", "meta_gradient", "adaptation_curve", "can_vectorize", "prefers_vmap",
    "meta_train", "adapted_accuracy", "adapted_logits", "adapted_predictor", "held_out_episodes", "evaluate_adaptation", "summarize", "save_checkpoint", "load_checkpoint",
    "pick_device", "make_generator", "pick", "profile", "data_dir", "progress",
    "MAMLObjective", "msl_weights", "reptile_loss", "reptile_objective", "learned_inner_lrs", "MetaParams", "split_learned_lrs",
    "accel", "timing", "final_layer_names", "per_step_params", "per_step_buffers", "batch_norm_names", "data", "Conv4", "TaskBatchNorm2d", "conv4", "EpisodeSampler", "sample_episodes",
    "prototypes", "protonet_logits", "protonet_loss", "protonet_objective", "protonet_accuracy",
    "protonet_predictor", "accuracy", "embed_episodes", "VectorizeError", "NonFiniteLossError", "CheckpointError",
    "MetaOptions", "ExecutionOptions", "VectorizeWarning", "register_vmap_verified", "engine", "functional", "validate",
    "InnerOptimizer", "inner_sgd", "inner_sgd_momentum", "inner_adam",
]
