r"""Checkers for the few-shot exercises (notebooks 05 and 06): episode sampling and ProtoNet logits.

::

    from metatut.checks_fewshot import check_episode_sampler, check_protonet_logits
    check_episode_sampler(sample_episode)     # ✔ check_episode_sampler passed: ...

Like :mod:`metatut.checks`, each checker runs the learner's function on tiny seeded CPU fixtures (well
under a second), raises :class:`metatut.checks.CheckFailed` with a hint when something is wrong, and
prints exactly one line when everything is right.

* ``sample_episode(images, n_way, k_shot, q_query, generator)``: ``images [classes, per_class, H, W]`` uint8
  (ink = 255) -> ``(support_x [N*K, 1, H, W], support_y [N*K], query_x [N*Q, 1, H, W], query_y [N*Q])``,
  pictures as float32 in [0, 1], labels int64 remapped to ``0..N-1``. Random draws are not compared with a
  reference (any correct sampler draws differently); the checker identifies every returned picture in the
  input and checks the properties an episode must have.
* ``protonet_logits(support, support_labels, query, n_way)``: ``support [N*K, D]``, ``support_labels [N*K]`` in
  ``0..N-1`` (any order), ``query [M, D]`` -> ``[M, N]``, the negative squared Euclidean distance of each query
  to each class prototype (mean support embedding). Reference: :func:`metatut.prototypes` and
  :func:`metatut.protonet_logits`; value and gradient are compared.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import checks
from .checks import CheckFailed, _checker
from ..protonet import protonet_logits as _reference_logits
from ..protonet import prototypes as _reference_prototypes

__all__ = ["check_episode_sampler", "check_protonet_logits"]

_RTOL, _ATOL = 1e-6, 1e-9


def _fail(check: str, message: str, hint: str | None = None) -> CheckFailed:
    return checks._fail(check, message, f"Hint: {hint}" if hint else None)


def _call(check: str, fn: Callable, *args, shape_hint: str = "print the shapes of your intermediate tensors."):
    """:func:`metatut.checks._call` with hints for the mistakes of these two exercises."""
    def hint(err: Exception) -> str:
        text = str(err)
        if any(word in text for word in ("size", "shape", "dimension", "broadcast")):
            return f"Hint: {shape_hint}"
        if "generator" in text:
            return "Hint: pass the generator by keyword: torch.randperm(n, generator=generator)."
        return ("Hint: the checker called your function with valid inputs; your error and the line of your "
                "code that raised it are below.")
    return checks._call(check, fn, *args, hint=hint)


def _close(a, b) -> bool:
    try:
        torch.testing.assert_close(a, b, rtol=_RTOL, atol=_ATOL)
        return True
    except (AssertionError, TypeError, ValueError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------- episode sampler
def _images(classes: int, per_class: int, size: int, seed: int) -> Tensor:
    """Random uint8 pictures, all different (checked), so that each returned picture can be identified."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (classes, per_class, size, size), dtype=torch.uint8, generator=generator)
    assert len({bytes(x.numpy()) for x in images.flatten(0, 1)}) == classes * per_class
    return images


def _identify(check: str, x: Tensor, lookup: dict[bytes, tuple[int, int]], what: str) -> list[tuple[int, int]]:
    pixels = (x.detach().double() * 255).round().clamp(0, 255).to(torch.uint8)
    found = []
    for i in range(x.shape[0]):
        key = bytes(pixels[i, 0].contiguous().numpy())
        if key not in lookup:
            raise _fail(check, f"{what}[{i}] is not one of the input pictures (scaled to [0, 1]).",
                        "return the pictures themselves, images[class, drawing].float() / 255, unchanged "
                        "otherwise (no transposition, no mixing of pictures).")
        found.append(lookup[key])
    return found


