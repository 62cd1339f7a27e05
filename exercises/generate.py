"""Write the exercise notebooks from their sources, or check that they are up to date.

Usage (from anywhere)::

    python exercises/generate.py           # (re)write the generated notebooks that are out of date
    python exercises/generate.py --check   # write nothing; exit 1 and list the stale files
    python exercises/generate.py --force exercises/02_inner_step.ipynb   # a fresh copy, edits lost

Options ``--src DIR`` and ``--out DIR`` read the sources from and write the notebooks to other folders
(``DIR/NN_name.ipynb`` and ``DIR/solutions/NN_name.ipynb``); the tests use them on temporary copies.

What is compared, and what is never overwritten:

* ``--check`` compares what makes the exercise: each cell's type, source and tags (:func:`cell_key`).
  Not notebook metadata, outputs, execution counts or cell ids, which JupyterLab fills in or changes when
  a notebook is opened, run and autosaved: opening an exercise does not make it "stale".
* A generated notebook records a digest of each of its cells (``metadata.metatut``). When a cell on disk
  no longer matches that record (a learner wrote an answer, or added a cell), the notebook was edited by
  hand: ``generate.py`` leaves it alone and says so (exit status 1), and ``--check`` lists it as edited.
  ``--force`` overwrites it (with NOTEBOOK arguments: only those). A notebook whose cells match but whose
  metadata or outputs differ is rewritten clean; one whose source changed (and nobody edited it) is
  rewritten.
* Orphans (``NN_name.ipynb`` without a source) are deleted when they were generated and not edited since;
  other ones only with ``--force``.

Each source ``exercises/src/NN_name.py`` gives two notebooks:

* ``exercises/NN_name.ipynb``: the student copy, each solution region replaced by
  ``# YOUR CODE HERE`` and ``raise NotImplementedError()`` (at the region's indentation);
* ``exercises/solutions/NN_name.ipynb``: the solution copy, the marker lines removed.

Source format, a small subset of the "percent" format::

    # %% [markdown]        a markdown cell: every line is "# text" or "#"
    # %%                   a code cell
    # %% tags=["check"]    a code cell with cell tags (a JSON list of strings)

    # %% [markdown] tags=["student-only"]

In code cells the lines between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` are the solution.
Tags with a meaning here:

* ``check`` (calls a checker) and ``demo`` (uses the learner's function): both raise in the student
  copy, which therefore also tags them ``raises-exception`` (Jupyter's "Run All" goes on past them;
  nbval and nbclient expect the error);
* ``student-only`` / ``solution-only``: the cell appears in that copy only (the tag is dropped).

Leading and trailing blank lines of a cell are dropped.

The output is deterministic: no outputs or execution counts, cell ids derived from the file name
and the cell's index, complete and fixed kernelspec/language_info metadata, sorted keys, one-space
indentation, a final newline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
SOLUTIONS = HERE / "solutions"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
RAISING_TAGS = ("check", "demo")
ONLY_TAGS = {"student-only": True, "solution-only": False}  # tag -> kept in the student copy?
_HEADER = re.compile(r"^# %%(?P<markdown> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")
_GENERATED = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# What ipykernel writes when a kernel starts, so that opening a notebook in JupyterLab changes little. The
# version differs between machines: a fixed one keeps the output deterministic, and --check ignores metadata.
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": "3.11.7"}
RECORD = "metatut"  # notebook metadata key: the source and a digest of each cell as generated


class SourceError(ValueError):
    """A malformed exercise source (the message names the file and line)."""


@dataclass
class Cell:
    kind: str                      # "markdown" or "code"
    lines: list[str]               # without newlines
    tags: list[str] = field(default_factory=list)
    line: int = 0                  # 1-based line of the cell's header in the source
    numbers: list[int] = field(default_factory=list)  # source line number of each entry of `lines`

    @property
    def has_solution(self) -> bool:
        return any(l.strip() == BEGIN for l in self.lines)


def parse(path: Path) -> list[Cell]:
    """Split a source file into cells (markers kept; see :func:`student_lines`, :func:`solution_lines`)."""
    cells: list[Cell] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        header = _HEADER.match(raw)
        if header:
            tags = []
            if header["tags"]:
                try:
                    tags = json.loads(header["tags"])
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path}:{number}: tags must be a JSON list of strings ({err})") from None
                if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                    raise SourceError(f"{path}:{number}: tags must be a JSON list of strings")
            cells.append(Cell("markdown" if header["markdown"] else "code", [], tags, number))
        elif raw.startswith("# %%"):
            raise SourceError(f"{path}:{number}: unknown cell header {raw!r} "
                              "(use '# %%', '# %% [markdown]' or '# %% tags=[\"...\"]')")
        elif not cells:
            if raw.strip():
                raise SourceError(f"{path}:{number}: text before the first '# %%' cell header")
        elif cells[-1].kind == "markdown":
            if raw == "#" or raw.startswith("# "):
                cells[-1].lines.append(raw[2:])
            elif raw.strip():
                raise SourceError(f"{path}:{number}: markdown lines must start with '# ' (got {raw!r})")
            else:
                cells[-1].lines.append("")
            cells[-1].numbers.append(number)
        else:
            cells[-1].lines.append(raw)
            cells[-1].numbers.append(number)
    for cell in cells:
        while cell.lines and not cell.lines[-1].strip():
            del cell.lines[-1], cell.numbers[-1]
        while cell.lines and not cell.lines[0].strip():
            del cell.lines[0], cell.numbers[0]
        _check_markers(path, cell)
    if not any(c.has_solution for c in cells):
        raise SourceError(f"{path}: no '{BEGIN}' region: an exercise needs at least one")
    if not any("check" in c.tags for c in cells):
        raise SourceError(f'{path}: no cell tagged "check": an exercise needs a check cell')
    return cells


def _check_markers(path: Path, cell: Cell) -> None:
    inside, where = False, ""
    for number, line in zip(cell.numbers, cell.lines, strict=True):
        marker = line.strip()
        if marker not in (BEGIN, END):
            continue
        where = f"{path}:{number}"
        if marker in (BEGIN, END) and cell.kind != "code":
            raise SourceError(f"{where}: solution markers belong in code cells")
        if marker == BEGIN:
            if inside:
                raise SourceError(f"{where}: '{BEGIN}' inside another solution region")
            inside = True
        elif marker == END:
            if not inside:
                raise SourceError(f"{where}: '{END}' without '{BEGIN}'")
            inside = False
    if inside:
        raise SourceError(f"{where}: '{BEGIN}' without '{END}' in the same cell")


def solution_lines(cell: Cell) -> list[str]:
    """The cell as the solution notebook shows it: marker lines removed."""
    return [l for l in cell.lines if l.strip() not in (BEGIN, END)]


def student_lines(cell: Cell) -> list[str]:
    """The cell as the student notebook shows it: each solution region replaced by the stub."""
    out, inside = [], False
    for line in cell.lines:
        marker = line.strip()
        if marker == BEGIN:
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + s for s in STUB)
            inside = True
        elif marker == END:
            inside = False
        elif not inside:
            out.append(line)
    return out


def solution_code(path: Path, *, skip_tags: tuple[str, ...] = RAISING_TAGS) -> str:
    """The solution notebook's code cells joined into one script (cells tagged ``skip_tags`` left out).

    Tests use it to import exactly the code that the solution notebook contains.
    """
    return "\n\n".join("\n".join(solution_lines(c)) for c in parse(path)
                       if c.kind == "code" and _in_copy(c, student=False)
                       and not set(c.tags) & set(skip_tags)) + "\n"


def _in_copy(cell: Cell, *, student: bool) -> bool:
    return all(keep == student for tag, keep in ONLY_TAGS.items() if tag in cell.tags)


def _source(lines: list[str]) -> list[str]:
    return [l + "\n" for l in lines[:-1]] + lines[-1:]


def _cell_id(stem: str, index: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', stem)[:56]}-{index:02d}"


def cell_key(cell: dict) -> tuple[str, str, tuple[str, ...]]:
    """What ``--check`` compares of a cell: its type, its source and its tags.

    Not its id, its other metadata, its outputs or execution count: Jupyter changes those when a notebook
    is opened and run, and they do not change the exercise.
    """
    source = cell.get("source", "")
    if isinstance(source, list):
        source = "".join(source)
    return cell.get("cell_type", ""), source, tuple(sorted(cell.get("metadata", {}).get("tags", [])))


def _digest(cell: dict) -> str:
    return hashlib.sha256(json.dumps(cell_key(cell), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def notebook(path: Path, *, student: bool) -> str:
    """The notebook JSON text for one source (student or solution copy).

    Cell ids come from the file name and the cell's index in the source, so they are the same in
    both copies and stable when a cell elsewhere changes. The notebook's metadata holds complete
    ``kernelspec`` and ``language_info`` entries (what JupyterLab would fill in, so that opening it changes
    little) and, under ``metatut``, a digest of every cell as generated: :func:`edited_cells` compares a
    notebook on disk with it to tell a learner's edits from a stale copy.
    """
    cells = []
    for index, cell in enumerate(parse(path)):
        if not _in_copy(cell, student=student):
            continue
        lines = student_lines(cell) if student else solution_lines(cell)
        tags = [t for t in cell.tags if t not in ONLY_TAGS]
        if student and set(tags) & set(RAISING_TAGS) and "raises-exception" not in tags:
            tags.append("raises-exception")
        entry = {"cell_type": cell.kind, "id": _cell_id(path.stem, index),
                 "metadata": {"tags": tags} if tags else {}, "source": _source(lines)}
        if cell.kind == "code":
            entry.update(execution_count=None, outputs=[])
        cells.append(entry)
    record = {"generated_from": f"src/{path.name}", "cells": {c["id"]: _digest(c) for c in cells}}
    nb = {"cells": cells,
          "metadata": {"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO, RECORD: record},
          "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files(src: Path = SRC, out: Path = HERE) -> dict[Path, str]:
    """Every generated path mapped to the text it must hold."""
    files: dict[Path, str] = {}
    for path in sorted(src.glob("[0-9][0-9]_*.py")):
        name = path.stem + ".ipynb"
        files[out / name] = notebook(path, student=True)
        files[out / "solutions" / name] = notebook(path, student=False)
    return files


def orphans(files: dict[Path, str], out: Path = HERE) -> list[Path]:
    """Generated-looking notebooks (``NN_name.ipynb``) that no source produces any more."""
    found = [p for d in (out, out / "solutions") if d.is_dir() for p in sorted(d.iterdir())
             if p.is_file() and _GENERATED.match(p.name)]
    return [p for p in found if p not in files]


def _read(path: Path) -> dict | None:
    """The notebook at ``path`` as a dict, or None when it is not readable notebook JSON."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(nb, dict) and isinstance(nb.get("cells"), list)
            and all(isinstance(c, dict) for c in nb["cells"])):
        return None
    return nb


