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


# A learner's notebook whose function raises inside torch: the check cell must show the hint first, then the
# learner's own line (as "Cell In[n]") and the error's last line, and no frame of metatut's checkers.
LEARNER_ERROR = nbformat.v4.new_notebook(cells=[
    nbformat.v4.new_code_cell("import torch\nimport torch.nn.functional as F\n\n"
                              "from metatut.checks import check_inner_step"),
    nbformat.v4.new_code_cell("def inner_step(f, params, x, y, inner_lr, create_graph):\n"
                              "    loss = F.mse_loss(f(params, x), y)\n"
                              "    grads = torch.autograd.grad(loss, list(params.values()))\n"
                              "    for p, g in zip(params.values(), grads, strict=True):\n"
                              "        p -= inner_lr * g\n"
                              "    return params"),
    nbformat.v4.new_code_cell("check_inner_step(inner_step)"),
])


@pytest.fixture(scope="module")
def executed(monkeypatch_module_env):
    """{path relative to exercises/: executed notebook} for every student and solution notebook, and
    ``learner-error`` for :data:`LEARNER_ERROR`."""
    paths = [f"{stem}.ipynb" for stem in STEMS] + [f"solutions/{stem}.ipynb" for stem in STEMS]
    notebooks = {p: nbformat.read(EXERCISES / p, as_version=4) for p in paths}
    notebooks["learner-error"] = nbformat.from_dict(json.loads(json.dumps(LEARNER_ERROR)))
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


@pytest.fixture
def workspace(tmp_path):
    """A copy of the sources and the notebooks generated from them under tmp_path, and a runner for generate.py."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(EXERCISES / "src", src)
    gen = _load_generator()

    def run(*args: str) -> int:
        return gen.main([*args, "--src", str(src), "--out", str(out)])
    assert run() == 0
    assert run("--check") == 0
    return gen, src, out, run


def _bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*.ipynb"))}


def _answer_cell(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if "raise NotImplementedError()" in c.source)


def test_check_lists_stale_missing_and_orphaned_files_without_writing(workspace, capsys):
    gen, src, out, run = workspace
    shutil.copy(src / f"{STEMS[2]}.py", src / "98_extra.py")
    assert run() == 0
    (src / "98_extra.py").unlink()                                         # a generated orphan
    stale = src / f"{STEMS[0]}.py"
    stale.write_text(stale.read_text(encoding="utf-8").replace("## Check", "## Check your function"),
                     encoding="utf-8")
    (out / "solutions" / f"{STEMS[1]}.ipynb").unlink()
    (out / "99_removed.ipynb").write_text("{}", encoding="utf-8")          # an orphan generate.py did not write
    before = _bytes(out)
    capsys.readouterr()

    assert run("--check") == 1
    stderr = capsys.readouterr().err
    assert f"{STEMS[0]}.ipynb  (differs from src/{STEMS[0]}.py)" in stderr
    assert f"solutions/{STEMS[1]}.ipynb  (missing)" in stderr
    assert "98_extra.ipynb  (no source in src/)" in stderr
    assert "99_removed.ipynb  (no source in src/, and not written by generate.py)" in stderr
    assert "python exercises/generate.py" in stderr
    assert _bytes(out) == before  # --check writes nothing

    assert run() == 1  # the foreign orphan is left alone
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "99_removed.ipynb" in captured.err and "--force" in captured.err
    assert not (out / "98_extra.ipynb").exists() and not (out / "solutions" / "98_extra.ipynb").exists()
    assert (out / "99_removed.ipynb").exists()
    assert run("--force") == 0
    assert run("--check") == 0
    assert not (out / "99_removed.ipynb").exists()
    assert _bytes(out) == {p: t.encode("utf-8") for p, t in gen.expected_files(src, out).items()}


def test_generated_metadata_is_what_jupyterlab_writes():
    gen = _load_generator()
    for text in gen.expected_files().values():
        metadata = json.loads(text)["metadata"]
        assert metadata["kernelspec"] == {"display_name": "Python 3 (ipykernel)", "language": "python",
                                          "name": "python3"}
        info = metadata["language_info"]
        assert info["name"] == "python" and info["codemirror_mode"] == {"name": "ipython", "version": 3}
        assert {"file_extension": ".py", "mimetype": "text/x-python", "nbconvert_exporter": "python",
                "pygments_lexer": "ipython3"}.items() <= info.items()
        assert re.fullmatch(r"3\.\d+\.\d+", info["version"])


def test_opening_and_running_in_jupyterlab_keeps_check_passing(workspace, capsys):
    """JupyterLab fills in language_info (with this machine's version), runs cells and autosaves."""
    gen, src, out, run = workspace
    opened = out / f"{STEMS[1]}.ipynb"
    nb = nbformat.read(opened, as_version=4)
    nb.metadata.language_info.update(version="3.13.99", name="python")
    nb.metadata.kernelspec.display_name = "Python 3 (ipykernel)"
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for count, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), start=1):
        cell.execution_count = count
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {count}\n")]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00.000000Z"}
        cell.metadata["trusted"] = True
    nbformat.write(nb, opened)
    assert opened.read_bytes() != gen.expected_files(src, out)[opened].encode("utf-8")

    assert run("--check") == 0
    capsys.readouterr()
    assert run() == 0   # not an edit: regenerating cleans it
    assert f"cleaned {opened} (outputs or metadata only)" in capsys.readouterr().out
    assert opened.read_bytes() == gen.expected_files(src, out)[opened].encode("utf-8")


