"""The few-shot exercise checkers accept the solutions and reject the stub and typical mistakes with a hint.

The solutions are the code cells of the solution notebooks, taken from the exercise sources with the
generator's own parser (exercises/generate.py), as in tests/test_checks.py.
"""
from __future__ import annotations


import pytest
import torch

from metatut import checks_fewshot
from metatut.checks import CheckFailed
from metatut.checks_fewshot import check_episode_sampler, check_protonet_logits
from exercise_support import fails_with as _fails_with
from exercise_support import solution as _solution

sample_episode = _solution("05_episode_sampling", "sample_episode")
protonet_logits = _solution("06_protonet_logits", "protonet_logits")


def test_exports_and_exception_class():
    assert set(checks_fewshot.__all__) == {"check_episode_sampler", "check_protonet_logits"}
    assert issubclass(CheckFailed, AssertionError)


# ------------------------------------------------------------------------------------ episode sampler
def _sampler(*, remap=True, leak=False, random_classes=True, use_generator=True, scale=True, channel=True,
             separate_draws=False, drawings="random", classes_order="drawn"):
    """The solution with one mistake switched on.

    drawings: "random" (of all the drawings), "first" (always the first K + Q) or "first-shuffled" (a random
    order of the first K + Q: torch.randperm(k_shot + q_query)); classes_order: "drawn", "sorted" or "unique"
    (torch.unique sorts).
    """
    def sample(images, n_way, k_shot, q_query, generator):
        g = generator if use_generator else None
        classes = torch.randperm(images.shape[0], generator=g)[:n_way] if random_classes else torch.arange(n_way)
        if classes_order == "sorted":
            classes = classes.sort().values
        elif classes_order == "unique":
            classes = classes.unique()
        pool = {"random": images.shape[1], "first": None, "first-shuffled": k_shot + q_query}[drawings]

        def draw(count):
            if pool is None:
                return torch.arange(count)
            return torch.randperm(pool, generator=g)[:count]

        if separate_draws:     # support and query drawn independently: they can share a drawing
            s = torch.stack([draw(k_shot) for _ in range(n_way)])
            q = torch.stack([draw(q_query) for _ in range(n_way)])
        else:
            d = torch.stack([draw(k_shot + q_query) for _ in range(n_way)])
            s, q = d[:, :k_shot], (d[:, :q_query] if leak else d[:, k_shot:])
        def pictures(index):
            x = images[classes[:, None], index].flatten(0, 1)
            x = x.float() / 255 if scale else x.float()
            return x.unsqueeze(1) if channel else x
        labels = torch.arange(n_way) if remap else classes
        return pictures(s), labels.repeat_interleave(k_shot), pictures(q), labels.repeat_interleave(q_query)
    return sample


