r"""N-way K-shot classification episodes sampled on the device from a tensor of images.

An episode (a task) picks ``N`` classes at random, relabels them ``0..N-1`` in the order drawn, and
takes ``K`` support and ``Q`` query images of each class, all distinct (support and query never share
an image). Everything is tensor indexing on the images' device: random keys from ``torch.rand`` are
``argsort``-ed to draw classes and images without replacement, so there is no DataLoader and no Python
loop over examples; the same seed gives the same episodes.

Layout of one task: support ``[N*K]`` ordered class by class (labels ``0,..,0, 1,..,1, ...``), query
``[N*Q]`` likewise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..validate import check_generator, check_n_way, check_positive_int
from .base import TaskBatch

__all__ = ["sample_episodes", "EpisodeSampler", "held_out_episodes", "check_n_way"]


def _as_images(images) -> Tensor:
    """Accept a tensor ``[classes, per_class, H, W]`` or anything with an ``images`` tensor attribute."""
    images = getattr(images, "images", images)
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError("images must be a tensor [classes, images_per_class, H, W] (uint8 with ink = 255, or float "
                        f"in [0, 1]) or metatut.data.OmniglotImages (got {getattr(images, 'shape', type(images))})")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point (got {images.dtype})")
    return images


def _check_episode(images: Tensor, num_tasks, n_way, k_shot, q_query, *, classes_are: str = "classes",
                   examples_are: str = "images per class") -> None:
    """Episode sizes against a pool ``[classes, per_class, ...]`` (``classes_are``/``examples_are`` name them in
    the errors: "languages", "words per language" for :mod:`metatut.data.languages`)."""
    classes, per_class = images.shape[:2]
    check_positive_int("num_tasks", num_tasks)
    check_n_way(n_way)
    check_positive_int("k_shot", k_shot)
    check_positive_int("q_query", q_query)
    if n_way > classes:
        raise ValueError(f"n_way must be an int in [2, {classes}] (the number of {classes_are}) (got {n_way})")
    if k_shot + q_query > per_class:
        raise ValueError(f"k_shot + q_query must be at most {per_class} (the {examples_are}) "
                         f"(got k_shot={k_shot}, q_query={q_query})")


def _check_generator(generator: torch.Generator | None, device: torch.device, what: str = "images") -> None:
    check_generator(generator)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator lives on {generator.device} but the {what} are on {device}; make the generator "
                         f"on the {what}' device (metatut.make_generator(seed, device))")


def _gather_episodes(pool: Tensor, num_tasks: int, n_way: int, k_shot: int, q_query: int,
                     generator: torch.Generator | None, transform=None) -> TaskBatch:
    """N-way K-shot episodes from ``pool [classes, per_class, ...]`` (any example shape: images, word ids).

    Classes and examples are drawn without replacement (the first n of a random permutation: argsort of uniform
    keys); ``transform`` maps the gathered examples ``[tasks, N, K+Q, ...]`` (e.g. scale and add a channel)."""
    classes, per_class = pool.shape[:2]
    device = pool.device
    chosen = torch.rand(num_tasks, classes, generator=generator, device=device).argsort(dim=1)[:, :n_way]
    picks = torch.rand(num_tasks, n_way, per_class, generator=generator, device=device).argsort(dim=2)
    picks = picks[:, :, :k_shot + q_query]                                    # [tasks, N, K+Q]
    x = pool[chosen.unsqueeze(-1), picks]                                     # [tasks, N, K+Q, ...]
    if transform is not None:
        x = transform(x)
    labels = torch.arange(n_way, device=device).view(1, n_way, 1)

    def flat(t: Tensor) -> Tensor:
        return t.flatten(1, 2)

    support_y = flat(labels.expand(num_tasks, n_way, k_shot))
    query_y = flat(labels.expand(num_tasks, n_way, q_query))
    return TaskBatch(flat(x[:, :, :k_shot]), support_y.contiguous(), flat(x[:, :, k_shot:]), query_y.contiguous(),
                     {"classes": chosen, "examples": picks})


def _draw(images: Tensor, num_tasks: int, n_way: int, k_shot: int, q_query: int,
          generator: torch.Generator | None, dtype: torch.dtype) -> TaskBatch:
    def as_input(x: Tensor) -> Tensor:                                        # [tasks, N, K+Q, 1, H, W]
        x = x.to(dtype).div_(255) if images.dtype == torch.uint8 else x.to(dtype)
        return x.unsqueeze(3)
    return _gather_episodes(images, num_tasks, n_way, k_shot, q_query, generator, as_input)


def sample_episodes(images, num_tasks: int, n_way: int, k_shot: int, q_query: int, *,
                    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> TaskBatch:
    """Draw ``num_tasks`` N-way K-shot episodes with ``q_query`` query images per class.

    ``images``: ``[classes, per_class, H, W]`` (uint8 ink = 255, scaled to [0, 1]; or float, used as is) or
    :class:`metatut.data.OmniglotImages`. Sampling runs on the images' device with ``generator``.
    Returns a :class:`TaskBatch` with ``support_x [tasks, N*K, 1, H, W]``, ``support_y [tasks, N*K]``
    int64 in ``0..N-1``, ``query_x [tasks, N*Q, 1, H, W]``, ``query_y [tasks, N*Q]``, and
    ``info['classes'] [tasks, N]`` (class index of each label), ``info['examples'] [tasks, N, K+Q]``
    (image index within each class; the first ``K`` are the support).

    Example::

        >>> images = torch.randint(0, 256, (10, 20, 8, 8), dtype=torch.uint8)    # 10 classes of 20 images
        >>> batch = sample_episodes(images, 4, n_way=5, k_shot=1, q_query=3, generator=torch.Generator().manual_seed(0))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([4, 5, 1, 8, 8]), torch.Size([4, 15]))
        >>> batch.support_y[0]
        tensor([0, 1, 2, 3, 4])
    """
    images = _as_images(images)
    _check_episode(images, num_tasks, n_way, k_shot, q_query)
    _check_generator(generator, images.device)
    return _draw(images, num_tasks, n_way, k_shot, q_query, generator, dtype)


class EpisodeSampler:
    """``sampler(generator) -> TaskBatch`` with fixed settings, e.g. for :func:`metatut.meta_train`.

    Moves the images to ``device`` once (default: where they are) and checks the settings at construction.

    Example::

        >>> sampler = EpisodeSampler(torch.rand(10, 20, 8, 8), n_way=3, k_shot=2, q_query=1, num_tasks=4)
        >>> sampler(torch.Generator().manual_seed(0)).support_x.shape
        torch.Size([4, 6, 1, 8, 8])
    """

    def __init__(self, images, *, n_way: int, k_shot: int, q_query: int, num_tasks: int = 1,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        images = _as_images(images)
        _check_episode(images, num_tasks, n_way, k_shot, q_query)
        self.images = images.to(device) if device is not None else images
        self.n_way, self.k_shot, self.q_query, self.num_tasks, self.dtype = n_way, k_shot, q_query, num_tasks, dtype

    def __repr__(self) -> str:
        return (f"EpisodeSampler({self.n_way}-way {self.k_shot}-shot, {self.q_query} queries per class, "
                f"{self.num_tasks} tasks, {self.images.shape[0]} classes on {self.device})")

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __call__(self, generator: torch.Generator | None = None) -> TaskBatch:
        _check_generator(generator, self.images.device)
        return _draw(self.images, self.num_tasks, self.n_way, self.k_shot, self.q_query, generator, self.dtype)


def held_out_episodes(images, episodes: int, n_way: int, k_shot: int, q_query: int, *, seed: int = 2015,
                  chunk: int = 100) -> list[TaskBatch]:
    """Seeded test episodes, drawn ``chunk`` at a time from one generator on the images' device.

    Whole chunks are always drawn (the last one cut to size), so the first ``n`` episodes are the same
    whatever ``episodes >= n`` is: a short evaluation re-checks a prefix of a long recorded one.
    Returns a list of :class:`TaskBatch` of at most ``chunk`` tasks each (``[tasks, N*K, 1, H, W]``).

    Example::

        >>> images = torch.rand(10, 20, 8, 8)
        >>> batches = held_out_episodes(images, 5, n_way=3, k_shot=1, q_query=2, chunk=2)
        >>> [b.num_tasks for b in batches]
        [2, 2, 1]
        >>> torch.equal(held_out_episodes(images, 2, 3, 1, 2, chunk=2)[0].support_x, batches[0].support_x)
        True
    """
    check_positive_int("episodes", episodes)
    check_positive_int("chunk", chunk)
    device = images.images.device if hasattr(images, "images") else torch.as_tensor(images).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for start in range(0, episodes, chunk):
        batch = sample_episodes(images, chunk, n_way, k_shot, q_query, generator=generator)
        batches.append(batch[: min(chunk, episodes - start)])
    return batches
