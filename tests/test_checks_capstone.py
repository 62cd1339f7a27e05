"""The capstone checkers (exercise 8) accept the solution and reject the stub and typical mistakes with a hint.

The solution is the code of exercises/solutions/07_capstone_maml_omniglot.ipynb, taken from its source with the
generator's own parser (as in tests/test_checks.py); it loads the small Omniglot sets (offline copy, or the
download cache) once for the module.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metatut as mt
from metatut.checks import CheckFailed
from metatut.checks_fewshot import check_episode_sampler
from metatut.course import checks_capstone
from metatut.course.checks_capstone import THRESHOLD, check_capstone, check_train
from exercise_support import fails_with as _fails_with
from exercise_support import shown_in_jupyter as _shown_in_jupyter
from exercise_support import solution as _solution
from exercise_support import stub as _stub

STEM = "07_capstone_maml_omniglot"
train = _solution(STEM, "train")
NS = train.__globals__                 # the solution notebook's namespace: its pieces, split, constants
evaluate, maml_loss, inner_step = NS["evaluate"], NS["maml_loss"], NS["inner_step"]
sample_episode, split = NS["sample_episode"], NS["split"]
N_WAY, K_SHOT, Q_QUERY, INNER_LR = NS["N_WAY"], NS["K_SHOT"], NS["Q_QUERY"], NS["INNER_LR"]
EPISODES = 20                          # episodes per check_capstone call here (the notebook's check uses 50)


def test_exports():
    assert set(checks_capstone.__all__) == {"CheckFailed", "THRESHOLD", "check_train", "check_capstone"}
    assert checks_capstone.CheckFailed is CheckFailed and 0.2 < THRESHOLD < 1


# ------------------------------------------------------------------------------------------------ train
def _train(*, order="given", zero_grad=True, optimizer="adam", lr=None, reduction="mean", item=True,
           one_batch=False, copy=False, loss_fn=F.cross_entropy):
    """The solution's training loop with one mistake switched on."""
    def mistaken(f, params, sample_batch, steps, inner_lr, meta_lr, create_graph):
        if copy:
            params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        make = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        opt = make(params.values(), lr=meta_lr if lr is None else lr)
        graph = {"given": create_graph, "never": False, "always": True}[order]
        losses, batch = [], None
        for _ in range(steps):
            if batch is None or not one_batch:
                batch = sample_batch()
            loss = maml_loss(f, params, batch, inner_lr, loss_fn=loss_fn, create_graph=graph)
            if reduction == "sum":
                loss = loss * batch.num_tasks
            if zero_grad:
                opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item() if item else loss)
        return losses
    return mistaken


def test_train_reference_passes_with_one_line(capsys):
    assert check_train(train) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✔ check_train passed: "), out


def test_train_correct_variant_passes(capsys):
    check_train(_train())
    assert capsys.readouterr().out.startswith("✔ check_train passed")


TRAIN_MISTAKES = {
    "no create_graph (first order always)": (dict(order="never"), "create_graph=True"),
    "second order always": (dict(order="always"), "create_graph=False the run must be first order"),
    "no zero_grad": (dict(zero_grad=False), "zero_grad"),
    "SGD": (dict(optimizer="sgd"), "torch.optim.Adam"),
    "Adam's default step": (dict(lr=1e-3), "lr=meta_lr"),
    "sum over tasks": (dict(reduction="sum"), "mean"),
    "tensors, not floats": (dict(item=False), "loss.item()"),
    "one batch only": (dict(one_batch=True), "one new meta-batch per iteration"),
    "trains a copy": (dict(copy=True), "did not change"),
    "MSE loss": (dict(loss_fn=F.mse_loss), "loss_fn=F.cross_entropy"),
}


@pytest.mark.filterwarnings("ignore:Using a target size")   # the MSE mistake broadcasts before it fails
@pytest.mark.parametrize("mistake", sorted(TRAIN_MISTAKES))
def test_train_mistakes(mistake):
    options, phrase = TRAIN_MISTAKES[mistake]
    _fails_with(check_train, _train(**options), phrase)


def test_train_stub_fails():
    message = _fails_with(check_train, _stub, "implement the function first")
    assert "NotImplementedError" in message


def test_train_learner_error_shows_hint_then_the_learners_line():
    def broken(*args):
        table = {"bias": 0}
        return table["weight"]  # the learner's bug
    with pytest.raises(CheckFailed, match="raised KeyError") as info:
        check_train(broken)
    shown = _shown_in_jupyter(info.value)
    assert shown[1].startswith("Hint: ")
    assert shown[-3:] == [f'  File "{Path(__file__).resolve()}", line {broken.__code__.co_firstlineno + 2}, in broken',
                          '    return table["weight"]  # the learner\'s bug', "KeyError: 'weight'"], shown


def test_train_fast_and_leaves_global_state_alone(capsys):
    rng, grad_mode = torch.get_rng_state(), torch.is_grad_enabled()
    start = time.perf_counter()
    check_train(train)
    assert time.perf_counter() - start < 5.0
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled() == grad_mode


