"""Trust under faults, the data / checkpoint / environment part: concurrent first loads of Omniglot,
corrupt checkpoints, temporaries left by killed writers, a cache that does not match the request, and
environment settings with values outside the allowed ones.

Each test here failed on the code before the fix (commit 23aa2a1) and passes after it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import metatut as mt
import metatut.data.omniglot as om
from metatut import budget, fileio
from metatut import checkpoint as ckpt
from metatut.data import load_omniglot, load_omniglot_from

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("METATUT_SHARED_OMNIGLOT", ROOT.parent / "shared" / "data" / "omniglot"))
SMALL = [SHARED / "images_background_small1.zip", SHARED / "images_background_small2.zip"]
posix_only = pytest.mark.skipif(os.name != "posix", reason="uses fork/exec, SIGKILL and symlinks")


@pytest.fixture(autouse=True)
def _private_environment(tmp_path, monkeypatch):
    """Nothing a test does may write into the repository's data folder; no METATUT_* setting leaks in."""
    for name in ("METATUT_BUDGET", "METATUT_FAST", "METATUT_PROGRESS", "METATUT_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "metatut_data"))


# ------------------------------------------------------------------------------------------- helpers
def dead_pid() -> int:
    """The id of a process that has just ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def png_bytes(seed: int, size: int = 12) -> bytes:
    rng = random.Random(seed)
    pixels = bytes(rng.choice((0, 255)) for _ in range(size * size))
    out = io.BytesIO()
    Image.frombytes("L", (size, size), pixels).convert("1", dither=Image.Dither.NONE).save(out, format="PNG")
    return out.getvalue()


def write_zip(path: Path, characters=("Alpha/character01", "Alpha/character02", "Beta/character01"),
              top: str = "images_x", seed: int = 0) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for c, name in enumerate(characters):
            for drawer in range(1, 21):
                z.writestr(f"{top}/{name}/{c:04d}_{drawer:02d}.png", png_bytes(seed * 100_000 + c * 100 + drawer))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{fileio.TEMP_SUFFIX}"))


def _checkpoint_error():
    from metatut.checkpoint import CheckpointError   # (absent before the fix: each test fails on its own)
    return CheckpointError


def _params():
    return mt.init_params(mt.mlp(seed=0))


# ============================================= item 9: several processes load Omniglot for the first time
CHILD = r"""
import hashlib, json, os, sys, time
from pathlib import Path
import metatut.data.omniglot as om

root, go, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for name in ("images_background", "images_evaluation"):      # the small sets stand in for the full ones
    om.OFFICIAL_ZIPS[name] = (name + ".zip", hashlib.md5((root / (name + ".zip")).read_bytes()).hexdigest())
om.SETS["full"] = (om.SETS["full"][0], 242)
decoded = []
real_decode = om._decode
def counting_decode(*args):
    decoded.append(1)
    return real_decode(*args)
om._decode = counting_decode
ready.touch()
while not go.exists():                                          # start together: the worst case
    time.sleep(0.005)
data = om.load_omniglot("full", download=False, image_size=10)  # root and cache: METATUT_DATA/omniglot
print(json.dumps({"characters": len(data), "decoded": len(decoded),
                  "pixels": hashlib.sha256(data.images.numpy().tobytes()).hexdigest()}))
"""


@posix_only
@pytest.mark.skipif(not all(p.is_file() for p in SMALL), reason=f"the offline Omniglot copy is not at {SHARED}")
def test_concurrent_first_load_extracts_and_caches_once(tmp_path):
    """Three processes load into one fresh, empty data folder at the same instant (like the ranks of a
    torchrun launch): before the fix they crashed with 'Directory not empty' / FileExistsError while
    extracting, and each decoded the images again. Now one extracts, one decodes and writes the cache,
    the others wait for the lock and use the results."""
    data = tmp_path / "data"
    root = data / "omniglot"
    root.mkdir(parents=True)
    (root / "images_background.zip").write_bytes(SMALL[0].read_bytes())    # copies (the originals are read-only)
    (root / "images_evaluation.zip").write_bytes(SMALL[1].read_bytes())
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "METATUT_DATA": str(data), "OMP_NUM_THREADS": "1",
           "METATUT_PROGRESS": "0"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(go), str(tmp_path / f"ready{i}")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(3)]
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
            assert time.monotonic() < deadline, "the child processes did not start"
            assert all(c.poll() is None for c in children), [c.communicate() for c in children]
            time.sleep(0.05)
        go.touch()
        outputs = [c.communicate(timeout=600) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    failures = [err[-2000:] for c, (_, err) in zip(children, outputs, strict=True) if c.returncode != 0]
    assert not failures, "\n-----\n".join(failures)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["characters"] for r in results] == [242] * 3
    assert len({r["pixels"] for r in results}) == 1
    assert sum(r["decoded"] for r in results) == 1           # decoded once, under the lock; the others read
    [cached] = (root / "cache").iterdir()                         # one cache file, no temporaries
    assert cached.name.startswith("omniglot-10px-") and cached.suffix == ".pt"
    assert (root / "images_background" / "Greek").is_dir() and (root / "images_evaluation" / "Tagalog").is_dir()
    assert temporaries(data) == []
    waited = [err for _, err in outputs if "metatut: waiting for" in err]
    assert all(".metatut-data.lock" in err for err in waited)


def test_lock_taken_twice_by_one_thread_is_an_error_not_a_hang(tmp_path):
    """Re-taking a held data lock in the same thread would wait for ever; it is a clear error instead."""
    with om.data_lock(tmp_path):
        with pytest.raises(RuntimeError, match="already locked by this thread"):
            fileio.FileLock(tmp_path / om.LOCK_NAME, timeout=1).acquire()
    with fileio.FileLock(tmp_path / om.LOCK_NAME, timeout=0):    # released properly: free again
        pass


def test_extraction_racing_another_process_is_a_clear_error(tmp_path, monkeypatch):
    """If the destination appears while extracting (another process without the lock), the error says so."""
    archive = write_zip(tmp_path / "a.zip")
    dest = tmp_path / "out"
    real_replace = os.replace

    def other_process_finishes_first(src, dst):
        if Path(dst) == dest:
            (dest / "x").mkdir(parents=True)
        return real_replace(src, dst)

    monkeypatch.setattr(om.os, "replace", other_process_finishes_first)
    with pytest.raises(FileExistsError, match="was created by another process while a.zip was being extracted"):
        om.extract_zip(archive, dest)
    monkeypatch.undo()
    assert temporaries(tmp_path) == [] and [p.name for p in dest.iterdir()] == ["x"]


# ================================================================= item 12: corrupt checkpoints, one error
def _truncated(path: Path) -> None:
    mt.save_checkpoint(path, _params(), step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text_symlink(path: Path) -> None:
    text = path.parent / "notes.txt"
    text.write_text("these are my notes, not a checkpoint\n")
    path.symlink_to(text)


def _directory(path: Path) -> None:
    path.mkdir()
    mt.save_checkpoint(path / "inner.pt", _params())


def _edited(change):
    def make(path: Path) -> None:
        mt.save_checkpoint(path, _params(), config={"lr": 0.1}, step=3)
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return make


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


CORRUPTIONS = {
    "truncated": (_truncated, "is truncated or not a torch checkpoint"),
    "random bytes": (_random_bytes, "is truncated or not a torch checkpoint"),
    "empty file": (_empty, "is empty"),
    "symlink to a text file": (_text_symlink, "is truncated or not a torch checkpoint"),
    "directory": (_directory, "is a folder, not a checkpoint file"),
    "missing params": (_edited(lambda s: s.pop("params")), "lacks 'params'"),
    "missing step": (_edited(lambda s: s.pop("step")), "lacks 'step'"),
    "params not a dict": (_edited(_set("params", [1, 2])), "has 'params' of the wrong kind"),
    "params not tensors": (_edited(lambda s: s["params"].update({"0.weight": [[1.0]]})),
                           r"'params' entries that are not named tensors: \['0.weight'\]"),
    "integer params": (_edited(lambda s: s["params"].update({"0.weight": torch.zeros(2, dtype=torch.long)})),
                       "not floating-point tensors"),
    "config not a dict": (_edited(_set("config", "lr=0.1")), "has 'config' of the wrong kind"),
    "step not an int": (_edited(_set("step", "three")), "has 'step' 'three'"),
    "optimizer state not a dict": (_edited(_set("optimizer", [0])), "has 'optimizer' of the wrong kind"),
    "a list": (lambda path: torch.save([torch.zeros(1)], path), "is not a metatut checkpoint"),
    "another format version": (_edited(_set("format_version", 99)), "format_version 99"),
    "a plain pickle": (lambda path: path.write_bytes(pickle.dumps({"params": {}})), "torch.load"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, kind):
    if kind == "symlink to a text file" and os.name != "posix":
        pytest.skip("symlinks")
    CheckpointError = _checkpoint_error()
    assert issubclass(CheckpointError, ValueError)
    make, what = CORRUPTIONS[kind]
    path = tmp_path / "ckpt.pt"
    make(path)
    with pytest.raises(CheckpointError, match=what) as caught:
        mt.load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message                                           # which file
    assert ("delete it and start a fresh run, or resume from a copy" in message
            or "load it with the metatut version that wrote it" in message)  # what to do


def test_refused_pickle_is_a_checkpoint_error_and_an_unpickling_error(tmp_path, capsys):
    """Objects other than tensors and plain data are still refused (never unpickled), with the same class."""
    CheckpointError = _checkpoint_error()

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "params": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"holds objects other than tensors.*print") as caught:
        mt.load_checkpoint(path)
    assert isinstance(caught.value, pickle.UnpicklingError)
    assert "unpickled!" not in capsys.readouterr().out


def test_optimizer_state_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    CheckpointError = _checkpoint_error()
    params = _params()
    path = mt.save_checkpoint(tmp_path / "c.pt", params, optimizer=torch.optim.Adam(params.values()))
    other = torch.optim.Adam([torch.zeros(3, requires_grad=True)])
    with pytest.raises(CheckpointError, match="does not fit this optimizer"):
        mt.load_checkpoint(path, optimizer=other)


def test_missing_checkpoint_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        mt.load_checkpoint(tmp_path / "nothing.pt")
    if os.name == "posix":
        (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
        with pytest.raises(FileNotFoundError, match="broken symlink"):
            mt.load_checkpoint(tmp_path / "dangling.pt")


# =================================================================== item 13: temporaries and one helper
def test_every_writer_uses_the_one_helper():
    assert ckpt.atomic_save is fileio.atomic_save
    assert om.atomic_save is fileio.atomic_save


@posix_only
def test_planted_symlink_at_a_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """The temporary is created exclusively: a symlink already at the name it would take is skipped."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    names = ["planted", "fresh1", "fresh2", "fresh3"]
    for target in ("x", "ckpt.pt"):
        (folder / f".{target}.{os.getpid()}.planted{fileio.TEMP_SUFFIX}").symlink_to(victim)
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(list(names)))
    fileio.atomic_write(folder / "x", b"new contents")
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(list(names)))
    mt.save_checkpoint(folder / "ckpt.pt", _params(), step=1)
    assert victim.read_text() == "precious"
    assert (folder / "x").read_bytes() == b"new contents" and not (folder / "x").is_symlink()
    assert mt.load_checkpoint(folder / "ckpt.pt")["step"] == 1


