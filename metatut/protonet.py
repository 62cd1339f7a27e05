r"""Prototypical Networks (Snell, Swersky & Zemel, 2017).

An embedding network :math:`f_\phi` maps images to vectors; the prototype of class :math:`c` is the mean
embedding of its support examples, :math:`p_c = \frac{1}{K}\sum_{(x, c) \in S} f_\phi(x)`, and a query is
classified by a softmax over negative squared Euclidean distances, :math:`-\lVert f_\phi(x) - p_c\rVert^2`.
Training minimises the cross-entropy of the query labels over episodes; there is no inner loop.

Within a task, support and query images go through the network in one batch (as in the paper's code),
so with batch-statistics normalisation (:func:`metatut.conv4` default) the embeddings are transductive.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .models import Params
from .tasks.base import TaskBatch
from .validate import check_n_way, check_positive_int, check_reduction

__all__ = ["prototypes", "protonet_logits", "embed_episodes", "protonet_loss", "protonet_objective",
           "accuracy", "protonet_accuracy", "protonet_predictor"]


def prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means: ``embeddings [tasks, N*K, D]``, ``labels [tasks, N*K]`` in ``0..n_way-1`` -> ``[tasks, N, D]``.

    Works for any number of examples per class (each class needs at least one).

    Example::

        >>> prototypes(torch.tensor([[[0.0], [2.0], [5.0]]]), torch.tensor([[0, 0, 1]]), 2)
        tensor([[[1.],
                 [5.]]])
    """
    check_positive_int("n_way", n_way)
    if embeddings.dim() != 3 or labels.shape != embeddings.shape[:2]:
        raise ValueError(f"embeddings must be [tasks, examples, D] and labels [tasks, examples] "
                         f"(got {tuple(embeddings.shape)} and {tuple(labels.shape)})")
    one_hot = F.one_hot(labels.long(), n_way).to(embeddings.dtype)        # [tasks, examples, N]
    counts = one_hot.sum(dim=1)                                            # [tasks, N]
    if bool((counts == 0).any()):
        raise ValueError(f"every class 0..{n_way - 1} needs at least one support example in every task")
    return one_hot.transpose(1, 2) @ embeddings / counts.unsqueeze(-1)


def protonet_logits(query_embeddings: Tensor, protos: Tensor) -> Tensor:
    """Negative squared Euclidean distances: ``[tasks, M, D]`` and ``[tasks, N, D]`` -> ``[tasks, M, N]``.

    Example::

        >>> protonet_logits(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
        tensor([[[-0., -5.]]])
    """
    return -(query_embeddings.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


def embed_episodes(model: nn.Module, params: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
    """Embed each task's support and query images together (one forward pass per task).

    Returns ``support [tasks, N*K, D]`` and ``query [tasks, N*Q, D]`` (model outputs flattened to ``D``).

    Example::

        >>> import metatut as mt
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        >>> episodes = mt.sample_episodes(torch.rand(5, 4, 4, 4), 2, n_way=3, k_shot=1, q_query=2)
        >>> [tuple(z.shape) for z in embed_episodes(model, mt.init_params(model), episodes)]
        [(2, 3, 8), (2, 6, 8)]
    """
    shots = batch.shots
    support, query = [], []
    for t in range(batch.num_tasks):
        z = functional_call(model, params, (torch.cat([batch.support_x[t], batch.query_x[t]]),)).flatten(1)
        support.append(z[:shots])
        query.append(z[shots:])
    return torch.stack(support), torch.stack(query)


def protonet_loss(model: nn.Module, params: Params, batch: TaskBatch, n_way: int, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the query labels under :func:`protonet_logits`: per task the mean over its queries,
    then the mean (``reduction='mean'``) or sum (``'sum'``) over tasks. Differentiable in ``params``; a scalar.

    Example::

        >>> import metatut as mt
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        >>> episodes = mt.sample_episodes(torch.rand(5, 4, 4, 4), 2, n_way=3, k_shot=1, q_query=2)
        >>> protonet_loss(model, mt.init_params(model), episodes, n_way=3).shape
        torch.Size([])
    """
    check_n_way(n_way)
    check_reduction(reduction)
    support, query = embed_episodes(model, params, batch)
    logits = protonet_logits(query, prototypes(support, batch.support_y, n_way))       # [tasks, M, N]
    losses = F.cross_entropy(logits.transpose(1, 2), batch.query_y.long(), reduction="none").mean(dim=1)
    return losses.mean() if reduction == "mean" else losses.sum()


def protonet_objective(model: nn.Module, n_way: int, **options) -> Callable[[Params, TaskBatch], Tensor]:
    """``objective(params, batch)`` for :func:`metatut.meta_train`: :func:`protonet_loss` with fixed options.

    Example::

        >>> objective = protonet_objective(nn.Flatten(), n_way=3, reduction="sum")
        >>> objective.keywords
        {'n_way': 3, 'reduction': 'sum'}
    """
    check_n_way(n_way)
    return partial(protonet_loss, model, n_way=n_way, **options)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions per task: ``logits [tasks, M, N]``, ``labels [tasks, M]`` -> ``[tasks]``.

    Example::

        >>> accuracy(torch.tensor([[[0.9, 0.1], [0.2, 0.8]]]), torch.tensor([[0, 0]]))
        tensor([0.5000])
    """
    dtype = logits.dtype if logits.is_floating_point() else torch.get_default_dtype()
    return (logits.argmax(dim=-1) == labels).to(dtype).mean(dim=-1)


@torch.no_grad()
def protonet_accuracy(model: nn.Module, params: Params, batch: TaskBatch, n_way: int) -> Tensor:
    """Query accuracy of each task ``[tasks]`` (no gradient).

    Example::

        >>> import metatut as mt
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        >>> episodes = mt.sample_episodes(torch.rand(5, 4, 4, 4), 2, n_way=3, k_shot=1, q_query=2)
        >>> protonet_accuracy(model, mt.init_params(model), episodes, n_way=3).shape
        torch.Size([2])
    """
    check_n_way(n_way)
    support, query = embed_episodes(model, params, batch)
    return accuracy(protonet_logits(query, prototypes(support, batch.support_y, n_way)), batch.query_y)


def protonet_predictor(model: nn.Module, params: Params) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``predict(support_x [S, ...], support_y [S], query_x [M, ...]) -> labels [M]`` for one task, e.g. for
    :func:`metatut.data.evaluate_one_shot`; the number of classes is ``support_y.max() + 1``.

    Example::

        >>> model = nn.Flatten()
        >>> predict = protonet_predictor(model, {})
        >>> support = torch.tensor([[[0.0]], [[10.0]]])
        >>> predict(support, torch.tensor([0, 1]), torch.tensor([[[9.0]], [[1.0]]]))
        tensor([1, 0])
    """
    def predict(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        with torch.no_grad():
            z = functional_call(model, params, (torch.cat([support_x, query_x]),)).flatten(1)
            protos = prototypes(z[None, :len(support_x)], support_y[None], int(support_y.max()) + 1)
            return protonet_logits(z[None, len(support_x):], protos)[0].argmax(dim=-1)
    return predict
