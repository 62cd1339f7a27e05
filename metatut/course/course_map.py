"""The course map: each notebook's title, size, exercises and measured run time, read from the committed files.

Notebook 00 renders it and ``scripts/update_course_map.py`` writes it into README.md, so the map is generated
from the notebooks themselves (never typed). The run time is what ``scripts/execute_notebook.py`` records in a
notebook's metadata (``metadata["metatut"]["execution"]``: budget, wall seconds, machine) when it executes it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CourseEntry", "course_map", "format_course_map", "course_root"]

_WORD = re.compile(r"\S+")
_GOES_WITH = re.compile(r"Goes with course notebook \[(\d\d)_")


@dataclass(frozen=True)
class CourseEntry:
    """One notebook of the course: ``number`` ("04"), ``path`` (relative to the checkout), ``title`` (its first
    heading without the number), ``words`` of markdown prose, the ``exercises`` that go with it (file stems),
    and the recorded execution (``budget``, ``seconds``, ``machine``; ``None`` when it was never recorded).

    Example:
        >>> CourseEntry("03", "notebooks/03_maml_sinusoid.ipynb", "MAML", 1800).seconds is None
        True
    """

    number: str
    path: str
    title: str
    words: int
    exercises: tuple[str, ...] = field(default_factory=tuple)
    budget: str | None = None
    seconds: float | None = None
    machine: str | None = None


def course_root() -> Path:
    """The checkout that holds ``notebooks/`` and ``exercises/`` (the course needs a checkout, not a wheel).

    Example:
        >>> (course_root() / "notebooks").is_dir()
        True
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / "notebooks").is_dir():
        raise FileNotFoundError(f"the course map needs a checkout of metatut with notebooks/ (looked in {root})")
    return root


def _title(nb: dict, number: str) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return re.sub(rf"^#\s*{number}\s*[·:.-]\s*", "", line).strip()
    return ""


def course_map(root: str | Path | None = None) -> list[CourseEntry]:
    """Read every ``notebooks/NN_*.ipynb`` (and the exercises that say they go with it) under ``root``.

    Example:
        >>> entries = course_map()
        >>> entries[0].number, entries[0].path
        ('00', 'notebooks/00_setup.ipynb')
    """
    root = Path(root) if root is not None else course_root()
    exercises: dict[str, list[str]] = {}
    for src in sorted((root / "exercises" / "src").glob("*.py")):
        match = _GOES_WITH.search(src.read_text(encoding="utf-8"))
        if match:
            exercises.setdefault(match.group(1), []).append(src.stem)
    entries = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        number = path.name[:2]
        words = sum(len(_WORD.findall("".join(c["source"]))) for c in nb["cells"] if c["cell_type"] == "markdown")
        run = nb.get("metadata", {}).get("metatut", {}).get("execution", {})
        entries.append(CourseEntry(number, path.relative_to(root).as_posix(), _title(nb, number), words,
                                   tuple(exercises.get(number, ())), run.get("budget"), run.get("seconds"),
                                   run.get("machine")))
    return entries


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_course_map(entries: list[CourseEntry], link_prefix: str = "") -> str:
    """A Markdown table of ``entries``: notebook (linked with ``link_prefix`` before its path), what it teaches,
    its exercises, its prose length and the run time recorded for the committed (laptop-budget) run.

    Example:
        >>> print(format_course_map([CourseEntry("01", "notebooks/01_a.ipynb", "A title", 900, ("01_a",),
        ...                                      "laptop", 21.4, "2-core CPU")]))
        | notebook | what it teaches | exercises | prose | laptop run time |
        |---|---|---|---|---|
        | [01](notebooks/01_a.ipynb) | A title | [01_a](exercises/01_a.ipynb) | 900 words | 21 s |
        <BLANKLINE>
        Run times measured with each notebook executed on its own (never two at once) on: 2-core CPU.
    """
    lines = ["| notebook | what it teaches | exercises | prose | laptop run time |", "|---|---|---|---|---|"]
    for e in entries:
        ex = ", ".join(f"[{s}]({link_prefix}exercises/{s}.ipynb)" for s in e.exercises) or "–"
        when = _minutes(e.seconds) if e.budget in (None, "laptop") else f"{_minutes(e.seconds)} ({e.budget} budget)"
        lines.append(f"| [{e.number}]({link_prefix}{e.path}) | {e.title} | {ex} | {e.words:,} words | {when} |")
    machines = sorted({e.machine for e in entries if e.machine})
    if machines:
        lines += ["", f"Run times measured with each notebook executed on its own (never two at once) on: {'; '.join(machines)}."]
    return "\n".join(lines)
