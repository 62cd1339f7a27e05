"""What a training run is made of: its device, model, objective, task sampler and evaluation.

Everything here that can fail for a configuration reason raises :class:`~metatut.run.config.ConfigError`
before the first file of the run is written; ``compile`` and ``task_workers`` are checked against the model
before any data is loaded.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import functional as fn
from ..accel import compile_objective, maml_device
from ..device import make_generator, pick_device
from ..distributed import stream_seed
from ..evaluate import adapted_accuracy, evaluate_adaptation, summarize
from ..models import init_params, mlp
from ..tasks.regression import SinusoidTasks
from .config import FIRST_ORDER, MAML_FAMILY, SECOND_ORDER, ConfigError, TrainConfig, check_classes

__all__ = ["Parts", "select_device", "make_model", "check_speed_options", "execution_path", "build", "evaluate", "omniglot_split",
           "check_split"]

#: The seed of the evaluation's task stream (its tasks differ from every training stream's).
EVAL_STREAM = 999_983


@dataclass
class Parts:
    """What :func:`build` makes: the model on its device, the meta-parameters, the objective, the task loss,
    ``sample(n, generator)`` (``n`` tasks of one stream) and the held-out images (Omniglot) or None."""

    model: torch.nn.Module
    params: dict
    objective: Callable
    loss_fn: Callable
    sample: Callable
    held_out: torch.Tensor | None


def select_device(cfg: TrainConfig) -> torch.device:
    """The run's device: ``cfg.device`` or :func:`metatut.pick_device`'s choice, the process's own GPU under
    ``torchrun`` (``LOCAL_RANK``), and for algorithms that differentiate twice (maml, anil, metasgd)
    :func:`metatut.accel.maml_device`'s CPU fallback where the device cannot (some of Apple MPS).

    Example::

        >>> select_device(TrainConfig(device="cpu"))
        device(type='cpu')
    """
    try:
        device = pick_device(cfg.device)
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        return maml_device(device, second_order=cfg.algorithm in SECOND_ORDER)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"device: {e}") from None


def make_model(cfg: TrainConfig) -> torch.nn.Module:
    """The network of ``cfg`` (``width`` resolved): an MLP 1-w-w-1 (sinusoid) or conv4 with ``width`` filters.

    Example::

        >>> make_model(TrainConfig().resolved())[0]
        Linear(in_features=1, out_features=40, bias=True)
    """
    width = cfg.resolved().width
    if cfg.task == "sinusoid":
        return mlp(hidden=(width, width), seed=cfg.seed)
    from ..conv import conv4
    return conv4(None if cfg.algorithm == "protonet" else cfg.n_way, hidden=width, seed=cfg.seed)


def _no_objective(*args, **kwargs):  # pragma: no cover - never called
    raise AssertionError


def execution_path(cfg: TrainConfig, model, device=None) -> str:
    """How the run computes its meta-batch on ``device``: ``'batched'`` (all tasks at once under vmap, the
    engine's ``vectorize='auto'`` choice, :func:`metatut.prefers_vmap`) or ``'loop'`` (one task at a time).
    Recorded in the run's ``config.json`` as ``execution_path`` (derived, not a setting).

    Example::

        >>> execution_path(TrainConfig(), make_model(TrainConfig()))             # the sinusoid MLP
        'batched'
        >>> omniglot = TrainConfig(task="omniglot", width=8)
        >>> execution_path(omniglot, make_model(omniglot), "cpu"), execution_path(omniglot, make_model(omniglot), "cuda")
        ('loop', 'batched')
    """
    if cfg.algorithm not in MAML_FAMILY:
        return "loop"
    return "batched" if fn.prefers_vmap(model, device=device) else "loop"


def check_speed_options(cfg: TrainConfig, model, device=None) -> None:
    """``compile`` and ``task_workers`` against the model (on ``device``, default the model's), before any data
    is loaded.

    Example::

        >>> cfg = TrainConfig(task_workers=2)
        >>> check_speed_options(cfg, make_model(cfg))      # an MLP has no buffers: fine
    """
    if cfg.compile and not fn.prefers_vmap(model, device=device) and cfg.algorithm not in FIRST_ORDER:
        try:  # raises before compiling anything for this combination; its message names the reason
            compile_objective(_no_objective, enabled=True, vectorized=False, first_order=False)
            reason = "compile=True needs the vmap path or first-order MAML"
        except ValueError as e:
            reason = str(e)
        raise ConfigError(f"compile: {reason} (task={cfg.task!r} runs the per-task loop, algorithm={cfg.algorithm!r} "
                          f"is second order); set compile=false or use one of {FIRST_ORDER}")
    if cfg.task_workers > 1 and cfg.algorithm in MAML_FAMILY and any(True for _ in model.buffers()):
        raise ConfigError(f"task_workers={cfg.task_workers} needs a model without buffers (batch-norm running "
                          "statistics would be updated in a thread's copy only); set task_workers=1")


def omniglot_split(cfg: TrainConfig):
    """The full set with the MAML split, or the small offline sets with the split that notebooks 05/06 and
    the pretrained checkpoints use (``fraction_split(seed=0)``). Loads (and may download) data, so it has no
    example here; see :func:`metatut.data.load_omniglot`."""
    from ..data import SMALL_ZIPS, fraction_split, load_omniglot, maml_split, offline_omniglot_dir
    if cfg.dataset == "full":
        return maml_split(load_omniglot("full", root=cfg.data_root, download=True))
    root = cfg.data_root or offline_omniglot_dir(SMALL_ZIPS)
    return fraction_split(load_omniglot("small", root=root, download=root is None), seed=0)


def check_split(cfg: TrainConfig, split) -> None:
    """The loaded split must have ``n_way`` classes in each part and ``shots + query`` images per class.

    Example::

        >>> from types import SimpleNamespace
        >>> part = lambda n: SimpleNamespace(images=torch.zeros(n, 20, 1, 1))
        >>> split = SimpleNamespace(train=part(30), val=part(10), test=part(10))
        >>> check_split(TrainConfig(task="omniglot", n_way=5, shots=1, query=5), split)
    """
    classes = {"train": len(split.train.images), "validation": len(split.val.images), "test": len(split.test.images)}
    check_classes(cfg, classes)
    per_class = min(int(s.images.shape[1]) for s in (split.train, split.val, split.test))
    if cfg.shots + cfg.query > per_class:
        raise ConfigError(f"shots + query must be <= {per_class} (the images per class of this Omniglot data; "
                          f"got {cfg.shots} + {cfg.query})")


def _tasks(cfg: TrainConfig, device: torch.device, load_split: Callable):
    """``(loss_fn, sample, held_out)`` of the task."""
    if cfg.task == "sinusoid":
        tasks = SinusoidTasks()

        def sample(n, generator):
            return tasks.sample(n, cfg.shots, cfg.query, generator=generator)
        return F.mse_loss, sample, None
    from ..tasks.episodes import sample_episodes
    try:
        split = load_split(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"Omniglot data (dataset={cfg.dataset!r}, data_root={cfg.data_root!r}): {e}") from None
    check_split(cfg, split)
    images = split.train.images.to(device)

    def sample_omniglot(n, generator):
        return sample_episodes(images, n, cfg.n_way, cfg.shots, cfg.query, generator=generator)
    return F.cross_entropy, sample_omniglot, split.test.images.to(device)


def _meta_params(cfg: TrainConfig, model) -> dict:
    """The meta-parameters of ``cfg.algorithm``: the model's, and Meta-SGD's learned step sizes in a
    :class:`~metatut.MetaParams` (flat keys ``inner_lr:<name>``, after the model's, as in its checkpoints)."""
    params = init_params(model)
    if cfg.algorithm == "metasgd":
        return fn.MetaParams(params).with_learned_lrs(init=cfg.inner_lr)
    return params


def _objective(cfg: TrainConfig, model, loss_fn: Callable) -> Callable:
    """The meta-objective of ``cfg.algorithm``."""
    options = dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, loss_fn=loss_fn)
    if cfg.algorithm in MAML_FAMILY:
        # each task's graph is freed as soon as it is differentiated: memory of one task, not of the meta-batch
        options.update(task_workers=cfg.task_workers, per_task_backward=True)
    if cfg.algorithm in ("maml", "fomaml"):
        objective = fn.maml_objective(model, first_order=cfg.algorithm == "fomaml", **options)
    elif cfg.algorithm == "anil":
        objective = fn.maml_objective(model, adapt_names=fn.final_layer_names(model), **options)
    elif cfg.algorithm == "metasgd":
        objective = fn.maml_objective(model, **{**options, "inner_lr": "learned"})
    elif cfg.algorithm == "reptile":
        objective = fn.reptile_objective(model, **options)
    else:
        from ..protonet import protonet_objective
        objective = protonet_objective(model, cfg.n_way)
    try:
        return compile_objective(objective, enabled=cfg.compile, vectorized=fn.prefers_vmap(model),
                                 first_order=cfg.algorithm in FIRST_ORDER)
    except ValueError as e:
        raise ConfigError(f"compile: {e}") from None


def build(cfg: TrainConfig, device: torch.device, model, load_split: Callable = omniglot_split) -> Parts:
    """Objective, loss function and a sampler of ``n`` tasks from one stream, for ``model`` on ``device``.
    ``load_split(cfg)`` loads Omniglot (the training command passes its own, which tests replace).

    Example::

        >>> cfg = TrainConfig(steps=2, meta_batch=2).resolved()
        >>> parts = build(cfg, torch.device("cpu"), make_model(cfg))
        >>> parts.sample(3, make_generator(0)).support_x.shape
        torch.Size([3, 10, 1])
    """
    model = model.to(device)
    loss_fn, sample, held_out = _tasks(cfg, device, load_split)
    params = _meta_params(cfg, model)
    objective = _objective(cfg, model, loss_fn)
    return Parts(model, params, objective, loss_fn, sample, held_out)


def evaluate(cfg: TrainConfig, parts: Parts, device: torch.device) -> dict:
    """Adapt to ``eval_tasks`` new tasks (a fixed seeded stream) and score: MSE (sinusoid) or accuracy
    (Omniglot, the held-out classes), each with its 95% confidence interval.

    Example::

        >>> cfg = TrainConfig(eval_tasks=4, eval_inner_steps=1).resolved()
        >>> parts = build(cfg, torch.device("cpu"), make_model(cfg))
        >>> sorted(evaluate(cfg, parts, torch.device("cpu")))
        ['eval_mse', 'eval_mse_ci95']
    """
    generator = make_generator(stream_seed(cfg.seed, EVAL_STREAM), device)
    adapt_lr = "learned" if cfg.algorithm == "metasgd" else cfg.inner_lr
    adapt_names = fn.final_layer_names(parts.model) if cfg.algorithm == "anil" else None
    if cfg.task == "sinusoid":
        batch = parts.sample(cfg.eval_tasks, generator)
        scores = evaluate_adaptation(parts.model, parts.params, batch, inner_lr=adapt_lr,
                                     steps=(0, cfg.eval_inner_steps), adapt_names=adapt_names)
        return {"eval_mse": scores[cfg.eval_inner_steps].mean, "eval_mse_ci95": scores[cfg.eval_inner_steps].ci95}
    from ..tasks.episodes import sample_episodes
    batch = sample_episodes(parts.held_out, cfg.eval_tasks, cfg.n_way, cfg.shots, cfg.query, generator=generator)
    if cfg.algorithm == "protonet":
        from ..protonet import protonet_accuracy
        acc = protonet_accuracy(parts.model, parts.params, batch, cfg.n_way)
    else:
        acc = adapted_accuracy(parts.model, parts.params, batch, inner_lr=adapt_lr, steps=cfg.eval_inner_steps,
                               adapt_names=adapt_names, loss_fn=parts.loss_fn)
    s = summarize(acc)
    return {"eval_accuracy": s.mean, "eval_accuracy_ci95": s.ci95}