def test_solution_of_the_sampler_is_a_real_sampler():
    images = torch.randint(0, 256, (12, 20, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sx, sy, qx, qy = sample_episode(images, 5, 1, 15, torch.Generator().manual_seed(1))
    assert sx.shape == (5, 1, 28, 28) and qx.shape == (75, 1, 28, 28) and sy.tolist() == [0, 1, 2, 3, 4]
    assert check_episode_sampler(_sampler()) is None         # the test's own mistake-free sampler passes too


@pytest.mark.parametrize("mistake, phrase", [
    (dict(remap=False), "remap the labels"),
    (dict(leak=True), "a query picture is also in the support set"),
    (dict(separate_draws=True), "a query picture is also in the support set"),
    (dict(random_classes=False), "draw the classes at random"),
    (dict(use_generator=False), "seeded alike"),
    (dict(scale=False), "divide the uint8 pictures by 255"),
    (dict(channel=False), "add the channel dimension"),
    (dict(drawings="first"), "never used"),
    (dict(drawings="first-shuffled"), "not torch.randperm(k_shot + q_query)"),
    (dict(classes_order="sorted"), "labels follow the dataset's order"),
    (dict(classes_order="unique"), "don't sort the drawn classes"),
])
def test_sampler_mistakes_fail_with_a_hint(mistake, phrase):
    _fails_with(check_episode_sampler, _sampler(**mistake), phrase)


def test_another_correct_sampler_passes(capsys):
    def sample(images, n_way, k_shot, q_query, generator):   # random keys sorted instead of randperm
        classes = torch.rand(images.shape[0], generator=generator).argsort()[:n_way]
        drawings = torch.rand(n_way, images.shape[1], generator=generator).argsort(dim=1)[:, :k_shot + q_query]
        pictures = images[classes][torch.arange(n_way)[:, None], drawings].float().div(255).unsqueeze(2)
        labels = torch.arange(n_way)
        return (pictures[:, :k_shot].reshape(-1, *pictures.shape[2:]), labels.repeat_interleave(k_shot),
                pictures[:, k_shot:].reshape(-1, *pictures.shape[2:]), labels.repeat_interleave(q_query))
    check_episode_sampler(sample)
    assert capsys.readouterr().out.startswith("✔ check_episode_sampler passed")


def test_sampler_fixture_has_more_drawings_than_any_episode_uses():
    seen = []

    def spy(images, n_way, k_shot, q_query, generator):
        seen.append((images.shape[1], k_shot + q_query))
        return sample_episode(images, n_way, k_shot, q_query, generator)
    check_episode_sampler(spy)
    assert all(per_class > used for per_class, used in seen)


def test_sampler_first_drawings_failure_names_the_unused_ones():
    message = _fails_with(check_episode_sampler, _sampler(drawings="first"), "never used")
    assert "[20, 21, 22, 23]" in message


def test_sampler_that_modifies_its_input_fails():
    def in_place(images, n_way, k_shot, q_query, generator):
        images[0, 0, 0, 0] = 255 - images[0, 0, 0, 0]
        return sample_episode(images, n_way, k_shot, q_query, generator)
    _fails_with(check_episode_sampler, in_place, "modified the input images")


# ------------------------------------------------------------------------------------- ProtoNet logits
def _protos_by_label(support, labels, n_way, reduce="mean", dim=0):
    return torch.stack([getattr(support[labels == c], reduce)(dim=dim) for c in range(n_way)])


def wrong_dimension(support, labels, query, n_way):        # averaged over the features, not the examples
    protos = _protos_by_label(support, labels, n_way, dim=1)
    return -(query[:, None, :] - protos[None, :, :]).pow(2).sum(-1)


def assumes_sorted(support, labels, query, n_way):
    protos = support.view(n_way, -1, support.shape[-1]).mean(1)
    return -(query[:, None] - protos[None]).pow(2).sum(-1)


def positive(support, labels, query, n_way):
    return -protonet_logits(support, labels, query, n_way)


def not_squared(support, labels, query, n_way):
    return -torch.cdist(query, _protos_by_label(support, labels, n_way))


def summed(support, labels, query, n_way):
    protos = _protos_by_label(support, labels, n_way, reduce="sum")
    return -(query[:, None] - protos[None]).pow(2).sum(-1)


def one_prototype(support, labels, query, n_way):
    return -(query[:, None] - support.mean(0)[None, None]).pow(2).sum(-1).expand(-1, n_way)


def detached(support, labels, query, n_way):
    protos = _protos_by_label(support, labels, n_way).detach()
    return -(query[:, None] - protos[None]).pow(2).sum(-1)


def transposed(support, labels, query, n_way):
    return protonet_logits(support, labels, query, n_way).T


@pytest.mark.parametrize("fn, phrase", [
    (wrong_dimension, "not over the features"),
    (assumes_sorted, "you assumed the support set is ordered class by class"),
    (positive, "wrong sign"),
    (not_squared, "not squared"),
    (summed, "mean, not sum"),
    (one_prototype, "all support examples together"),
    (detached, "gradient with respect to the support embeddings"),
    (transposed, "transposed"),
])
def test_protonet_mistakes_fail_with_a_hint(fn, phrase):
    _fails_with(check_protonet_logits, fn, phrase)
