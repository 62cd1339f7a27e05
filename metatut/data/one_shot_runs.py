r"""Lake et al.'s 20-way within-alphabet one-shot classification benchmark (``all_runs.zip``).

Twenty runs; in each, 20 training images (one per character, ``runXX/training/classYY.png``) and
20 test images (``runXX/test/itemYY.png``) of the same 20 characters, drawn by other people, all from
the evaluation alphabets. ``class_labels.txt`` in each run gives the training image that matches each
test item. A method sees one image per class and must label the 20 test items; the score is the
percentage of errors, averaged over runs.

Published figures (Lake, Salakhutdinov & Tenenbaum, *Science* 350, 2015): people 4.5% error,
Bayesian Program Learning 3.3% (:data:`HUMAN_ERROR`, :data:`BPL_ERROR`). Models should be trained on
the background alphabets only, so that no evaluation alphabet is seen before the test.

Images get the same preprocessing as the training data (:func:`metatut.data.decode_png`: Lanczos resize
105 -> 28, ink = high).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from ..tasks.base import TaskBatch
from .omniglot import _check_image_size, _fetch_zip_once, _Source, decode_png, omniglot_dir

__all__ = ["HUMAN_ERROR", "BPL_ERROR", "OneShotRuns", "OneShotResult", "load_one_shot_runs",
           "evaluate_one_shot", "pixel_nearest_neighbour"]

#: Error of people on the 20 runs (Lake, Salakhutdinov & Tenenbaum, Science 2015).
HUMAN_ERROR = 0.045
#: Error of Bayesian Program Learning on the 20 runs (same paper).
BPL_ERROR = 0.033

Predictor = Callable[[Tensor, Tensor, Tensor], Tensor]
_LINE = re.compile(r"^\s*(\S+)\s+(\S+)\s*$")


@dataclass(frozen=True)
class OneShotRuns:
    """The benchmark, decoded. ``support`` uint8 ``[runs, 20, S, S]`` (``training/class01..20``, label =
    position 0..19), ``query`` uint8 ``[runs, 20, S, S]`` (``test/item01..20``), ``answers`` int64
    ``[runs, 20]`` (the label of each query), ``runs`` the run folder names.

    Example::

        >>> runs = OneShotRuns(torch.zeros(2, 20, 4, 4, dtype=torch.uint8), torch.zeros(2, 20, 4, 4, dtype=torch.uint8),
        ...                    torch.arange(20).repeat(2, 1), ("run01", "run02"))
        >>> len(runs), runs.task_batch().support_x.shape
        (2, torch.Size([2, 20, 1, 4, 4]))
    """

    support: Tensor
    query: Tensor
    answers: Tensor
    runs: tuple[str, ...]

    def __len__(self) -> int:
        return self.support.shape[0]

    def task_batch(self, *, device=None, dtype: torch.dtype = torch.float32) -> TaskBatch:
        """All runs as one :class:`TaskBatch`: ``support_x [runs, 20, 1, S, S]`` in [0, 1],
        ``support_y [runs, 20]`` = 0..19, ``query_x [runs, 20, 1, S, S]``, ``query_y`` = :attr:`answers`."""
        def as_float(images: Tensor) -> Tensor:
            return images.to(device=device, dtype=dtype).div_(255).unsqueeze(2)
        labels = torch.arange(self.support.shape[1], device=device).expand(len(self), -1).contiguous()
        return TaskBatch(as_float(self.support), labels, as_float(self.query), self.answers.to(device))


@dataclass(frozen=True)
class OneShotResult:
    """Per-run error fractions ``errors [runs]`` and the overall error (their mean).

    Example::

        >>> result = OneShotResult(torch.tensor([0.1, 0.3], dtype=torch.float64), ("run01", "run02"))
        >>> round(result.error, 3)
        0.2
    """

    errors: Tensor
    runs: tuple[str, ...]

    @property
    def error(self) -> float:
        return float(self.errors.mean())

    def __str__(self) -> str:
        return (f"one-shot error {100 * self.error:.1f}% over {len(self.runs)} runs "
                f"(people {100 * HUMAN_ERROR:.1f}%, BPL {100 * BPL_ERROR:.1f}%, chance "
                f"{100 * (1 - 1 / 20):.0f}%)")


def _parse_labels(text: str, run: str, where: str) -> dict[str, str]:
    """``class_labels.txt`` -> {test file name: training file name}."""
    pairs: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{where}, line {number}: expected '<test image> <training image>' (got {line!r})")
        test, train = (PurePosixPath(p) for p in match.groups())
        if test.parts[-2:-1] != ("test",) or train.parts[-2:-1] != ("training",):
            raise ValueError(f"{where}, line {number}: expected '{run}/test/itemNN.png {run}/training/classNN.png' "
                             f"(got {line!r})")
        if test.name in pairs:
            raise ValueError(f"{where}: {test.name} is listed twice")
        pairs[test.name] = train.name
    return pairs


def load_one_shot_runs(path: str | os.PathLike | None = None, *, image_size: int = 28,
                       download: bool = False) -> OneShotRuns:
    """Load ``all_runs.zip`` (or a folder with the same layout); default path ``METATUT_DATA/omniglot/all_runs.zip``.

    With no ``path`` and ``download=True`` the official zip is fetched and MD5-checked (:func:`fetch_zip`;
    by one process at a time, under :func:`metatut.data.omniglot.data_lock`, when several load at once).
    Raises a clear error if a run's ``class_labels.txt`` is malformed or names a missing image.

    Example::

        >>> import tempfile
        >>> try:
        ...     load_one_shot_runs(Path(tempfile.mkdtemp()) / "all_runs.zip")
        ... except (FileNotFoundError, ValueError) as err:
        ...     print(type(err).__name__)
        FileNotFoundError
    """
    image_size = _check_image_size(image_size)
    if path is None:
        path = _fetch_zip_once("all_runs", omniglot_dir(), download=download)
    source = _Source(Path(path).expanduser())
    try:
        if source.archive is not None:
            files = [m.filename for m in source.archive.infolist() if not m.is_dir()]
        else:
            files = [p.relative_to(source.path).as_posix() for p in source.path.rglob("*") if p.is_file()]
        label_files = sorted(f for f in files if PurePosixPath(f).name == "class_labels.txt")
        if not label_files:
            raise ValueError(f"{source.path} holds no run folders with class_labels.txt (expected all_runs.zip)")
        present = set(files)
        supports, queries, answers, runs = [], [], [], []
        for label_file in label_files:
            folder = PurePosixPath(label_file).parent
            run = folder.name
            where = f"{source.path}:{label_file}"
            pairs = _parse_labels(source.read(label_file).decode("utf-8"), run, where)
            train_names = sorted(PurePosixPath(f).name for f in present
                                 if PurePosixPath(f).parent == folder / "training" and f.endswith(".png"))
            test_names = sorted(PurePosixPath(f).name for f in present
                                if PurePosixPath(f).parent == folder / "test" and f.endswith(".png"))
            if sorted(pairs) != test_names or not test_names:
                raise ValueError(f"{where} must list every test image of {run} exactly once "
                                 f"(lists {len(pairs)}, found {len(test_names)} images)")
            missing = sorted(set(pairs.values()) - set(train_names))
            if missing:
                raise ValueError(f"{where} names training images that are not in the archive: {missing}")
            label_of = {name: i for i, name in enumerate(train_names)}
            supports.append(torch.stack([decode_png(source.read(str(folder / "training" / n)), image_size)
                                         for n in train_names]))
            queries.append(torch.stack([decode_png(source.read(str(folder / "test" / n)), image_size)
                                        for n in test_names]))
            answers.append(torch.tensor([label_of[pairs[n]] for n in test_names], dtype=torch.long))
            runs.append(run)
    finally:
        source.close()
    shapes = {(s.shape, q.shape) for s, q in zip(supports, queries, strict=True)}
    if len(shapes) != 1:
        raise ValueError(f"all runs must have the same numbers of training and test images (got {shapes})")
    return OneShotRuns(torch.stack(supports), torch.stack(queries), torch.stack(answers), tuple(runs))


def evaluate_one_shot(predict: Predictor, runs: OneShotRuns | None = None, *, device=None,
                      dtype: torch.dtype = torch.float32) -> OneShotResult:
    """Score ``predict(support_x [20, 1, S, S], support_y [20], query_x [20, 1, S, S]) -> labels [20]``.

    ``predict`` is called once per run with float images in [0, 1] on ``device`` and labels 0..19; it
    may use autograd (e.g. fine-tuning), so no ``torch.no_grad`` is imposed here. ``runs`` defaults to
    :func:`load_one_shot_runs` ``()``. Returns the error of each run and overall.

    Example::

        >>> runs = OneShotRuns(torch.zeros(2, 20, 4, 4, dtype=torch.uint8), torch.zeros(2, 20, 4, 4, dtype=torch.uint8),
        ...                    torch.arange(20).repeat(2, 1), ("run01", "run02"))
        >>> perfect = lambda support_x, support_y, query_x: torch.arange(20)
        >>> evaluate_one_shot(perfect, runs).error
        0.0
    """
    runs = load_one_shot_runs() if runs is None else runs
    batch = runs.task_batch(device=device, dtype=dtype)
    errors = []
    for r in range(len(runs)):
        predicted = predict(batch.support_x[r], batch.support_y[r], batch.query_x[r])
        if not isinstance(predicted, Tensor) or predicted.shape != batch.query_y[r].shape:
            raise ValueError(f"predict must return a tensor of {batch.query_y.shape[1]} labels (got "
                             f"{getattr(predicted, 'shape', type(predicted).__name__)}) for run {runs.runs[r]}")
        errors.append((predicted.detach().to(batch.query_y.device).long() != batch.query_y[r]).double().mean())
    return OneShotResult(torch.stack(errors).cpu(), runs.runs)


def pixel_nearest_neighbour(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
    """Baseline predictor: each query gets the label of the support image closest in pixel space
    (Euclidean). ``support_x [S, ...]``, ``support_y [S]``, ``query_x [M, ...]`` -> ``[M]``.

    Example::

        >>> support_x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> pixel_nearest_neighbour(support_x, torch.tensor([0, 1]), torch.tensor([[0.9, 0.8], [0.1, 0.0]]))
        tensor([1, 0])
    """
    distances = torch.cdist(query_x.flatten(1).double(), support_x.flatten(1).double())
    return support_y[distances.argmin(dim=1)]