def test_stale_checkpoint_temporaries_are_removed_at_the_next_save(tmp_path):
    dead, live = dead_pid(), os.getppid()
    folder = tmp_path / "run"
    folder.mkdir()
    stale = [folder / f".ckpt.pt.{dead}.abc123{fileio.TEMP_SUFFIX}", folder / f".config.json.{dead}.q1{fileio.TEMP_SUFFIX}"]
    kept = [folder / f".ckpt.pt.{live}.def456{fileio.TEMP_SUFFIX}", folder / f".ckpt.pt.{os.getpid()}.x{fileio.TEMP_SUFFIX}"]
    for p in stale + kept:
        p.write_bytes(b"half a checkpoint")
    (folder / f".ckpt.pt.{dead}.dir{fileio.TEMP_SUFFIX}").mkdir()          # a killed temporary_folder
    mt.save_checkpoint(folder / "ckpt.pt", _params(), step=7)
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(["ckpt.pt", *(p.name for p in kept)])
    assert mt.load_checkpoint(folder / "ckpt.pt")["step"] == 7


KILLED_WRITER = r"""
import os, signal, sys
import torch
import metatut as mt

def killed_before_rename(src, dst):                 # the data is written and fsynced: die before the rename
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = killed_before_rename
mt.save_checkpoint(sys.argv[1], mt.init_params(mt.mlp(seed=1)), config={"v": 2}, step=2)
"""


