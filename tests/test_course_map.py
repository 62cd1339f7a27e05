"""The course map (notebook 00, README.md) is generated from the notebooks and complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from metatut.course.course_map import CourseEntry, course_map, format_course_map

ROOT = Path(__file__).resolve().parents[1]


def test_the_map_lists_every_notebook_and_every_exercise():
    entries = course_map(ROOT)
    assert [e.path for e in entries] == sorted(p.relative_to(ROOT).as_posix()
                                                for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    listed = sorted(s for e in entries for s in e.exercises)
    assert listed == sorted(p.stem for p in (ROOT / "exercises" / "src").glob("*.py")), \
        "every exercise source must say which course notebook it goes with ('Goes with course notebook [NN_...')"
    assert all(e.title for e in entries), [e.path for e in entries if not e.title]


def test_every_committed_notebook_records_its_laptop_run():
    missing = [e.path for e in course_map(ROOT) if e.budget != "laptop" or e.seconds is None]
    assert not missing, (f"{missing}: execute with python scripts/execute_notebook.py (laptop budget, one notebook "
                         "at a time) so that the course map can quote the run time")


def test_readme_course_map_is_up_to_date():
    result = subprocess.run([sys.executable, "scripts/update_course_map.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_notebook_00_renders_the_map_from_the_notebooks():
    nb = json.loads((ROOT / "notebooks" / "00_setup.ipynb").read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("course_map(" in s for s in sources), "notebook 00 must render the course map with course_map()"


def test_format_reports_budget_and_missing_runs():
    text = format_course_map([CourseEntry("01", "notebooks/01_a.ipynb", "A", 10, (), "ci", 5.0, "m"),
                              CourseEntry("02", "notebooks/02_b.ipynb", "B", 20)])
    assert "5 s (ci budget)" in text and "not recorded" in text and "on: m." in text
