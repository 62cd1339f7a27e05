"""adapted_accuracy / adapted_logits / adapted_predictor score the query set as the meta-loss does: with MAML++'s
per-step parameters of the last step (a bug once scored it with the module's own batch-norm weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

import metatut as mt


def _setup(steps=2):
    torch.manual_seed(0)
    model = mt.conv4(3, hidden=4, seed=0).double()
    params = mt.init_params(model)
    per_step = mt.per_step_params(params, mt.batch_norm_names(model), steps)
    generator = torch.Generator().manual_seed(1)
    # per-step copies that differ from each other and from the originals, so a wrong choice cannot hide
    per_step = {k: v + 0.5 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in per_step.items()}
    episodes = mt.sample_episodes(torch.rand(6, 3, 28, 28, generator=generator), 2,
                                  n_way=3, k_shot=1, q_query=2, generator=generator)
    episodes = mt.TaskBatch(episodes.support_x.double(), episodes.support_y, episodes.query_x.double(),
                            episodes.query_y)
    return model, {**params, **per_step}, episodes


def _reference_logits(model, params, episodes, steps, inner_lr):
    """The per-task loop written out: SGD steps with step k's per-step copies, the query with step `steps`'."""
    names = mt.batch_norm_names(model)

    def copy(k, n):  # the per-step copy of parameter n at step k, in either key spelling
        return params[f"per_step:{k}:{n}"] if f"per_step:{k}:{n}" in params else params[f"per_step.{k}.{n}"]

    theta = {k: v for k, v in params.items() if not k.startswith(("per_step", "inner_lr")) and k not in names}
    out = []
    for t in range(episodes.num_tasks):
        p = dict(theta)
        for k in range(steps):
            at_k = {n: copy(k, n) for n in names}
            with torch.enable_grad():
                leaves = {n: v.detach().requires_grad_() for n, v in p.items()}
                loss = F.cross_entropy(functional_call(model, {**leaves, **at_k}, (episodes.support_x[t],)),
                                       episodes.support_y[t])
                grads = torch.autograd.grad(loss, list(leaves.values()))
            p = {n: v.detach() - inner_lr * g for (n, v), g in zip(leaves.items(), grads, strict=True)}
        last = {n: copy(steps, n) for n in names}
        out.append(functional_call(model, {**p, **last}, (episodes.query_x[t],)))
    return torch.stack(out)


def test_adapted_logits_use_the_last_steps_per_step_parameters():
    steps, inner_lr = 2, 0.3
    model, params, episodes = _setup(steps)
    assert any(k.startswith("per_step") for k in params), sorted(params)[:5]
    got = mt.adapted_logits(model, params, episodes, inner_lr=inner_lr, steps=steps, vectorize=False)
    want = _reference_logits(model, params, episodes, steps, inner_lr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    batched = mt.adapted_logits(model, params, episodes, inner_lr=inner_lr, steps=steps, vectorize=True)
    torch.testing.assert_close(batched, want, rtol=1e-10, atol=1e-12)
    accuracy = mt.adapted_accuracy(model, params, episodes, inner_lr=inner_lr, steps=steps)
    torch.testing.assert_close(accuracy, (want.argmax(-1) == episodes.query_y).double().mean(-1).to(accuracy.dtype))
    predict = mt.adapted_predictor(model, params, inner_lr=inner_lr, steps=steps)
    labels = predict(episodes.support_x[1], episodes.support_y[1], episodes.query_x[1])
    assert torch.equal(labels, want[1].argmax(-1))


def test_per_step_parameters_for_fewer_steps_than_asked_are_refused():
    model, params, episodes = _setup(steps=1)
    try:
        mt.adapted_accuracy(model, params, episodes, inner_lr=0.3, steps=3)
    except ValueError as error:
        assert "per-step parameters" in str(error)
    else:
        raise AssertionError("scoring 3 steps with per-step copies for 0..1 must be refused")