@posix_only
def test_checkpoint_write_killed_between_fsync_and_rename(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    mt.save_checkpoint(path, _params(), config={"v": 1}, step=1)
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert mt.load_checkpoint(path)["config"] == {"v": 1}                 # the old checkpoint is intact
    leftovers = temporaries(path.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.pt.")
    assert torch.load(path.parent / leftovers[0], weights_only=True)["step"] == 2   # complete, but never renamed
    mt.save_checkpoint(path, _params(), config={"v": 3}, step=3)          # the next save cleans up
    assert temporaries(path.parent) == [] and sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]
    assert mt.load_checkpoint(path)["config"] == {"v": 3}


def test_stale_temporaries_in_the_cache_folder_are_removed_when_the_cache_is_written(tmp_path):
    archive = write_zip(tmp_path / "a.zip")
    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live = dead_pid(), os.getppid()
    stale = cache / f".omniglot-8px-0123.pt.{dead}.abc{fileio.TEMP_SUFFIX}"
    kept = cache / f".omniglot-8px-0123.pt.{live}.def{fileio.TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    kept.write_bytes(b"being written by a live process")
    load_omniglot_from(archive, image_size=8, cache_dir=cache)
    assert not stale.exists() and kept.exists()
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


@pytest.fixture
def fake_official(tmp_path, monkeypatch):
    """'images_background' pinned to a local synthetic zip; the network replaced by a recorder."""
    good = write_zip(tmp_path / "official.zip")
    monkeypatch.setitem(om.OFFICIAL_ZIPS, "images_background", ("images_background.zip", md5(good)))
    monkeypatch.setitem(om.SETS, "background", (("images_background",), 3))
    calls = []

    def fake_download_url(url, root, filename):
        calls.append(Path(root) / filename)
        (Path(root) / filename).write_bytes(good.read_bytes())

    monkeypatch.setattr(om, "download_url", fake_download_url)
    return calls


def test_download_and_extraction_use_the_temporary_scheme_and_leftovers_are_removed(tmp_path, fake_official):
    """A download goes to a private ``.<name>.<pid>.<random>.tmp`` folder; what killed downloads and
    extractions left behind (dead process ids) is deleted by the next load, a live process's is kept."""
    root = tmp_path / "root"
    root.mkdir()
    dead, live = dead_pid(), os.getppid()
    killed_extraction = root / f".images_background.{dead}.k1{fileio.TEMP_SUFFIX}"
    (killed_extraction / "Alpha").mkdir(parents=True)
    killed_download = root / f".images_background.zip.{dead}.k2{fileio.TEMP_SUFFIX}"
    killed_download.mkdir()
    (killed_download / "images_background.zip").write_bytes(b"partial")
    running = root / f".images_background.zip.{live}.k3{fileio.TEMP_SUFFIX}"
    running.write_bytes(b"another process is downloading")
    data = load_omniglot("background", root=root, image_size=8, cache_dir=tmp_path / "cache")
    assert len(data) == 3
    [download] = fake_official
    assert download.parent.parent == root and download.parent.name.startswith(f".images_background.zip.{os.getpid()}.")
    assert download.parent.name.endswith(fileio.TEMP_SUFFIX) and not download.parent.exists()
    assert not killed_extraction.exists() and not killed_download.exists() and running.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [om.LOCK_NAME, "images_background", "images_background.zip", running.name])