def _check_outputs(check: str, out, n: int, k: int, q: int, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 4 and all(isinstance(t, Tensor) for t in out)):
        raise _fail(check, f"expected a tuple of 4 tensors (support_x, support_y, query_x, query_y), got "
                           f"{type(out).__name__}{'' if not isinstance(out, (tuple, list)) else f' of {len(out)}'}.",
                    "return support_x, support_y, query_x, query_y")
    sx, sy, qx, qy = out
    for name, t, rows in (("support_x", sx, n * k), ("query_x", qx, n * q)):
        expected = (rows, 1, size, size)
        if tuple(t.shape) != expected:
            hint = "flatten the class and shot dimensions into one: [N*K, 1, H, W]."
            if tuple(t.shape) == (rows, size, size):
                hint = "add the channel dimension: x.unsqueeze(1) gives [N*K, 1, H, W]."
            raise _fail(check, f"{name} should have shape {expected} for N={n}, K={k}, Q={q}, got {tuple(t.shape)}.",
                        hint)
        if t.dtype != torch.float32:
            raise _fail(check, f"{name} should be float32 in [0, 1], got {t.dtype}.",
                        "convert the uint8 pictures with .float() / 255.")
        if t.numel() and float(t.max()) > 1.0:
            raise _fail(check, f"{name} has values up to {float(t.max()):.0f}: pictures should be in [0, 1].",
                        "divide the uint8 pictures by 255 (ink = 255 becomes 1.0).")
    for name, t, rows in (("support_y", sy, n * k), ("query_y", qy, n * q)):
        if tuple(t.shape) != (rows,):
            raise _fail(check, f"{name} should have shape ({rows},), got {tuple(t.shape)}.",
                        "one label per picture, flattened like the pictures.")
        if t.dtype != torch.int64:
            raise _fail(check, f"{name} should hold int64 labels, got {t.dtype}.",
                        "build labels with torch.arange(n_way) (int64 by default) and repeat_interleave.")
    return sx, sy, qx, qy