def edited_cells(on_disk: dict, expected: dict | None = None) -> list[int]:
    """1-based positions of the cells of ``on_disk`` that were edited or added since it was generated.

    The notebook's own record (``metadata.metatut.cells``: cell id -> digest, written by :func:`notebook`)
    says what the generation that wrote it produced, so a later change of the source is not mistaken for
    an edit. A notebook without that record (written by an older generate.py) is compared with ``expected``
    (the current generation): a cell with an unknown id was added, and an answer cell (one whose generated
    source holds the ``# YOUR CODE HERE`` stub) that lost its stub was answered. Deleted cells do not count:
    regenerating restores them and loses nothing.
    """
    record = on_disk.get("metadata", {}).get(RECORD, {})
    record = record.get("cells") if isinstance(record, dict) else None
    if isinstance(record, dict):
        return [index for index, cell in enumerate(on_disk["cells"], start=1)
                if record.get(cell.get("id")) != _digest(cell)]
    generated = {c.get("id"): _has_stub(cell_key(c)[1]) for c in (expected or {}).get("cells", [])}
    return [index for index, cell in enumerate(on_disk["cells"], start=1)
            if cell.get("id") not in generated or generated[cell.get("id")] and not _has_stub(cell_key(cell)[1])]


def _has_stub(source: str) -> bool:
    lines = [line.strip() for line in source.splitlines()]
    return any(tuple(lines[i:i + len(STUB)]) == STUB for i in range(len(lines)))