# ======================================================== item 14: a cache that does not match the request
def _wrong_size_images(state, archive):
    state["images"] = load_omniglot_from(archive, image_size=28, cache=False).images


def _copy_of_28px_cache(state, archive):
    load_omniglot_from(archive, image_size=28, cache_dir=archive.parent / "cache28")
    [other] = (archive.parent / "cache28").glob("*.pt")
    state.clear()
    state.update(torch.load(other, weights_only=True))


CACHE_EDITS = {
    "images of size 28 under the size-20 key": _wrong_size_images,
    "a whole size-28 cache under the size-20 name": _copy_of_28px_cache,
    "stored image size edited": lambda state, archive: state.__setitem__("image_size", 28),
    "one name too few": lambda state, archive: state.__setitem__("names", state["names"][:-1]),
    "images as int64": lambda state, archive: state.__setitem__("images", state["images"].long()),
    "one pixel edited": lambda state, archive: state["images"].view(-1).__setitem__(5, 77),
}


@pytest.mark.parametrize("edit", list(CACHE_EDITS))
def test_a_cache_that_does_not_match_the_request_is_rebuilt(tmp_path, monkeypatch, edit):
    archive = write_zip(tmp_path / "a.zip")
    cache = tmp_path / "cache"
    right = load_omniglot_from(archive, image_size=20, cache_dir=cache)
    [path] = cache.glob("*.pt")
    state = torch.load(path, weights_only=True)
    CACHE_EDITS[edit](state, archive)
    torch.save(state, path)
    with pytest.warns(UserWarning, match=f"ignoring Omniglot cache {path}.*decoding again and replacing it"):
        again = load_omniglot_from(archive, image_size=20, cache_dir=cache)
    assert again.images.shape == (3, 20, 20, 20) and again.images.dtype == torch.uint8
    assert torch.equal(again.images, right.images) and again.names == right.names
    monkeypatch.setattr(om, "_decode", lambda *args: pytest.fail("the rebuilt cache was not used"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = load_omniglot_from(archive, image_size=20, cache_dir=cache)   # the replaced cache is right
    assert torch.equal(third.images, right.images)


def test_cache_trade_off_is_documented():
    text = (ROOT / "data" / "README.md").read_text()
    assert "modification time" in text and "same size" in text           # what the key does not catch
    assert 'rm -rf "${METATUT_DATA:-data}/omniglot/cache"' in text         # how to clear it
    assert ".metatut-data.lock" in text


# ====================================================== item 11: environment settings outside the allowed
BAD_SETTINGS = {
    "METATUT_BUDGET": ("huge", r"METATUT_BUDGET must be one of \('ci', 'laptop', 'gpu'\).*got 'huge'"),
    "METATUT_FAST": ("maybe", "METATUT_FAST='maybe' is not a yes/no value: use one of 1, true, yes, on, 0, "
                     "false, no, off"),
    "METATUT_PROGRESS": ("maybe", "METATUT_PROGRESS='maybe' is not a yes/no value: use one of 1, true, yes, "
                         "on, 0, false, no, off"),
    "METATUT_DEVICE": ("tpu", r"METATUT_DEVICE='tpu' is not a device.*one of \('cpu', 'cuda', 'mps'\)"),
    "METATUT_DATA": (None, "is a file; it must be a folder \\(created if missing\\)"),
}


def _bad_value(name, tmp_path):
    value = BAD_SETTINGS[name][0]
    if value is None:
        value = str(tmp_path / "a_file")
        Path(value).write_text("not a folder")
    return value


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_check_environment_names_the_bad_setting_and_the_allowed_values(tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, _bad_value(name, tmp_path))
    with pytest.raises(ValueError, match=BAD_SETTINGS[name][1]) as caught:
        budget.check_environment()
    assert name in str(caught.value)
    others = set(BAD_SETTINGS) - {name, "METATUT_DATA"}
    assert not any(o in str(caught.value) for o in others)


def test_check_environment_reports_every_bad_setting_at_once_and_creates_nothing(tmp_path, monkeypatch):
    for name in BAD_SETTINGS:
        monkeypatch.setenv(name, _bad_value(name, tmp_path))
    with pytest.raises(ValueError) as caught:
        budget.check_environment()
    assert all(name in str(caught.value) for name in BAD_SETTINGS)
    for name in BAD_SETTINGS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "new" / "data"))
    monkeypatch.setenv("METATUT_FAST", " YES ")
    monkeypatch.setenv("METATUT_PROGRESS", "Off")
    monkeypatch.setenv("METATUT_DEVICE", "cpu")
    settings = budget.check_environment()
    assert settings == {"budget": "ci", "fast": True, "progress": False, "device": torch.device("cpu"),
                        "data": tmp_path / "new" / "data"}
    assert not (tmp_path / "new").exists()
    assert mt.data_dir() == tmp_path / "new" / "data" and (tmp_path / "new" / "data").is_dir()


