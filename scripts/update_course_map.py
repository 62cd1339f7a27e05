#!/usr/bin/env python3
"""Write the course map (generated from the committed notebooks, ``metatut.course.course_map``) into README.md.

Usage::

    python scripts/update_course_map.py           # rewrite the block between the markers in README.md
    python scripts/update_course_map.py --check   # exit 1 if README.md's block is out of date

The block sits between ``<!-- course-map:start -->`` and ``<!-- course-map:end -->``; tests/test_course_map.py
fails when it differs from what the notebooks say (titles, exercises, prose length, recorded run times).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- course-map:start -->", "<!-- course-map:end -->"


def rendered_readme(readme: str) -> str:
    sys.path.insert(0, str(ROOT))
    from metatut.course.course_map import course_map, format_course_map

    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{format_course_map(course_map(ROOT))}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    wanted = rendered_readme(current)
    if args.check:
        if current != wanted:
            print("README.md's course map is out of date: run python scripts/update_course_map.py", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        path.write_text(wanted, encoding="utf-8")
        print("updated the course map in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