def _describe(nb: dict, positions: list[int]) -> str:
    def first_line(index: int) -> str:
        text = cell_key(nb["cells"][index - 1])[1].strip().splitlines()
        line = text[0] if text else "(empty)"
        return line if len(line) <= 40 else line[:37] + "..."
    shown = [f"cell {i} ({first_line(i)})" for i in positions[:3]]
    return ", ".join(shown) + (f" and {len(positions) - 3} more" if len(positions) > 3 else "")


@dataclass
class Status:
    """What one generated path needs: ``action`` is one of ok, normalise, write, skip, delete."""
    path: Path
    action: str
    why: str = ""


def status(path: Path, text: str) -> Status:
    """Compare the notebook on disk at ``path`` with the generated ``text``.

    * ``ok``: identical bytes;
    * ``normalise``: the same cells (types, sources, tags), different metadata, outputs, execution counts
      or ids (Jupyter opened and ran it): up to date; generating rewrites it clean;
    * ``write``: missing, or the cells differ from the source (stale) and nobody edited it;
    * ``skip``: edited by hand since it was generated (a learner's answers?) or unreadable: never
      overwritten without ``--force``.
    """
    if not path.exists():
        return Status(path, "write", "missing")
    if path.read_bytes() == text.encode("utf-8"):
        return Status(path, "ok")
    expected, on_disk = json.loads(text), _read(path)
    if on_disk is None:
        return Status(path, "skip", "not readable as a notebook")
    edited = edited_cells(on_disk, expected)
    if edited:
        return Status(path, "skip", f"edited since it was generated: {_describe(on_disk, edited)}")
    if [cell_key(c) for c in on_disk["cells"]] == [cell_key(c) for c in expected["cells"]]:
        return Status(path, "normalise", "outputs or metadata only")
    return Status(path, "write", f"differs from src/{path.stem}.py")


