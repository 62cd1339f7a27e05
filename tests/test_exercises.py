"""The exercise notebooks: generated files up to date, student copies fail their checks, solutions run.

All six notebooks are executed with nbclient in ONE kernel (python3, working directory exercises/,
METATUT_FAST=1), the namespace reset with ``%reset -f`` between notebooks: each notebook starts from
an empty namespace, and torch is imported once. In a student copy every check cell must raise (the
stub's NotImplementedError turned into CheckFailed), demo cells may raise NotImplementedError, and no
other cell may fail. A solution copy must run without any error and each check cell must print its
one ✔ line. (CI also runs the solution notebooks under nbval, each in its own kernel.)
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "exercises"
SOURCES = sorted((EXERCISES / "src").glob("[0-9][0-9]_*.py"))
STEMS = [p.stem for p in SOURCES]


def _load_generator(path: Path = EXERCISES / "generate.py", name: str = "exercises_generate"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _errors(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


@pytest.fixture(scope="module")
def executed(monkeypatch_module_env):
    """{path relative to exercises/: executed notebook} for every student and solution notebook."""
    paths = [f"{stem}.ipynb" for stem in STEMS] + [f"solutions/{stem}.ipynb" for stem in STEMS]
    notebooks = {p: nbformat.read(EXERCISES / p, as_version=4) for p in paths}
    reset = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%reset -f")])
    client = NotebookClient(reset, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(EXERCISES)}})
    with client.setup_kernel():
        for nb in notebooks.values():
            client.nb = reset
            client.execute_cell(reset.cells[0], 0)
            assert not _errors(reset.cells[0]), reset.cells[0].outputs
            client.nb = nb
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
    return notebooks


@pytest.fixture(scope="module")
def monkeypatch_module_env():
    """METATUT_FAST=1 for the kernel (it inherits the environment): CI budget in demo cells."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METATUT_FAST", "1")
        yield


# ----------------------------------------------------------------------------------------- generator
def test_exercise_set():
    assert {"01_summed_task_loss", "02_inner_step", "03_maml_loss"} <= set(STEMS)


@pytest.mark.parametrize("stem", STEMS)
def test_relative_links_resolve(stem):
    for path in (EXERCISES / f"{stem}.ipynb", EXERCISES / "solutions" / f"{stem}.ipynb"):
        nb = json.loads(path.read_text(encoding="utf-8"))
        text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_generated_files_are_up_to_date():
    result = subprocess.run([sys.executable, str(EXERCISES / "generate.py"), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, (
        f"generated exercise notebooks are stale; run `python exercises/generate.py`\n{result.stderr}")


def test_check_lists_stale_missing_and_orphaned_files_without_writing(tmp_path, capsys):
    shutil.copy(EXERCISES / "generate.py", tmp_path / "generate.py")
    shutil.copytree(EXERCISES / "src", tmp_path / "src")
    gen = _load_generator(tmp_path / "generate.py", "exercises_generate_copy")  # writes under tmp_path
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0

    edited = tmp_path / f"{STEMS[0]}.ipynb"
    edited.write_text(edited.read_text(encoding="utf-8").replace("YOUR CODE HERE", "my code"), encoding="utf-8")
    (tmp_path / "solutions" / f"{STEMS[1]}.ipynb").unlink()
    (tmp_path / "99_removed.ipynb").write_text("{}", encoding="utf-8")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.ipynb")}
    capsys.readouterr()

    assert gen.main(["--check"]) == 1
    stderr = capsys.readouterr().err
    assert f"{STEMS[0]}.ipynb  (differs from src/{STEMS[0]}.py)" in stderr
    assert f"solutions/{STEMS[1]}.ipynb  (missing)" in stderr
    assert "99_removed.ipynb  (no source" in stderr
    assert "python exercises/generate.py" in stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.ipynb")} == before  # --check writes nothing

    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    assert not (tmp_path / "99_removed.ipynb").exists()


def test_output_is_deterministic_and_clean():
    gen = _load_generator()
    first, second = gen.expected_files(), gen.expected_files()
    assert first == second and len(first) == 2 * len(STEMS)
    for path, text in first.items():
        nb = json.loads(text)
        nbformat.validate(nbformat.from_dict(nb))
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        ids = [c["id"] for c in nb["cells"]]
        assert len(set(ids)) == len(ids) and all(i.startswith(path.stem) for i in ids)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["execution_count"] is None and cell["outputs"] == []
        assert "TODO" not in text and "### BEGIN SOLUTION" not in text and "### END SOLUTION" not in text
        student = path.parent.name != "solutions"
        assert ("YOUR CODE HERE" in text) == student and ("Solution copy" in text) == (not student)
        assert all(not {"student-only", "solution-only"} & set(c["metadata"].get("tags", []))
                   for c in nb["cells"])


@pytest.mark.parametrize("stem", STEMS)
def test_student_copy_hides_the_solution(stem):
    gen = _load_generator()
    cells = gen.parse(EXERCISES / "src" / f"{stem}.py")
    student = json.loads((EXERCISES / f"{stem}.ipynb").read_text(encoding="utf-8"))
    text = "".join("".join(c["source"]) for c in student["cells"])
    for cell in cells:
        inside = False
        for line in cell.lines:
            if line.strip() == gen.BEGIN:
                inside = True
                indent = line[: len(line) - len(line.lstrip())]
                assert f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError()" in text
            elif line.strip() == gen.END:
                inside = False
            elif inside and line.strip():
                assert line not in text, f"solution line leaked into the student copy: {line!r}"


def test_parse_errors_name_file_and_line(tmp_path):
    gen = _load_generator()
    source = tmp_path / "01_bad.py"
    source.write_text('# %%\ndef f():\n    ### BEGIN SOLUTION\n    return 1\n\n# %% tags=["check"]\nf()\n')
    with pytest.raises(gen.SourceError, match=r"01_bad.py:3: '### BEGIN SOLUTION' without"):
        gen.parse(source)
    source.write_text("# %% [markdown]\nnot a comment\n")
    with pytest.raises(gen.SourceError, match=r"01_bad.py:2: markdown lines must start"):
        gen.parse(source)


# ------------------------------------------------------------------------------------- execution
@pytest.mark.parametrize("stem", STEMS)
def test_student_notebook_check_cells_raise(stem, executed):
    nb = executed[f"{stem}.ipynb"]
    assert any("check" in _tags(c) for c in nb.cells), "an exercise needs a check cell"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = _errors(cell)
        if "check" in _tags(cell):
            assert [e["ename"] for e in errors] == ["CheckFailed"], (cell.source, errors)
            assert "implement the function first" in errors[0]["evalue"]
        elif "demo" in _tags(cell):
            assert [e["ename"] for e in errors] in ([], ["NotImplementedError"]), (cell.source, errors)
        else:
            assert not errors, (cell.source, errors)
        if _tags(cell) & {"check", "demo"}:
            assert "raises-exception" in _tags(cell)  # Jupyter's Run All and nbval go on past them


@pytest.mark.parametrize("stem", STEMS)
def test_solution_notebook_runs(stem, executed):
    nb = executed[f"solutions/{stem}.ipynb"]
    for cell in nb.cells:
        assert not _errors(cell), (cell.source, _errors(cell))
        assert "raises-exception" not in _tags(cell)
        if "check" in _tags(cell):
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            assert text.startswith("✔ check_") and text.count("\n") == 1, text