@_checker
def check_episode_sampler(fn: Callable) -> None:
    """Check ``fn(images, n_way, k_shot, q_query, generator)`` (see the module docstring).

    The fixture has 24 drawings per class and every episode asks for at most 20 (K + Q), so a sampler that
    never draws beyond the first K + Q drawings is caught: over the episodes every drawing must be used.
    Over the episodes the class that gets label 0 must not always be the one with the smallest index (labels
    in the random order of the draw, not in the dataset's order).
    """
    check = "check_episode_sampler"
    classes, per_class, size = 10, 24, 8
    images = _images(classes, per_class, size, seed=0)
    lookup = {bytes(images[c, j].numpy()): (c, j) for c in range(classes) for j in range(per_class)}
    original = images.clone()
    configs = ((5, 1, 3), (4, 2, 5), (3, 5, 15))
    seeds = range(12)
    episodes = len(configs) * len(seeds)
    chosen_classes, chosen_drawings = set(), set()
    label_zero_smallest = 0    # episodes in which label 0 went to the smallest class index drawn
    for n, k, q in configs:
        for seed in seeds:
            out = _call(check, fn, images, n, k, q, torch.Generator().manual_seed(seed))
            if not torch.equal(images, original):
                raise _fail(check, "your function modified the input images.",
                            "index the images (images[classes][:, drawings]) into new tensors; no in-place operations.")
            sx, sy, qx, qy = _check_outputs(check, out, n, k, q, size)
            support = _identify(check, sx, lookup, "support_x")
            query = _identify(check, qx, lookup, "query_x")
            labels = sorted(set(sy.tolist()) | set(qy.tolist()))
            if labels != list(range(n)):
                original_ids = {c for c, _ in support}
                if set(sy.tolist()) == original_ids:
                    raise _fail(check, f"the labels are the original class indices {labels}, not 0..{n - 1}.",
                                "remap the labels: the i-th class drawn for this episode gets label i, whatever "
                                "its index in `images` (use torch.arange(n_way), not the class indices).")
                raise _fail(check, f"labels must be exactly 0..{n - 1} (N={n}), got {labels}.",
                            "label the i-th class drawn with i: torch.arange(n_way).repeat_interleave(k_shot).")
            if sorted(sy.tolist()) != sorted(list(range(n)) * k) or sorted(qy.tolist()) != sorted(list(range(n)) * q):
                raise _fail(check, f"each label should appear {k} times in support_y and {q} times in query_y.",
                            "K support and Q query pictures per class: repeat_interleave(k_shot) / (q_query).")
            class_of: dict[int, int] = {}
            for label, (c, _) in zip(sy.tolist(), support, strict=True):
                if class_of.setdefault(label, c) != c:
                    raise _fail(check, f"support pictures with label {label} come from different classes.",
                                "all K support pictures of one label must be drawings of the same class.")
            if len(set(class_of.values())) != n:
                raise _fail(check, "two labels stand for the same class: the N classes of an episode must be distinct.",
                            "draw the classes without replacement: torch.randperm(classes, generator=generator)[:n_way].")
            for label, (c, _) in zip(qy.tolist(), query, strict=True):
                if class_of[label] != c:
                    raise _fail(check, f"a query picture labelled {label} is a drawing of another class than the "
                                       f"support pictures labelled {label}.",
                                "take the query pictures from the same classes, in the same order, as the support "
                                "pictures, and label them the same way.")
            drawings: dict[int, list[int]] = {}
            for c, j in support + query:
                drawings.setdefault(c, []).append(j)
            for js in drawings.values():
                if len(set(js)) != len(js):
                    raise _fail(check, "the same drawing appears twice in one episode: a query picture is also in "
                                       "the support set (or a drawing is repeated).",
                                "draw K + Q distinct drawings per class with one permutation "
                                "(torch.randperm(per_class, generator=generator)[:k_shot + q_query]); the first K "
                                "go to the support set, the rest to the query set.")
            chosen_classes |= set(class_of.values())
            chosen_drawings |= {j for _, j in support + query}
            label_zero_smallest += class_of[0] == min(class_of.values())
            again = _call(check, fn, images, n, k, q, torch.Generator().manual_seed(seed))
            again = _check_outputs(check, again, n, k, q, size)
            if not all(torch.equal(a, b) for a, b in zip(out, again, strict=True)):
                raise _fail(check, "two calls with generators seeded alike returned different episodes.",
                            "draw every random number from the `generator` argument "
                            "(torch.randperm(..., generator=generator)), never from the global random state.")
    if len(chosen_classes) < classes:
        raise _fail(check, f"over {episodes} episodes only the classes {sorted(chosen_classes)} were ever "
                           f"drawn out of {classes}.",
                    "draw the classes at random: torch.randperm(images.shape[0], generator=generator)[:n_way].")
    if label_zero_smallest == episodes:
        raise _fail(check, f"in all {episodes} episodes label 0 went to the class with the smallest index: your "
                           "labels follow the dataset's order, not the random order in which the classes were drawn.",
                    "don't sort the drawn classes (sorted, .sort(), .unique() and boolean masks all put them in index "
                    "order): the i-th class of torch.randperm(images.shape[0], generator=generator)[:n_way] gets "
                    "label i.")
    never = sorted(set(range(per_class)) - chosen_drawings)
    if never:
        raise _fail(check, f"over {episodes} episodes the drawings {never} of each class (out of {per_class}) were "
                           f"never used; you only ever took drawings {sorted(chosen_drawings)}.",
                    "draw the K + Q drawings at random from ALL the drawings of the class: "
                    "torch.randperm(images.shape[1], generator=generator)[:k_shot + q_query] (not the first K + Q, "
                    "not torch.randperm(k_shot + q_query)).")
    print(f"✔ {check} passed: shapes, labels 0..N-1 in the order drawn, N distinct classes, every drawing used, "
          f"none in both support and query, random and reproducible, on {episodes} episodes.")


# -------------------------------------------------------------------------------------- ProtoNet logits
def _reference(support: Tensor, labels: Tensor, query: Tensor, n_way: int) -> Tensor:
    protos = _reference_prototypes(support[None], labels[None], n_way)
    return _reference_logits(query[None], protos)[0]