# -------------------------------------------------------------------------------------------- capstone
@pytest.fixture(scope="module")
def trained():
    """The solution's model, meta-trained briefly (second order) with the solution's own loop, and untrained."""
    model = mt.conv4(N_WAY, hidden=8, seed=0)
    f = mt.functional_model(model)
    params, untrained = mt.init_params(model), mt.init_params(model)
    generator = torch.Generator().manual_seed(0)
    train(f, params, lambda: NS["sample_meta_batch"](split.train.images, 4, generator), 40, INNER_LR, 0.01, True)
    return model, params, untrained


def _check(fn, model, params, **options):
    check_capstone(fn, model, params, split, k_shot=K_SHOT, q_query=Q_QUERY, steps=3, inner_lr=INNER_LR,
                   episodes=EPISODES, **options)


def _evaluate(*, part="test", remap=True, adapt=True, score="query", reduce=False):
    """The solution's evaluate with one mistake switched on."""
    def mistaken(f, params, split, steps, inner_lr, episodes, generator):
        theta = {k: v.detach().requires_grad_() for k, v in params.items()}
        images = getattr(split, part).images
        table = torch.zeros(episodes, steps + 1)
        for e in range(episodes):
            sx, sy, qx, qy = sample_episode(images, N_WAY, K_SHOT, Q_QUERY, generator)
            if not remap:   # labels are the classes' indices in the split (the sampler's classes, in order)
                classes = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(e))[:N_WAY]
                sy, qy = classes[sy], classes[qy]
            x, y = (qx, qy) if score == "query" else (sx, sy)
            adapted = theta
            for s in range(steps + 1):
                if s > 0 and adapt:
                    adapted = inner_step(f, adapted, sx, sy, inner_lr, False, loss_fn=F.cross_entropy)
                with torch.no_grad():
                    table[e, s] = (f(adapted, x).argmax(-1) == y).float().mean()
        return table.mean(0) if reduce else table
    return mistaken


def test_capstone_reference_passes_with_one_line(trained, capsys):
    model, params, _ = trained
    before = {k: v.detach().clone() for k, v in params.items()}
    rng, grad_mode = torch.get_rng_state(), torch.is_grad_enabled()
    _check(evaluate, model, params, threshold=0.3)
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled() == grad_mode
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✔ check_capstone passed: "), out
    assert all(torch.equal(params[k].detach(), v) for k, v in before.items())    # the trained params are untouched


CAPSTONE_MISTAKES = {
    "evaluation on training characters": (dict(part="train"), "training characters"),
    "evaluation on validation characters": (dict(part="val"), "validation characters"),
    "labels not remapped": (dict(remap=False), "remapped"),
    "mean instead of the table": (dict(reduce=True), "the mean over the episodes"),
    "no adaptation": (dict(adapt=False), "does not change with adaptation"),
    "scores the support set": (dict(score="support"), "support set"),
}


@pytest.mark.parametrize("mistake", sorted(CAPSTONE_MISTAKES))
def test_capstone_mistakes(mistake, trained):
    options, phrase = CAPSTONE_MISTAKES[mistake]
    model, params, _ = trained
    with pytest.raises(CheckFailed) as info:
        _check(_evaluate(**options), model, params, threshold=0.3)
    message = str(info.value)
    assert message.startswith("check_capstone failed: ") and message.splitlines()[1].startswith("Hint: "), message
    assert phrase.lower() in message.lower(), message
    _shown_in_jupyter(info.value)


def test_capstone_accuracy_below_threshold(trained):
    model, _, untrained = trained
    with pytest.raises(CheckFailed) as info:
        _check(evaluate, model, untrained)             # the default threshold; an untrained network is near chance
    message = str(info.value)
    assert "below the" in message and "create_graph=True" in message, message


def test_capstone_stub_fails(trained):
    model, params, _ = trained
    with pytest.raises(CheckFailed) as info:
        _check(_stub, model, params)
    shown = _shown_in_jupyter(info.value)
    assert len(shown) == 1 and "implement the function first" in shown[0], shown


def test_labels_not_remapped_is_named_by_the_sampler_check():
    def sampler(images, n_way, k_shot, q_query, generator):        # labels = the classes' indices in `images`
        classes = torch.randperm(images.shape[0], generator=generator)[:n_way]
        drawings = torch.stack([torch.randperm(images.shape[1], generator=generator)[:k_shot + q_query]
                                for _ in range(n_way)])
        pictures = images[classes[:, None], drawings].float() / 255
        return (pictures[:, :k_shot].flatten(0, 1).unsqueeze(1), classes.repeat_interleave(k_shot),
                pictures[:, k_shot:].flatten(0, 1).unsqueeze(1), classes.repeat_interleave(q_query))
    _fails_with(check_episode_sampler, sampler, "remap the labels")
