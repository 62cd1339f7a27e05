"""conv4 (shapes, batch-norm settings, MAML meta-gradient) and Prototypical Networks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metatut
import metatut as mt
from metatut.conv import conv4
from metatut.protonet import (
    accuracy, embed_episodes, protonet_accuracy, protonet_logits, protonet_loss, protonet_objective,
    protonet_predictor, prototypes,
)
from metatut.tasks.base import TaskBatch
from metatut.tasks.episodes import EpisodeSampler, sample_episodes

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("METATUT_SHARED_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))


pytestmark = pytest.mark.usefixtures("one_thread")


def random_images(classes=8, per_class=20, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (classes, per_class, 28, 28), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ conv4
def test_conv4_shapes_and_parameter_count():
    x = torch.rand(6, 1, 28, 28)
    model = conv4(5, seed=0)
    assert model(x).shape == (6, 5) and model.embedding_dim == 64
    conv = lambda c_in, c_out: c_in * c_out * 9 + c_out            # noqa: E731
    expected = conv(1, 64) + 3 * conv(64, 64) + 4 * 2 * 64 + (64 * 5 + 5)
    assert metatut.count_parameters(metatut.init_params(model)) == expected
    assert conv4(None, hidden=8)(x).shape == (6, 8)
    strided = conv4(5, downsample="stride")
    assert strided(x).shape == (6, 5) and strided.final_size == 2 and strided.embedding_dim == 64
    assert conv4(3, batch_norm="none", hidden=4)(x).shape == (6, 3)
    assert torch.equal(conv4(5, seed=3)(x), conv4(5, seed=3)(x))
    with pytest.raises(ValueError, match=r"Conv4 expects input \[batch, 1, 28, 28\]"):
        model(torch.rand(6, 28, 28))


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_norm="group"), r"batch_norm must be one of \('batch', 'running', 'none'\)"),
    (dict(downsample="avg"), "downsample must be one of"),
    (dict(hidden=0), "hidden must be an int >= 1"),
    (dict(num_classes=0), "num_classes must be an int >= 2"),           # a 1-class head: loss exactly 0
    (dict(image_size=8), "image_size must be an int >= 16"),
])
def test_conv4_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv4(**kwargs)


def test_batch_norm_setting_is_recorded_and_transductive():
    model = conv4(5, hidden=8, seed=0).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.batch_norm == "batch" and "batch_norm='batch'" in repr(model)
    assert len(norms) == 4 and not any(m.track_running_stats for m in norms) and list(model.buffers()) == []
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Batch statistics even in eval mode: one query's logits depend on the others in its batch.
        assert not torch.allclose(model(x)[:5], model(x[:5]))
        running = conv4(5, hidden=8, batch_norm="running", seed=0).eval()
        assert torch.allclose(running(x)[:5], running(x[:5]), atol=1e-6)   # per-example at test time


def test_conv4_vmap_is_verified_but_auto_keeps_the_loop_and_works_functionally():
    model = conv4(5, hidden=4, seed=0)
    # batch norm with batch statistics is TaskBatchNorm2d, exact under vmap (tests/test_batched_conv.py)
    assert metatut.can_vectorize(model) is True and metatut.prefers_vmap(model) is False   # the loop on a CPU
    assert metatut.can_vectorize(conv4(5, hidden=4, batch_norm="none")) is True
    assert metatut.prefers_vmap(conv4(5, hidden=4, batch_norm="none")) is False   # slower than the loop on a CPU
    params = {k: v * 2 for k, v in metatut.init_params(model).items()}
    x = torch.rand(3, 1, 28, 28)
    assert not torch.allclose(functional_call(model, params, (x,)), model(x))


def reference_maml_gradient(model, params, batch, inner_lr, steps):
    """Meta-gradient by an explicit loop over tasks with torch.autograd.grad (written independently)."""
    names = list(params)
    leaves = [params[n].detach().clone().requires_grad_() for n in names]
    total = 0
    for t in range(batch.num_tasks):
        fast = list(leaves)
        for _ in range(steps):
            logits = functional_call(model, dict(zip(names, fast, strict=True)), (batch.support_x[t],))
            grads = torch.autograd.grad(F.cross_entropy(logits, batch.support_y[t]), fast, create_graph=True)
            fast = [w - inner_lr * g for w, g in zip(fast, grads, strict=True)]
        logits = functional_call(model, dict(zip(names, fast, strict=True)), (batch.query_x[t],))
        total = total + F.cross_entropy(logits, batch.query_y[t])
    loss = total / batch.num_tasks
    return loss, dict(zip(names, torch.autograd.grad(loss, leaves), strict=True))


def test_maml_meta_gradient_through_conv4_matches_a_per_task_loop():
    model = conv4(3, hidden=3, seed=0).double()
    params = metatut.init_params(model)
    batch = sample_episodes(random_images(), 2, n_way=3, k_shot=2, q_query=2,
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = dict(inner_lr=0.4, inner_steps=2, loss_fn=F.cross_entropy, vectorize=False)
    loss, grads = metatut.meta_gradient(metatut.maml_objective(model, **options), params, batch)
    ref_loss, ref_grads = reference_maml_gradient(model, params, batch, inner_lr=0.4, steps=2)
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in params:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12), name
    # And against central finite differences along a random direction (independent of autograd).
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                 for i, (k, v) in enumerate(params.items())}
    eps = 1e-6

    def at(sign):
        shifted = {k: (v + sign * eps * direction[k]).detach() for k, v in params.items()}
        return metatut.maml_loss(model, shifted, batch, **options)

    numeric = (at(1) - at(-1)) / (2 * eps)
    analytic = sum((grads[k] * direction[k]).sum() for k in params)
    assert torch.allclose(numeric, analytic, rtol=1e-5, atol=1e-8)
    first_order = metatut.meta_gradient(metatut.maml_objective(model, first_order=True, **options), params, batch)[1]
    assert not torch.allclose(first_order["head.weight"], grads["head.weight"])   # the Hessian term matters


def test_maml_meta_train_runs_on_conv4_episodes():
    model = conv4(3, hidden=4, seed=0)
    params = metatut.init_params(model)
    sampler = EpisodeSampler(random_images(), n_way=3, k_shot=1, q_query=2, num_tasks=2)
    objective = metatut.maml_objective(model, inner_lr=0.4, loss_fn=F.cross_entropy, vectorize=False)
    result = metatut.meta_train(objective, params, sampler, steps=2, generator=torch.Generator().manual_seed(0),
                                progress_bar=False, check=False)
    assert result.losses.shape == (2,) and torch.isfinite(result.losses).all()


# ----------------------------------------------------------------------------------------- ProtoNets
def test_prototypes_match_a_manual_loop():
    generator = torch.Generator().manual_seed(0)
    tasks, n_way, dim = 3, 4, 5
    counts = [3, 1, 2, 4]                                          # uneven shots work too
    labels = torch.stack([torch.tensor([c for c, k in enumerate(counts) for _ in range(k)])[torch.randperm(10, generator=generator)]
                          for _ in range(tasks)])
    embeddings = torch.randn(tasks, 10, dim, generator=generator, dtype=torch.float64)
    protos = prototypes(embeddings, labels, n_way)
    assert protos.shape == (tasks, n_way, dim)
    for t in range(tasks):
        for c in range(n_way):
            rows = [embeddings[t, i] for i in range(10) if labels[t, i] == c]
            assert torch.allclose(protos[t, c], sum(rows) / len(rows))
    with pytest.raises(ValueError, match="every class 0..4 needs at least one support example"):
        prototypes(embeddings, labels, 5)
    with pytest.raises(ValueError, match="embeddings must be"):
        prototypes(embeddings[0], labels[0], n_way)


def test_logits_are_negative_squared_distances():
    generator = torch.Generator().manual_seed(1)
    query, protos = torch.randn(2, 7, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    assert protonet_logits(query, protos).shape == (2, 7, 4)
    assert torch.allclose(protonet_logits(query, protos), -torch.cdist(query, protos) ** 2, atol=1e-5)
    logits = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    assert accuracy(logits, torch.tensor([[1, 0, 0], [0, 0, 1]])).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_protonet_loss_by_hand_and_training_step():
    model = conv4(None, hidden=4, seed=0)
    params = metatut.init_params(model)
    batch = sample_episodes(random_images(), 2, n_way=3, k_shot=2, q_query=3, generator=torch.Generator().manual_seed(0))
    expected = 0
    for t in range(2):
        z = model(torch.cat([batch.support_x[t], batch.query_x[t]]))   # support and query in one batch
        s, q = z[:6], z[6:]
        protos = torch.stack([s[batch.support_y[t] == c].mean(0) for c in range(3)])
        logits = -((q[:, None] - protos[None]) ** 2).sum(-1)
        expected = expected + F.cross_entropy(logits, batch.query_y[t]) / 2
    loss = protonet_loss(model, params, batch, 3)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(protonet_loss(model, params, batch, 3, reduction="sum"), 2 * expected, rtol=1e-5)
    support, query = embed_episodes(model, params, batch)
    assert support.shape == (2, 6, 4) and query.shape == (2, 9, 4)
    assert protonet_accuracy(model, params, batch, 3).shape == (2,)
    sampler = EpisodeSampler(random_images(), n_way=3, k_shot=2, q_query=3, num_tasks=2)
    result = metatut.meta_train(protonet_objective(model, 3), params, sampler, steps=3,
                                generator=torch.Generator().manual_seed(0), progress_bar=False, check=False)
    assert torch.isfinite(result.losses).all()
    with pytest.raises(ValueError, match="reduction must be one of"):
        protonet_loss(model, params, batch, 3, reduction="max")


def test_protonet_with_identity_embedding_is_pixel_nearest_neighbour():
    """One shot, identity embedding: the nearest prototype is the nearest support image."""
    if not (SHARED / "all_runs.zip").is_file():
        pytest.skip(f"the offline Omniglot copy is not at {SHARED} (set METATUT_SHARED_OMNIGLOT)")
    from metatut.data import evaluate_one_shot, load_one_shot_runs, pixel_nearest_neighbour
    runs = load_one_shot_runs(SHARED / "all_runs.zip")
    identity = nn.Flatten()
    as_protonet = evaluate_one_shot(protonet_predictor(identity, {}), runs, dtype=torch.float64)
    baseline = evaluate_one_shot(pixel_nearest_neighbour, runs, dtype=torch.float64)
    assert torch.equal(as_protonet.errors, baseline.errors)
    batch = runs.task_batch(dtype=torch.float64)
    assert isinstance(batch, TaskBatch)
    assert torch.allclose(protonet_accuracy(identity, {}, batch, 20), 1 - baseline.errors)


def test_adapted_predictor_agrees_with_adapted_accuracy():
    model = mt.conv4(3, hidden=4, seed=0)
    params = mt.init_params(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 12, 1, 28, 28, generator=g)
    y = torch.arange(3).repeat(4)[None]
    batch = mt.TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    predict = mt.adapted_predictor(model, params, inner_lr=0.4, steps=2)
    labels = predict(batch.support_x[0], batch.support_y[0], batch.query_x[0])
    accuracy = mt.adapted_accuracy(model, params, batch, inner_lr=0.4, steps=2)
    assert labels.shape == (9,)
    assert accuracy.item() == pytest.approx((labels == batch.query_y[0]).float().mean().item())
