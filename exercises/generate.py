"""Write the exercise notebooks from their sources, or check that they are up to date.

Usage (from anywhere)::

    python exercises/generate.py           # (re)write every generated notebook
    python exercises/generate.py --check   # write nothing; exit 1 and list the stale files

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
and the cell's index, sorted keys, one-space indentation, a final newline.
"""
from __future__ import annotations

import argparse
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
    for number, line in zip(cell.numbers, cell.lines):
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


def notebook(path: Path, *, student: bool) -> str:
    """The notebook JSON text for one source (student or solution copy).

    Cell ids come from the file name and the cell's index in the source, so they are the same in
    both copies and stable when a cell elsewhere changes.
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
    nb = {"cells": cells,
          "metadata": {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}},
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


def _validate(files: dict[Path, str]) -> None:
    try:
        import nbformat
    except ImportError:  # nbformat is a test dependency; the generator works without it
        return
    for path, text in files.items():
        nbformat.validate(nbformat.reads(text, as_version=4))


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the exercise notebooks from exercises/src/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and list the generated files that are out of date")
    args = parser.parse_args(argv)
    try:
        files = expected_files()
    except SourceError as err:
        print(f"generate.py: {err}", file=sys.stderr)
        return 2
    if not files:
        print(f"generate.py: no sources found in {_show(SRC)}", file=sys.stderr)
        return 2
    _validate(files)
    stale = []
    for path, text in files.items():
        if not path.exists():
            stale.append((path, "missing"))
        elif path.read_bytes() != text.encode("utf-8"):
            stale.append((path, f"differs from src/{path.stem}.py"))
    stale += [(p, "no source in src/: delete it") for p in orphans(files)]
    if args.check:
        if stale:
            print(f"generate.py --check: {len(stale)} generated file(s) out of date:", file=sys.stderr)
            for path, why in stale:
                print(f"  {_show(path)}  ({why})", file=sys.stderr)
            print("Run `python exercises/generate.py` and commit the result.", file=sys.stderr)
            return 1
        print(f"generate.py --check: all {len(files)} generated notebooks are up to date.")
        return 0
    for path, why in stale:
        if why.startswith("no source"):
            path.unlink()
            print(f"removed {_show(path)} (no source)")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(files[path])
            print(f"wrote   {_show(path)}")
    print(f"{len(files)} notebooks from {len(files) // 2} sources; {len(stale)} changed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