def test_generate_never_overwrites_a_learners_answers(workspace, capsys):
    gen, src, out, run = workspace
    answered = out / f"{STEMS[1]}.ipynb"
    nb = nbformat.read(answered, as_version=4)
    answer = _answer_cell(nb)
    nb.cells[answer].source = nb.cells[answer].source.replace("raise NotImplementedError()", "return my_answer")
    nb.cells[answer].execution_count = 3
    nbformat.write(nb, answered)
    # ... and meanwhile a maintainer changed that exercise's source (its other copy and the rest are stale).
    source = src / f"{STEMS[1]}.py"
    source.write_text(source.read_text(encoding="utf-8").replace("## Check", "## Check your function"),
                      encoding="utf-8")
    mine = answered.read_bytes()
    capsys.readouterr()

    assert run("--check") == 1
    err = capsys.readouterr().err
    assert f"{STEMS[1]}.ipynb  (edited since it was generated: cell {answer + 1} (def " in err
    assert "--force" in err

    assert run() == 1
    captured = capsys.readouterr()
    assert answered.read_bytes() == mine                                  # the answers are still there
    assert f"skipped {answered}: edited since it was generated: cell {answer + 1}" in captured.err
    assert f"--force {answered}" in captured.err
    assert f"solutions/{STEMS[1]}.ipynb (differs from src/{STEMS[1]}.py)" in captured.out  # the rest is updated

    assert run("--force", str(answered)) == 0
    assert run("--check") == 0
    assert answered.read_bytes() == gen.expected_files(src, out)[answered].encode("utf-8")


def test_cells_the_learner_added_count_as_edits(workspace, capsys):
    gen, src, out, run = workspace
    notebook = out / "solutions" / f"{STEMS[0]}.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.insert(3, nbformat.v4.new_code_cell("print('my notes')"))
    nbformat.write(nb, notebook)
    mine = notebook.read_bytes()
    assert run() == 1
    assert notebook.read_bytes() == mine
    assert "cell 4 (print('my notes'))" in capsys.readouterr().err
    assert run("--force") == 0 and run("--check") == 0


def test_notebooks_from_an_older_generator_without_the_record(workspace):
    """No record of the generated cells: an answer cell that lost its stub, or an added cell, is an edit;
    a source change alone is not."""
    gen, src, out, run = workspace
    student, solution = out / f"{STEMS[2]}.ipynb", out / "solutions" / f"{STEMS[2]}.ipynb"
    for path in (student, solution):
        nb = nbformat.read(path, as_version=4)
        del nb.metadata["metatut"]
        nb.cells[0].source += " (old title)"
        nbformat.write(nb, path)
    nb = nbformat.read(student, as_version=4)
    assert gen.edited_cells(nb, json.loads(gen.expected_files(src, out)[student])) == []
    answer = _answer_cell(nb)
    nb.cells[answer].source = nb.cells[answer].source.replace("# YOUR CODE HERE\n", "")
    nbformat.write(nb, student)
    mine = student.read_bytes()
    assert run() == 1
    assert student.read_bytes() == mine
    assert solution.read_bytes() == gen.expected_files(src, out)[solution].encode("utf-8")


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
            # What Jupyter shows: the message alone (the hint), no traceback through metatut's checkers.
            shown = errors[0]["traceback"]
            assert len(shown) == 1 and shown[0].startswith("✘ check_"), shown
            assert "implement the function first" in shown[0] and "metatut" not in shown[0]
        elif "demo" in _tags(cell):
            assert [e["ename"] for e in errors] in ([], ["NotImplementedError"]), (cell.source, errors)
        else:
            assert not errors, (cell.source, errors)
        if _tags(cell) & {"check", "demo"}:
            assert "raises-exception" in _tags(cell)  # Jupyter's Run All and nbval go on past them


def test_learner_error_shows_hint_then_the_learners_cell(executed):
    nb = executed["learner-error"]
    assert not _errors(nb.cells[0]) and not _errors(nb.cells[1])
    [error] = _errors(nb.cells[2])
    assert error["ename"] == "CheckFailed"
    shown = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in error["traceback"]]
    assert shown[0] == "✘ check_inner_step failed: your function raised RuntimeError.", shown
    assert shown[1].startswith("Hint: do not modify params in place"), shown
    cell = f"Cell In[{nb.cells[1].execution_count}]"  # the learner's cell, as IPython names it
    assert shown[-4:-1] == ["In your code:", f"  {cell}, line 5, in inner_step", "    p -= inner_lr * g"], shown
    assert shown[-1].startswith("RuntimeError: a leaf Variable that requires grad"), shown
    text = "\n".join(shown)
    assert "metatut" not in text and "site-packages" not in text and "Traceback" not in text, text


@pytest.mark.parametrize("stem", STEMS)
def test_solution_notebook_runs(stem, executed):
    nb = executed[f"solutions/{stem}.ipynb"]
    for cell in nb.cells:
        assert not _errors(cell), (cell.source, _errors(cell))
        assert "raises-exception" not in _tags(cell)
        if "check" in _tags(cell):
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            assert text.startswith("✔ check_") and text.count("\n") == 1, text