def orphan_status(path: Path) -> Status:
    """An orphan is deleted only when it was generated (it has the record) and nobody edited it since."""
    on_disk = _read(path)
    if on_disk is None or not isinstance(on_disk.get("metadata", {}).get(RECORD), dict):
        return Status(path, "skip", "no source in src/, and not written by generate.py")
    edited = edited_cells(on_disk)
    if edited:
        return Status(path, "skip", f"no source in src/, and edited since it was generated: "
                                    f"{_describe(on_disk, edited)}")
    return Status(path, "delete", "no source in src/")


def _validate(files: dict[Path, str]) -> None:
    try:
        import nbformat
    except ImportError:  # nbformat is a test dependency; the generator works without it
        return
    for text in files.values():
        nbformat.validate(nbformat.reads(text, as_version=4))


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def _selected(path: Path, wanted: list[str]) -> bool:
    """Whether ``path`` is one of ``wanted``: a name such as ``02_inner_step`` (both copies), or a path
    relative to the working directory or to the repository root."""
    target = path.resolve()
    return any(item == path.stem or Path(item).resolve() == target or (HERE.parent / item).resolve() == target
               for item in wanted)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate the exercise notebooks from exercises/src/. A notebook edited since it was "
                    "generated (a learner's answers) is never overwritten without --force.")
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help="only these generated notebooks (paths, or names such as 02_inner_step: both copies); "
                             "default: all")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and list the generated files that are out of date "
                             "(compares the cells' types, sources and tags only)")
    parser.add_argument("--force", action="store_true",
                        help="also overwrite notebooks edited since they were generated (the edits are lost) and "
                             "delete orphaned generated-looking notebooks")
    parser.add_argument("--src", type=Path, default=SRC, help="the folder of the sources (default: exercises/src)")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="the folder to write to, solution copies in its solutions/ (default: exercises)")
    args = parser.parse_args(argv)
    try:
        files = expected_files(args.src, args.out)
    except SourceError as err:
        print(f"generate.py: {err}", file=sys.stderr)
        return 2
    if not files:
        print(f"generate.py: no sources found in {_show(args.src)}", file=sys.stderr)
        return 2
    _validate(files)
    statuses = [status(path, text) for path, text in files.items()]
    if args.notebooks:
        statuses = [s for s in statuses if _selected(s.path, args.notebooks)]
        if not statuses:
            print(f"generate.py: no generated notebook matches {' '.join(args.notebooks)}", file=sys.stderr)
            return 2
    else:
        statuses += [orphan_status(p) for p in orphans(files, args.out)]

    if args.check:
        stale = [s for s in statuses if s.action not in ("ok", "normalise")]
        if stale:
            print(f"generate.py --check: {len(stale)} generated file(s) out of date:", file=sys.stderr)
            for s in stale:
                print(f"  {_show(s.path)}  ({s.why})", file=sys.stderr)
            if any(s.action != "skip" for s in stale):
                print("Run `python exercises/generate.py` and commit the result.", file=sys.stderr)
            if any(s.action == "skip" for s in stale):
                print("generate.py never overwrites a notebook edited by hand (your answers stay); "
                      "`python exercises/generate.py --force NOTEBOOK` replaces one with a fresh copy, "
                      "losing its edits.", file=sys.stderr)
            return 1
        print(f"generate.py --check: all {len(files)} generated notebooks are up to date.")
        return 0

    changed, skipped = 0, []
    for s in statuses:
        if s.action == "skip" and not args.force:
            skipped.append(s)
            continue
        if s.action == "ok":
            continue
        if s.path in files:
            _write(s.path, files[s.path])
            verb = {"normalise": "cleaned", "skip": "replaced"}.get(s.action, "wrote  ")
            print(f"{verb} {_show(s.path)} ({s.why})")
        else:
            s.path.unlink()
            print(f"removed {_show(s.path)} ({s.why})")
        changed += 1
    for s in skipped:
        print(f"skipped {_show(s.path)}: {s.why}. Left as it is; to replace it with a fresh copy (its edits are "
              f"lost: save them elsewhere first), run `python exercises/generate.py --force {_show(s.path)}`.",
              file=sys.stderr)
    print(f"{len(files)} notebooks from {len(files) // 2} sources; {changed} changed"
          + (f", {len(skipped)} skipped." if skipped else "."))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
