"""The examples in the docstrings run, and every public function and class of the library has one.

* ``test_doctests[metatut.x]``: one test per module of the package (found with ``pkgutil.walk_packages``,
  none left out silently), running its docstring examples with ``ELLIPSIS | NORMALIZE_WHITESPACE`` on one
  torch thread, with ``METATUT_PROGRESS=0``, from a temporary working folder, with ``tempfile``'s folder and
  ``METATUT_DATA`` inside it (examples write only under ``tempfile.mkdtemp()``). A module that cannot be
  imported because an optional dependency is missing is skipped with the reason; any other import error
  fails.
* ``test_every_public_name_has_an_example`` (marker ``doc_coverage``: run it alone with
  ``pytest tests/test_doctests.py -m doc_coverage``): every name in ``metatut.__all__`` and every public
  function or class defined in the library's modules (:data:`COVERED_MODULES`, :data:`COVERED_PACKAGES`) has
  a docstring with an example (a ``>>>`` line). The course layer (:data:`COURSE_LAYER`) is exempt from
  this rule but not from the doctest run. One failure lists every name that lacks an example.
"""
from __future__ import annotations

import doctest
import importlib
import inspect
import io
import os
import pkgutil
import tempfile
import types
from pathlib import Path

import pytest
import torch

import metatut

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# pyproject's [project] dependencies (import names): a missing one is a broken install, not an optional extra
CORE_DEPENDENCIES = frozenset({"metatut", "torch", "tqdm", "PIL"})

# Modules whose public functions and classes must each have an example (besides metatut.__all__) ...
COVERED_MODULES = frozenset({
    "metatut.fileio", "metatut.checkpoint", "metatut.timing", "metatut.device", "metatut.models",
    "metatut.progress", "metatut.distributed", "metatut.validate", "metatut.evaluate",
})
# ... and every module of these packages (the package's __init__ included)
COVERED_PACKAGES = ("metatut.engine", "metatut.tasks", "metatut.data")
# The course layer: exempt from the example rule (wherever its names are re-exported), not from the doctest run
COURSE_LAYER = ("metatut.checks", "metatut.course", "metatut.widgets", "metatut.plots")
EXEMPT_NAMES = frozenset({"metatut.cli.main", "metatut.course.cli.main"})


def _module_names() -> list[str]:
    """Every module of the package; a subpackage whose import fails is listed too (its test reports why).

    ``pkgutil.walk_packages`` does not enter a folder without ``__init__.py`` (an implicit namespace
    package), so the ``.py`` files on disk are added as well: no module is left out silently.
    """
    found: set[str] = {"metatut"}
    for info in pkgutil.walk_packages(metatut.__path__, "metatut.", onerror=found.add):
        found.add(info.name)
    for root in map(Path, metatut.__path__):
        for file in root.rglob("*.py"):
            parts = file.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if all(part.isidentifier() for part in parts):
                found.add(".".join(("metatut", *parts)))
    return sorted(found)


MODULES = _module_names()


def _import(name: str) -> types.ModuleType:
    """Import ``name``; skip the calling test if an optional (non-core) dependency is missing."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing and missing not in CORE_DEPENDENCIES:
            pytest.skip(f"{name} needs the optional dependency {err.name!r}, which is not installed ({err})")
        raise


@pytest.fixture
def doctest_environment(tmp_path, monkeypatch):
    """One torch thread, no progress bars, and every file an example writes under ``tmp_path``."""
    monkeypatch.setenv("METATUT_PROGRESS", "0")
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    environ = dict(os.environ)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    for key in set(os.environ) - set(environ):  # undo what an example set and did not unset
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.mark.parametrize("module_name", MODULES)
def test_doctests(module_name, doctest_environment):
    module = _import(module_name)
    tests = sorted(doctest.DocTestFinder(exclude_empty=True).find(module, module_name), key=lambda t: t.name)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = io.StringIO()
    failed = attempted = 0
    for test in tests:
        torch.manual_seed(0)  # each docstring's examples start from the same random state, whatever ran before
        result = runner.run(test, out=report.write)
        failed += result.failed
        attempted += result.attempted
    if failed:
        pytest.fail(f"{failed} of {attempted} doctest examples failed in {module_name}:\n{report.getvalue()}",
                    pytrace=False)


def _is_covered(module_name: str) -> bool:
    return module_name in COVERED_MODULES or any(
        module_name == p or module_name.startswith(p + ".") for p in COVERED_PACKAGES)


def _is_exempt(module_name: str, qualified: str) -> bool:
    course = any(module_name == p or module_name.startswith(p + ".") or module_name.startswith(p + "_")
                 for p in COURSE_LAYER)
    return course or qualified in EXEMPT_NAMES


def _own_docstring(obj) -> str:
    """``obj``'s own docstring (a class does not inherit its parent's here)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return doc if isinstance(doc, str) else ""


def _has_example(obj) -> bool:
    return any(line.lstrip().startswith(">>>") for line in _own_docstring(obj).splitlines())


def _public_callables() -> tuple[dict[str, object], list[str]]:
    """``{qualified name: function or class}`` the example rule applies to, and modules that failed to import."""
    found: dict[str, object] = {}
    problems = []

    def add(obj) -> None:
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            return  # modules (metatut.accel), type aliases (Params), constants
        module_name = getattr(obj, "__module__", None) or "?"
        qualified = f"{module_name}.{obj.__qualname__}"
        if not _is_exempt(module_name, qualified):
            found[qualified] = obj

    for name in metatut.__all__:
        if not hasattr(metatut, name):
            problems.append(f"metatut.__all__ names {name!r}, which metatut does not define")
            continue
        add(getattr(metatut, name))
    for module_name in MODULES:
        if not _is_covered(module_name) or _is_exempt(module_name, ""):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            problems.append(f"{module_name} cannot be imported ({type(err).__name__}: {err})")
            continue
        for name, obj in vars(module).items():
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name:
                add(obj)
    return found, problems


doc_coverage = pytest.mark.doc_coverage  # registered in pyproject.toml; select with -m doc_coverage


@doc_coverage
def test_every_public_name_has_an_example():
    found, problems = _public_callables()
    missing = sorted(qualified for qualified, obj in found.items() if not _has_example(obj))
    assert found, "found no public functions or classes at all"
    if missing or problems:
        lines = [f"{len(missing)} of {len(found)} public functions and classes have no docstring example "
                 "(a '>>>' line):", *(f"  {q}" for q in missing), *problems]
        pytest.fail("\n".join(lines), pytrace=False)
