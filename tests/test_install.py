"""The library as installed: it imports and trains without the course's packages, keeps its data out of
site-packages (each branch of the data-folder rule), downloads without torchvision, and the training
command's loose ends (device for second order, process group, checks before data, the sinusoid width)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import metatut as mt
from metatut import budget, cli
from metatut.data import omniglot as om
from metatut.distributed import DistributedContext
from metatut.run import build, session

ROOT = Path(__file__).resolve().parents[1]
COURSE_ONLY = ("matplotlib", "ipywidgets", "torchvision", "tensorboard")


# --------------------------------------------------------------------- the library without the course
def test_library_imports_and_trains_without_the_course_packages(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {COURSE_ONLY!r}
        for name in BLOCKED:           # what Python does for a package that is not installed: ImportError
            sys.modules[name] = None
        import torch
        import metatut as mt, metatut.cli, metatut.data, metatut.run, metatut.checks, metatut.course.budget
        model = mt.mlp(hidden=(8,), seed=0)
        params = mt.init_params(model)
        batch = mt.SinusoidTasks().sample(2, 3, 3, generator=mt.make_generator(0))
        loss = mt.maml_loss(model, params, batch, inner_lr=0.01)
        assert torch.isfinite(loss)
        code = metatut.cli.main(["--set", "steps=2", "meta_batch=2", "width=4", "eval_tasks=2", "progress=false",
                                 "out_dir={(tmp_path / 'run').as_posix()}"])
        assert code == 0, code
        assert mt.pick(ci=1, laptop=2) in (1, 2) and callable(metatut.checks.check_inner_step)
        try:
            import metatut.widgets
        except ImportError as err:
            assert "matplotlib" in str(err), err
        else:
            raise AssertionError("metatut.widgets imported without matplotlib")
        loaded = sorted(n for n, m in sys.modules.items() if n.split(".")[0] in BLOCKED and m is not None)
        assert not loaded, loaded
        print("library ok")
    """)
    env = {**os.environ, "METATUT_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "library ok" in done.stdout


def test_old_course_import_paths_are_the_moved_modules():
    import metatut.checks
    import metatut.checks_family
    import metatut.checks_fewshot
    import metatut.course.checks
    import metatut.course.checks_family
    import metatut.course.checks_fewshot
    from metatut.checks import CheckFailed, check_episode_sampler, check_meta_sgd_inner_step  # the lazy ones too

    assert metatut.checks is metatut.course.checks and metatut.checks_family is metatut.course.checks_family
    assert metatut.checks_fewshot is metatut.course.checks_fewshot
    assert CheckFailed is metatut.course.checks.CheckFailed
    assert check_episode_sampler is metatut.course.checks_fewshot.check_episode_sampler
    assert check_meta_sgd_inner_step is metatut.course.checks_family.check_meta_sgd_inner_step
    assert budget.pick is mt.pick and budget.profile is mt.profile and budget.quiet is mt.course.budget.quiet
    # the checkers' "not your code" folders are the whole package, not metatut/course alone
    assert str(Path(mt.__file__).resolve().parent) in metatut.checks._library_dirs()


# ------------------------------------------------------------------------------- the data folder
@pytest.fixture
def no_data_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("METATUT_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_data_dir_prefers_the_environment_setting(no_data_setting, monkeypatch):
    monkeypatch.setenv("METATUT_DATA", str(no_data_setting / "mine"))
    assert mt.data_dir(create=False) == no_data_setting / "mine"


def test_data_dir_in_a_source_checkout_is_its_data_folder(no_data_setting, monkeypatch):
    checkout = no_data_setting / "checkout"
    (checkout / "metatut").mkdir(parents=True)
    (checkout / "data").mkdir()
    (checkout / "pyproject.toml").write_text("[project]\n")
    (checkout / "data" / "README.md").write_text("# data\n")
    monkeypatch.setattr(budget, "_PACKAGE_DIR", checkout / "metatut")
    assert mt.data_dir(create=False) == checkout / "data"
    assert budget.check_environment()["data"] == checkout / "data"
    # this checkout itself
    monkeypatch.setattr(budget, "_PACKAGE_DIR", ROOT / "metatut")
    assert mt.data_dir(create=False) == ROOT / "data"


def test_data_dir_of_an_installed_package_is_the_user_cache(no_data_setting, monkeypatch):
    site = no_data_setting / "lib" / "site-packages"
    (site / "metatut").mkdir(parents=True)
    (site / "data").mkdir()             # a stray folder beside the package is not a checkout
    monkeypatch.setattr(budget, "_PACKAGE_DIR", site / "metatut")
    monkeypatch.setattr(budget.sys, "platform", "linux")
    home = no_data_setting / "home"
    assert mt.data_dir(create=False) == home / ".cache" / "metatut"
    monkeypatch.setenv("XDG_CACHE_HOME", str(no_data_setting / "xdg"))
    assert mt.data_dir(create=False) == no_data_setting / "xdg" / "metatut"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")        # not absolute: ignored, as XDG says
    assert mt.data_dir(create=False) == home / ".cache" / "metatut"
    created = mt.data_dir()
    assert created.is_dir() and "site-packages" not in created.parts


def test_user_cache_dir_follows_each_platform(no_data_setting, monkeypatch):
    home = no_data_setting / "home"
    assert budget.user_cache_dir("darwin", {}) == home / "Library" / "Caches" / "metatut"
    assert budget.user_cache_dir("win32", {"LOCALAPPDATA": str(no_data_setting / "local")}) == \
        no_data_setting / "local" / "metatut" / "Cache"
    assert budget.user_cache_dir("win32", {}) == home / "AppData" / "Local" / "metatut" / "Cache"
    assert budget.user_cache_dir("linux", {}) == home / ".cache" / "metatut"
    assert budget.user_cache_dir("freebsd13", {"XDG_CACHE_HOME": "/x"}) == Path("/x/metatut")


# --------------------------------------------------------------------------- download without torchvision
def test_download_goes_through_torch_hub_and_is_verified(tmp_path, monkeypatch):
    payload = b"an official zip"
    calls = []

    def fake_hub_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).parent))
        Path(dst).write_bytes(payload)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_hub_download)
    import hashlib
    digest = hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(om.OFFICIAL_ZIPS, "images_background", ("images_background.zip", digest))
    path = om.fetch_zip("images_background", tmp_path / "root")
    assert path.read_bytes() == payload and path == tmp_path / "root" / "images_background.zip"
    url, folder = calls[0]
    assert url == f"{om.URL_PREFIX}/images_background.zip"
    assert folder != tmp_path / "root" and folder.parent == tmp_path / "root"   # a private temporary folder
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["images_background.zip"]
    assert om.check_integrity(path, hashlib.sha256(payload).hexdigest())        # SHA-256 works too
    assert not om.check_integrity(path, "0" * 32)
    with pytest.raises(ValueError, match="MD5 .* or a SHA-256"):
        om.check_integrity(path, "abc")
    payload = b"damaged"
    path.unlink()
    with pytest.raises(RuntimeError, match="MD5"):
        om.fetch_zip("images_background", tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []


def test_the_data_module_does_not_name_torchvision_in_code():
    code = [line for line in (ROOT / "metatut" / "data" / "omniglot.py").read_text().splitlines()
            if "import" in line and "torchvision" in line]
    assert not code


# --------------------------------------------------------------------------------- the training command
SMALL = ["steps=2", "meta_batch=2", "eval_tasks=2", "progress=false"]


def _cfg(tmp_path, *more):
    return cli.load_config(None, [*SMALL, f"out_dir={(tmp_path / 'run').as_posix()}", *more])


@pytest.mark.parametrize("algorithm, second_order", [("maml", True), ("anil", True), ("metasgd", True),
                                                     ("fomaml", False), ("reptile", False)])
def test_second_order_algorithms_choose_their_device_with_maml_device(tmp_path, monkeypatch, algorithm,
                                                                      second_order):
    seen = []

    def recording_maml_device(device, *, second_order=True):
        seen.append((torch.device(device).type, second_order))
        return torch.device("cpu")

    monkeypatch.setattr(build, "maml_device", recording_maml_device)
    assert build.select_device(_cfg(tmp_path, f"algorithm={algorithm}", "device=cpu")) == torch.device("cpu")
    assert seen == [("cpu", second_order)]


def test_a_device_that_cannot_differentiate_twice_falls_back_to_the_cpu(tmp_path, monkeypatch):
    from metatut import accel
    monkeypatch.setattr(build, "pick_device", lambda prefer=None: torch.device("cpu"))
    monkeypatch.setattr(accel, "pick_device", lambda prefer=None: torch.device("meta"))   # stands for MPS
    monkeypatch.setattr(accel, "supports_double_backward", lambda device: "double backward is not implemented")
    with pytest.warns(RuntimeWarning, match="runs on the CPU instead"):
        assert build.select_device(_cfg(tmp_path, "algorithm=maml")) == torch.device("cpu")
    assert build.select_device(_cfg(tmp_path, "algorithm=fomaml")) == torch.device("meta")  # first order stays


def _single_process_group(tmp_path):
    def init(device):
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        return DistributedContext()
    return init


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_the_process_group_the_command_created_is_destroyed_also_on_error(tmp_path, monkeypatch):
    monkeypatch.setattr(session, "init_distributed", _single_process_group(tmp_path))
    cli.train(_cfg(tmp_path))
    assert not dist.is_initialized()
    with pytest.raises(cli.ConfigError, match="no checkpoint"):
        cli.train(_cfg(tmp_path, f"out_dir={(tmp_path / 'other').as_posix()}"), resume=True)
    assert not dist.is_initialized()
    # a group that existed before is the caller's: left alone
    (tmp_path / "own").mkdir()
    _single_process_group(tmp_path / "own")(torch.device("cpu"))
    try:
        cli.train(_cfg(tmp_path, f"out_dir={(tmp_path / 'third').as_posix()}"))
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_task_streams_are_checked_against_the_processes_before_the_data_is_loaded(tmp_path, monkeypatch):
    def no_loading(cfg):
        raise AssertionError("the data was loaded before task_streams was checked")
    monkeypatch.setattr(cli, "_omniglot_split", no_loading)
    cfg = cli.TrainConfig(task="omniglot", dataset="small", steps=2, width=4, meta_batch=3, task_streams=3,
                          progress=False, device="cpu", out_dir=str(tmp_path / "run")).validate()
    with pytest.raises(cli.ConfigError, match=r"task_streams \(3\) must be a multiple of the number of processes \(2\)"):
        cli.train(cfg, context=DistributedContext(rank=0, world_size=2))
    assert not (tmp_path / "run").exists()


def test_sinusoid_width_defaults_to_the_papers_40_and_is_recorded(tmp_path):
    import json
    cfg = _cfg(tmp_path)
    assert cfg.width is None
    outcome = cli.train(cfg)
    assert outcome["params"]["0.weight"].shape == (40, 1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == 40
    assert cli.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["width"] == 40
    # resuming without a width resumes the recorded one; a run recorded with another width says what to give
    assert cli.train(_cfg(tmp_path, "steps=3"), resume=True)["step"] == 3
    assert cli.TrainConfig(task="omniglot").resolved().width == 64
    assert cli.load_config(ROOT / "configs" / "sinusoid.json").resolved().width == 40
    with pytest.raises(cli.ConfigError, match=r"\['width'\] \(width: the run used 40.*give width=40"):
        cli.train(_cfg(tmp_path, "steps=4", "width=8"), resume=True)