def _variants(support: Tensor, labels: Tensor, query: Tensor, n: int) -> list[tuple[Tensor, str]]:
    """Values of typical mistakes (no graph), each with its hint."""
    s, q = support.detach(), query.detach()
    k = s.shape[0] // n
    means = torch.stack([s[labels == c].mean(0) for c in range(n)])
    sums = torch.stack([s[labels == c].sum(0) for c in range(n)])

    def sq(protos):
        return -(q[:, None] - protos[None]).pow(2).sum(-1)

    out = [
        (-sq(means), "wrong sign: the logits are the NEGATIVE squared distances (closer = larger logit)."),
        (-torch.cdist(q, means), "the distance is not squared: use ((query - prototype) ** 2).sum(-1), "
                                 "the squared Euclidean distance."),
        (sq(sums), "the prototypes are sums: average the support embeddings of each class (mean, not sum)."),
        (sq(s.mean(0, keepdim=True)).expand(-1, n),
         "you averaged over all support examples together: one prototype per class, the mean over the examples "
         "whose label is that class."),
        (-(q[:, None] - means[None]).sum(-1), "square the differences before summing over the features."),
        (sq(means).T if n == q.shape[0] else None, "the logits are transposed: shape [M, N], one row per query."),
    ]
    if k * n == s.shape[0]:
        out.append((sq(s.view(n, k, -1).mean(1)),
                    "you assumed the support set is ordered class by class; it is not: select each class's "
                    "examples by their label, support[support_labels == c].mean(0)."))
        out.append((sq(s.view(k, n, -1).mean(0)),
                    "you grouped the support examples by position, not by label: select each class's examples "
                    "with support[support_labels == c]."))
    return [(v, h) for v, h in out if v is not None]


@_checker
def check_protonet_logits(fn: Callable) -> None:
    """Check ``fn(support, support_labels, query, n_way)`` (see the module docstring)."""
    check = "check_protonet_logits"
    wrong_dim = ("the prototypes must be [n_way, D]: for each class, average its support embeddings over the "
                 "examples (dim 0 of support[support_labels == c]), not over the features (dim 1).")
    configs = ((0, 4, 3, 7, 6, True), (1, 5, 2, 9, 5, False), (2, 3, 1, 4, 8, True))
    for seed, n, k, m, d, shuffle in configs:
        generator = torch.Generator().manual_seed(seed)
        support = torch.randn(n * k, d, generator=generator, dtype=torch.float64).requires_grad_()
        query = torch.randn(m, d, generator=generator, dtype=torch.float64).requires_grad_()
        labels = torch.arange(n).repeat_interleave(k)
        if shuffle:
            labels = labels[torch.randperm(n * k, generator=generator)]
        before = [t.detach().clone() for t in (support, query, labels)]
        out = _call(check, fn, support, labels, query, n, shape_hint=wrong_dim)
        if not all(torch.equal(t.detach(), b) for t, b in zip((support, query, labels), before, strict=True)):
            raise _fail(check, "your function modified its inputs.", "no in-place operations on the embeddings.")
        if not isinstance(out, Tensor):
            raise _fail(check, f"expected a tensor of logits [M, N], got {type(out).__name__}.",
                        "return one tensor: -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1).")
        if tuple(out.shape) != (m, n):
            hint = wrong_dim
            if tuple(out.shape) == (n, m):
                hint = "the logits are transposed: one row per query, one column per class, [M, N]."
            raise _fail(check, f"expected logits of shape ({m}, {n}) for M={m} queries and N={n} classes, got "
                               f"{tuple(out.shape)}.", hint)
        reference = _reference(support, labels, query, n)
        if not _close(out.detach(), reference.detach()):
            hint = next((h for v, h in _variants(support, labels, query, n)
                         if v.shape == out.shape and _close(out.detach(), v)), None)
            raise _fail(check, f"the logits are wrong (N={n}, K={k}, M={m}).",
                        hint or "prototype c = mean of the support embeddings labelled c; logit[i, c] = "
                                "-||query[i] - prototype c||^2.")
        if not out.requires_grad:
            raise _fail(check, "the logits are not connected to the embeddings: no gradient can train the network.",
                        "compute them with torch operations on support and query; no .detach(), .item() or numpy.")
        w = torch.randn(m, n, generator=generator, dtype=torch.float64)
        got = torch.autograd.grad((out * w).sum(), (support, query), allow_unused=True)
        expected = torch.autograd.grad((reference * w).sum(), (support, query))
        for name, g, e in zip(("support", "query"), got, expected, strict=True):
            if g is None or not _close(g, e):
                raise _fail(check, f"the value matches but the gradient with respect to the {name} embeddings does not.",
                            f"don't detach the {name} embeddings or the prototypes: the embedding network is trained "
                            "through both.")
    print(f"✔ {check} passed: value and gradient match metatut.protonet_logits on {len(configs)} episodes "
          "(labels in any order, K = 1 to 3).")