def test_progress_setting_outside_yes_no_is_an_error(monkeypatch):
    monkeypatch.setenv("METATUT_PROGRESS", "maybe")                      # was: silently off
    with pytest.raises(ValueError, match=BAD_SETTINGS["METATUT_PROGRESS"][1]):
        budget.quiet()
    with pytest.raises(ValueError, match="METATUT_PROGRESS"):
        mt.progress(range(3))
    for value, silent in (("0", True), ("OFF", True), ("no", True), ("1", False), ("True", False), ("on", False)):
        monkeypatch.setenv("METATUT_PROGRESS", value)
        assert budget.quiet() is silent


def test_fast_setting_outside_yes_no_is_an_error(monkeypatch):
    monkeypatch.setenv("METATUT_FAST", "maybe")                          # was: silently the laptop profile
    with pytest.raises(ValueError, match=BAD_SETTINGS["METATUT_FAST"][1]):
        mt.profile()
    monkeypatch.setenv("METATUT_BUDGET", "laptop")
    with pytest.raises(ValueError, match="METATUT_FAST"):
        mt.profile()
    monkeypatch.setenv("METATUT_FAST", "On")
    assert mt.profile() == "laptop"
    monkeypatch.delenv("METATUT_BUDGET")
    assert mt.profile() == "ci"


def test_data_setting_pointing_at_a_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("METATUT_DATA", _bad_value("METATUT_DATA", tmp_path))
    with pytest.raises(ValueError, match=f"METATUT_DATA='{tmp_path / 'a_file'}' is a file; it must be a folder"):
        mt.data_dir()
    with pytest.raises(ValueError, match="METATUT_DATA"):
        om.omniglot_dir()
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "a_file" / "below"))
    with pytest.raises(ValueError, match="METATUT_DATA=.* the file"):
        mt.data_dir()


def test_device_setting_error_names_the_variable(monkeypatch):
    monkeypatch.setenv("METATUT_DEVICE", "tpu")
    with pytest.raises(ValueError, match=BAD_SETTINGS["METATUT_DEVICE"][1]):
        mt.pick_device()
    with pytest.raises(ValueError, match="unset METATUT_DEVICE to choose automatically"):
        mt.pick_device()
    assert mt.pick_device("cpu") == torch.device("cpu")                   # an argument wins over the setting
    if not torch.cuda.is_available():
        monkeypatch.setenv("METATUT_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match=r"METATUT_DEVICE='cuda'.*torch.cuda.is_available\(\) is False"):
            mt.pick_device()
