"""pyproject.toml and environment.yml list the same dependencies (library, course and test) with the same bounds."""
import re
import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _split(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", requirement)
    assert m, requirement
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pip_side = dict(_split(r) for r in project["dependencies"] + extras["course"] + extras["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda_side = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict) or dep == "pip":
            continue
        name, spec = _split(dep)
        if name == "python":
            assert spec == ">=" + project["requires-python"].lstrip(">=")
            continue
        conda_side[CONDA_NAMES.get(name, name)] = spec
    assert conda_side == pip_side, (
        f"only in pyproject: {sorted(set(pip_side.items()) - set(conda_side.items()))}; "
        f"only in environment.yml: {sorted(set(conda_side.items()) - set(pip_side.items()))}")


def test_torch_is_not_pinned_to_a_local_build():
    text = (ROOT / "pyproject.toml").read_text()
    assert "+cpu" not in text and "torch==" not in text
