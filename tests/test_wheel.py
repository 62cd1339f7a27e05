"""The library as a user installs it: the wheel's contents and requirements, and the README's
"use metatut in your own project" example run from a folder outside the checkout, in a fresh virtual
environment that holds the wheel and reuses this environment's torch (no download)."""
from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from test_readme import _example

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
               "-w", str(out), str(ROOT)]
    if _setuptools_is_recent():  # build offline with the installed setuptools; else pip fetches it
        command.insert(4, "--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = list(out.glob("metatut-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def test_wheel_holds_the_library_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "metatut/__init__.py" in names and "metatut/py.typed" in names
    assert {"metatut/course/__init__.py", "metatut/course/checks.py", "metatut/course/budget.py",
            "metatut/run/__init__.py", "metatut/run/session.py", "metatut/checks.py"} <= set(names)
    assert not [n for n in names if n.startswith(("notebooks/", "tests/", "exercises/", "bench/", "data/"))]
    assert not [n for n in names if n.endswith((".ipynb", ".pt"))]


def test_wheel_requires_torch_and_small_helpers_only(wheel):
    import metatut

    metadata = _metadata(wheel)
    assert re.search(rf"^Version: {re.escape(metatut.__version__)}$", metadata, re.M)  # one version number
    plain = sorted(re.split(r"[<>=!~ ;]", line.split(":", 1)[1].strip())[0].lower()
                   for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert plain == ["pillow", "torch", "tqdm"]
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert {"course", "tensorboard", "test"} <= extras
    assert "bash run.sh" not in metadata  # the index page describes the library, not the course's set-up


def test_readme_example_runs_from_an_installed_wheel_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # reuse this environment's torch and helpers: its site-packages as a plain path entry (its .pth files,
    # such as the editable install of the checkout, are not processed from there)
    (site / "reuse_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "project"
    work.mkdir()
    script = work / "example.py"
    script.write_text("import metatut, os\nprint('metatut from', os.path.dirname(metatut.__file__))\n"
                      "print('data in', metatut.data_dir(create=False))\n"
                      + _example())
    done = subprocess.run([str(python), str(script)], cwd=work, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "METATUT_PROGRESS": "0", "OMP_NUM_THREADS": "1",
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    where = re.search(r"metatut from (.*)", done.stdout).group(1)
    assert Path(where).resolve().is_relative_to(site.resolve()), where  # the wheel, not the checkout
    # METATUT_DATA unset, not a checkout: the per-user cache under HOME, never site-packages
    data = Path(re.search(r"data in (.*)", done.stdout).group(1))
    assert "site-packages" not in data.parts and not data.is_relative_to(site), data
    if sys.platform.startswith("linux"):
        assert data == tmp_path / ".cache" / "metatut", data
    assert re.search(r"after 1 steps: [\d.]+ ± [\d.]+ \(n=600\)", done.stdout)
    assert re.search(r"inner Adam, after 3 steps: [\d.]+ ± [\d.]+", done.stdout)  # every README example ran
    assert "MetaParams(" in done.stdout
