"""Omniglot data layer: loading, caching, corrupt input, zip-slip, downloads (faked), splits, one-shot runs."""
from __future__ import annotations

import hashlib
import io
import os
import random
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import metatut.data.omniglot as om
from metatut.data import (
    BPL_ERROR, HUMAN_ERROR, OmniglotImages, decode_png, evaluate_one_shot, extract_zip, fetch_zip,
    fraction_split, load_omniglot_from, load_omniglot, load_one_shot_runs, maml_split, pixel_nearest_neighbour,
    split_characters, with_rotations,
)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("METATUT_SHARED_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))
SMALL = [SHARED / "images_background_small1.zip", SHARED / "images_background_small2.zip"]
RUNS = SHARED / "all_runs.zip"
needs_shared = pytest.mark.skipif(not all(p.is_file() for p in [*SMALL, RUNS]),
                                  reason=f"the offline Omniglot copy is not at {SHARED} (set METATUT_SHARED_OMNIGLOT)")


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path, monkeypatch):
    """Nothing a test does may write into the repository's data folder."""
    monkeypatch.setenv("METATUT_DATA", str(tmp_path / "metatut_data"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The two small background sets, decoded once per test session (shared cache folder)."""
    if not all(p.is_file() for p in SMALL):
        pytest.skip(f"the offline Omniglot copy is not at {SHARED} (set METATUT_SHARED_OMNIGLOT)")
    return load_omniglot_from(*SMALL, cache_dir=tmp_path_factory.getbasetemp() / "omniglot_cache")


# ------------------------------------------------------------------------------------ synthetic data
def png_bytes(seed: int, size: int = 12) -> bytes:
    rng = random.Random(seed)
    pixels = bytes(rng.choice((0, 255)) for _ in range(size * size))
    image = Image.frombytes("L", (size, size), pixels).convert("1", dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def omniglot_members(characters: dict[str, int], top: str | None = "images_x", seed: int = 0) -> dict[str, bytes]:
    """``{'Alpha/character01': 20, ...}`` -> zip members in Omniglot's layout with random binary PNGs."""
    members = {}
    for c, (name, count) in enumerate(characters.items()):
        for drawer in range(1, count + 1):
            path = f"{name}/{c:04d}_{drawer:02d}.png"
            members[f"{top}/{path}" if top else path] = png_bytes(seed * 100_000 + c * 100 + drawer)
    return members


THREE = {"Alpha/character01": 20, "Alpha/character02": 20, "Beta/character01": 20}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------- official data
def test_official_urls_and_checksums_are_torchvisions():
    Omniglot = pytest.importorskip("torchvision.datasets").Omniglot   # the course extra; the library needs none
    assert om.URL_PREFIX == Omniglot.download_url_prefix
    for name, checksum in Omniglot.zips_md5.items():
        assert om.OFFICIAL_ZIPS[name] == (f"{name}.zip", checksum)


@needs_shared
def test_shared_zips_pass_the_pinned_checksums(tmp_path):
    for name in ("images_background_small1", "images_background_small2", "all_runs"):
        assert fetch_zip(name, SHARED, download=False) == SHARED / f"{name}.zip"


@needs_shared
def test_small_sets_deduplicated(small):
    assert small.images.shape == (242, 20, 28, 28) and small.images.dtype == torch.uint8
    assert len(set(small.names)) == 242 and list(small.names) == sorted(small.names)
    assert small.alphabets == ("Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin",
                               "Sanskrit", "Tagalog")
    assert sum(n.startswith("Greek/") for n in small.names) == 24
    assert sum(n.startswith("Latin/") for n in small.names) == 26
    # Ink is high: strokes cover a small part of each image, so the mean is low and the maximum is 255.
    assert small.images.max() == 255 and small.images.float().mean() < 0.2 * 255
    # Image j of a character is its j-th file by name, decoded with the same function.
    with zipfile.ZipFile(SMALL[0]) as z:
        files = sorted(n for n in z.namelist() if "/Balinese/character01/" in n and n.endswith(".png"))
        assert len(files) == 20
        assert torch.equal(small.images[0, 3], decode_png(z.read(files[3]), 28))


@needs_shared
def test_small_set_by_name_reads_the_zips(small, tmp_path_factory):
    again = load_omniglot("small", root=SHARED, download=False, cache_dir=tmp_path_factory.getbasetemp() / "omniglot_cache")
    assert again.names == small.names and torch.equal(again.images, small.images)


def test_decode_png_resizes_and_inverts():
    white = io.BytesIO()
    Image.new("1", (105, 105), 1).save(white, format="PNG")
    black = io.BytesIO()
    Image.new("1", (105, 105), 0).save(black, format="PNG")
    assert decode_png(white.getvalue(), 28).eq(0).all()          # background only: no ink
    assert decode_png(black.getvalue(), 28).eq(255).all()        # all ink
    half = Image.new("1", (105, 105), 1)
    half.paste(0, (0, 0, 52, 105))                               # left half inked
    image = decode_png(_png(half), 28)
    assert image.shape == (28, 28) and image[:, :10].eq(255).all() and image[:, 18:].eq(0).all()
    assert ((image > 0) & (image < 255)).any()                   # antialiased edge: grey levels


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------------ loading
def test_zip_and_folder_sources_agree_and_dedup(tmp_path):
    archive = write_zip(tmp_path / "a.zip", omniglot_members(THREE))
    folder = extract_zip(archive, tmp_path / "folder")
    assert (folder / "Alpha" / "character01").is_dir()          # the single top folder was stripped
    from_zip = load_omniglot_from(archive, image_size=8, cache=False)
    from_folder = load_omniglot_from(folder, image_size=8, cache=False)
    assert from_zip.names == ("Alpha/character01", "Alpha/character02", "Beta/character01")
    assert from_zip.images.shape == (3, 20, 8, 8) and torch.equal(from_zip.images, from_folder.images)
    # A second source repeating a character (different pixels) does not add it twice: the first source wins.
    other = write_zip(tmp_path / "b.zip", omniglot_members({"Alpha/character01": 20, "Gamma/character01": 20},
                                                           top=None, seed=7))
    both = load_omniglot_from(archive, other, image_size=8, cache=False)
    assert len(both) == 4 and torch.equal(both.images[0], from_zip.images[0])


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    archive = write_zip(tmp_path / "a.zip", omniglot_members(THREE))
    cache = tmp_path / "cache"
    first = load_omniglot_from(archive, image_size=8, cache_dir=cache)
    assert len(cache_files(cache)) == 1

    calls = []
    real_decode = om._decode

    def counting_decode(*args):
        calls.append(args)
        return real_decode(*args)

    monkeypatch.setattr(om, "_decode", counting_decode)
    second = load_omniglot_from(archive, image_size=8, cache_dir=cache)
    assert calls == [] and second.names == first.names and torch.equal(second.images, first.images)

    load_omniglot_from(archive, image_size=10, cache_dir=cache)       # another image size: decoded
    assert len(calls) == 1
    write_zip(archive, omniglot_members(THREE, seed=3))          # new contents, new size/mtime: decoded
    os.utime(archive, ns=(1, 1))
    third = load_omniglot_from(archive, image_size=8, cache_dir=cache)
    assert len(calls) == 2 and not torch.equal(third.images, first.images)


def test_folder_cache_sees_changed_files(tmp_path, monkeypatch):
    folder = extract_zip(write_zip(tmp_path / "a.zip", omniglot_members(THREE)), tmp_path / "folder")
    cache = tmp_path / "cache"
    load_omniglot_from(folder, image_size=8, cache_dir=cache)
    calls = []
    monkeypatch.setattr(om, "_decode", lambda *args: _record(calls, args))
    load_omniglot_from(folder, image_size=8, cache_dir=cache)
    assert calls == []
    png = next((folder / "Beta" / "character01").glob("*.png"))
    png.write_bytes(png_bytes(999))
    with pytest.raises(RuntimeError, match="decoder called"):
        load_omniglot_from(folder, image_size=8, cache_dir=cache)


def _record(calls, args):
    calls.append(args)
    raise RuntimeError("decoder called")


def test_wrong_image_count_and_layout_are_clear_errors(tmp_path):
    short = write_zip(tmp_path / "short.zip", omniglot_members({"Alpha/character01": 20, "Alpha/character02": 19}))
    with pytest.raises(ValueError, match=r"20 images.*Alpha/character02 \(19 images\)"):
        load_omniglot_from(short, image_size=8, cache_dir=tmp_path / "cache")
    flat = write_zip(tmp_path / "flat.zip", {"character01/0001_01.png": png_bytes(1)})
    with pytest.raises(ValueError, match="layout"):
        load_omniglot_from(flat, image_size=8, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_omniglot_from(tmp_path / "missing.zip", cache=False)
    with pytest.raises(ValueError, match=r"image_size must be an int in \[1, 105\]"):
        load_omniglot_from(short, image_size=106)
    assert cache_files(tmp_path / "cache") == []


def test_truncated_zip_is_a_clear_error_and_leaves_no_cache(tmp_path):
    good = write_zip(tmp_path / "good.zip", omniglot_members(THREE)).read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good[: len(good) // 2])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_omniglot_from(truncated, image_size=8, cache_dir=cache)
    assert cache_files(cache) == []


def test_corrupt_member_is_a_clear_error_and_leaves_no_cache(tmp_path):
    members = omniglot_members(THREE)
    archive = write_zip(tmp_path / "bad.zip", members)
    data = bytearray(archive.read_bytes())
    victim = members["images_x/Beta/character01/0002_05.png"]
    at = bytes(data).find(victim)
    assert at > 0
    data[at + len(victim) // 2] ^= 0xFF                          # flip one byte of a stored member: CRC mismatch
    archive.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="corrupt"):
        load_omniglot_from(archive, image_size=8, cache_dir=cache)
    assert cache_files(cache) == []
    with pytest.raises(ValueError, match="corrupt"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("evil", ["../evil.png", "/tmp/evil.png", "a/../../evil.png", "..\\evil.png", "C:/evil.png"])
def test_zip_slip_is_rejected(tmp_path, evil):
    archive = write_zip(tmp_path / "evil.zip", {"top/Alpha/character01/0001_01.png": png_bytes(1), evil: b"x"})
    target = tmp_path / "sub" / "out"
    with pytest.raises(ValueError, match="unsafe path"):
        extract_zip(archive, target)
    assert not target.exists() and not list(target.parent.glob(".out.*"))
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "sub" / "evil.png").exists()
    with pytest.raises(ValueError, match="unsafe path"):
        load_omniglot_from(archive, cache=False)


def test_extract_zip_refuses_to_overwrite(tmp_path):
    archive = write_zip(tmp_path / "a.zip", omniglot_members(THREE))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        extract_zip(archive, tmp_path / "out")


# ---------------------------------------------------------------------------- download (network faked)
@pytest.fixture
def fake_official(tmp_path, monkeypatch):
    """Pin 'images_background' to a local synthetic zip and replace the network by a function we control."""
    good = write_zip(tmp_path / "official.zip", omniglot_members(THREE))
    monkeypatch.setitem(om.OFFICIAL_ZIPS, "images_background", ("images_background.zip", md5(good)))
    monkeypatch.setitem(om.SETS, "background", (("images_background",), 3))
    behaviour = {"mode": "good", "calls": 0}

    def fake_download_url(url, root, filename):
        behaviour["calls"] += 1
        assert url == f"{om.URL_PREFIX}/images_background.zip"
        target = Path(root) / filename
        if behaviour["mode"] == "offline":
            target.write_bytes(b"partial")                       # a download that dies half-way
            raise OSError("Network is unreachable")
        data = good.read_bytes()
        target.write_bytes(data if behaviour["mode"] == "good" else data[:100])

    monkeypatch.setattr(om, "download_url", fake_download_url)
    return behaviour


def test_fetch_zip_failures_leave_nothing(tmp_path, fake_official):
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match=r"download=True.*copy it to .*images_background\.zip"):
        fetch_zip("images_background", root, download=False)
    fake_official["mode"] = "truncated"
    with pytest.raises(RuntimeError, match="MD5"):
        fetch_zip("images_background", root)
    assert list(root.iterdir()) == []
    fake_official["mode"] = "offline"
    with pytest.raises(RuntimeError, match=r"Network is unreachable.*copy it to"):
        fetch_zip("images_background", root)
    assert list(root.iterdir()) == []
    with pytest.raises(ValueError, match="name must be one of"):
        fetch_zip("images_everything", root)


def test_fetch_zip_verifies_then_keeps(tmp_path, fake_official):
    root = tmp_path / "root"
    path = fetch_zip("images_background", root)
    assert path == root / "images_background.zip" and [p.name for p in root.iterdir()] == [path.name]
    assert fetch_zip("images_background", root, download=False) == path and fake_official["calls"] == 1
    path.write_bytes(path.read_bytes()[:-10])                    # damaged on disk later
    with pytest.raises(ValueError, match="fails its MD5 check"):
        fetch_zip("images_background", root, download=False)
    assert fetch_zip("images_background", root) == path and fake_official["calls"] == 2   # replaced
    assert md5(path) == om.OFFICIAL_ZIPS["images_background"][1]


def test_named_set_is_fetched_extracted_and_checked(tmp_path, fake_official):
    root = tmp_path / "root"
    data = load_omniglot("background", root=root, image_size=8, cache_dir=tmp_path / "cache")
    assert len(data) == 3 and (root / "images_background" / "Alpha" / "character01").is_dir()
    again = load_omniglot("background", root=root, download=False, image_size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, data.images) and fake_official["calls"] == 1
    om.SETS["background"] = (("images_background",), 964)       # (restored by monkeypatch)
    with pytest.raises(ValueError, match="expected 964 characters"):
        load_omniglot("background", root=root, download=False, image_size=8, cache=False)
    with pytest.raises(ValueError, match="which must be one of"):
        load_omniglot("everything")


# ---------------------------------------------------------------------------------------------- splits
def fake_characters(n: int) -> OmniglotImages:
    names = tuple(f"A{i // 40:02d}/character{i % 40:02d}" for i in range(n))
    images = torch.arange(n * 20 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 20, 2, 2)
    return OmniglotImages(images, names)


def base(name: str) -> str:
    return name.split("@")[0]


@needs_shared
def test_fraction_split_on_small_sets(small):
    split = fraction_split(small, seed=0)
    assert split.sizes() == (146 * 4, 48, 48)
    train_base = {base(n) for n in split.train.names}
    val, test = set(split.val.names), set(split.test.names)
    assert len(train_base) == 146 and not (train_base & val) and not (train_base & test) and not (val & test)
    assert train_base | val | test == set(small.names)
    assert not any("@" in n for n in split.val.names + split.test.names)     # rotations: training classes only
    index = {n: i for i, n in enumerate(small.names)}
    for i in (0, 101, 583):
        name = split.train.names[i]
        k = i % 4
        assert name == (base(name) if k == 0 else f"{base(name)}@rot{90 * k}")
        assert torch.equal(split.train.images[i], torch.rot90(small.images[index[base(name)]], k, dims=(-2, -1)))
    for part in ("val", "test"):
        got = getattr(split, part)
        assert torch.equal(got.images, torch.stack([small.images[index[n]] for n in got.names]))


def test_split_seeding_and_sizes():
    data = fake_characters(1623)
    split = maml_split(data)
    assert split.sizes() == (4400, 100, 423) and split.seed == 1
    again = maml_split(OmniglotImages(data.images.flip(0), data.names[::-1]))   # load order does not matter
    assert split.val.names == again.val.names and split.train.names == again.train.names
    other = maml_split(data, seed=2)
    assert set(other.val.names) != set(split.val.names)
    plain = maml_split(data, rotations=(0,))
    assert plain.sizes() == (1100, 100, 423) and plain.train.names == split.train.names[::4]
    with pytest.raises(ValueError, match="1623 characters"):
        maml_split(fake_characters(242))


def test_split_argument_errors():
    data = fake_characters(10)
    with pytest.raises(ValueError, match="add up to the number of characters, 10"):
        split_characters(data, (5, 3, 3), seed=0)
    with pytest.raises(ValueError, match="n_val must be an int >= 1"):
        split_characters(data, (10, 0, 0), seed=0)
    with pytest.raises(ValueError, match="before adding rotations"):
        split_characters(with_rotations(data), (20, 10, 10), seed=0)
    with pytest.raises(ValueError, match="fractions must be three numbers"):
        fraction_split(data, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="leave an empty split"):
        fraction_split(data, (0.9, 0.05, 0.05))
    with pytest.raises(ValueError, match=r"rotations must be distinct ints in \[0, 3\]"):
        with_rotations(data, (0, 4))
    with pytest.raises(TypeError, match="seed must be an int"):
        split_characters(data, (6, 2, 2), seed=None)


# --------------------------------------------------------------------------------------- one-shot runs
@pytest.fixture(scope="module")
def runs():
    if not RUNS.is_file():
        pytest.skip(f"the offline Omniglot copy is not at {SHARED} (set METATUT_SHARED_OMNIGLOT)")
    return load_one_shot_runs(RUNS)


@needs_shared
def test_one_shot_runs_parse(runs):
    assert len(runs) == 20 and runs.runs == tuple(f"run{r:02d}" for r in range(1, 21))
    assert runs.support.shape == runs.query.shape == (20, 20, 28, 28) and runs.support.dtype == torch.uint8
    for r in range(20):
        assert sorted(runs.answers[r].tolist()) == list(range(20))   # each character is the answer once
    with zipfile.ZipFile(RUNS) as z:
        lines = z.read("run07/class_labels.txt").decode().split("\n")
        expected = {}
        for line in filter(None, (x.strip() for x in lines)):
            item, cls = line.split()
            expected[int(item[-6:-4])] = int(cls[-6:-4]) - 1      # ".../item03.png" -> 3, "class08.png" -> 7
        assert runs.answers[6].tolist() == [expected[i] for i in range(1, 21)]
        assert torch.equal(runs.query[6, 2], decode_png(z.read("run07/test/item03.png"), 28))
        assert torch.equal(runs.support[6, 7], decode_png(z.read("run07/training/class08.png"), 28))


@needs_shared
def test_one_shot_evaluator(runs):
    calls = []

    def oracle(support_x, support_y, query_x):
        assert support_x.shape == query_x.shape == (20, 1, 28, 28) and support_y.tolist() == list(range(20))
        calls.append(1)
        return runs.answers[len(calls) - 1]

    assert evaluate_one_shot(oracle, runs).error == 0 and len(calls) == 20
    constant = evaluate_one_shot(lambda sx, sy, qx: torch.zeros(len(qx), dtype=torch.long), runs)
    assert constant.errors.tolist() == [0.95] * 20               # right once per run: 19/20 errors
    nn_pixels = evaluate_one_shot(pixel_nearest_neighbour, runs)
    # Measured 79% on this data (28x28, Lanczos): far better than chance (95%), far worse than people.
    assert 0.6 <= nn_pixels.error <= 0.85 and nn_pixels.errors.shape == (20,)
    assert "people 4.5%" in str(nn_pixels) and HUMAN_ERROR == 0.045 and BPL_ERROR == 0.033
    with pytest.raises(ValueError, match="predict must return a tensor of 20 labels"):
        evaluate_one_shot(lambda sx, sy, qx: torch.zeros(3), runs)


def test_pixel_nearest_neighbour_by_hand():
    support = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]).view(3, 1, 1, 2)
    labels = torch.tensor([2, 0, 1])
    query = torch.tensor([[4.0, 4.5], [0.2, -0.1], [0.9, 0.8]]).view(3, 1, 1, 2)
    assert pixel_nearest_neighbour(support, labels, query).tolist() == [1, 2, 0]


def test_malformed_class_labels_are_clear_errors(tmp_path):
    members = {f"run01/training/class{i:02d}.png": png_bytes(i) for i in (1, 2)}
    members.update({f"run01/test/item{i:02d}.png": png_bytes(10 + i) for i in (1, 2)})
    good = "run01/test/item01.png run01/training/class02.png\nrun01/test/item02.png run01/training/class01.png\n"
    ok = load_one_shot_runs(write_zip(tmp_path / "ok.zip", {**members, "run01/class_labels.txt": good.encode()}),
                            image_size=8)
    assert ok.answers.tolist() == [[1, 0]] and ok.support.shape == (1, 2, 8, 8)
    missing = good.replace("class01", "class09")
    with pytest.raises(ValueError, match="not in the archive.*class09"):
        load_one_shot_runs(write_zip(tmp_path / "m.zip", {**members, "run01/class_labels.txt": missing.encode()}))
    short = good.splitlines()[0]
    with pytest.raises(ValueError, match="every test image of run01 exactly once"):
        load_one_shot_runs(write_zip(tmp_path / "s.zip", {**members, "run01/class_labels.txt": short.encode()}))
    garbled = "run01/test/item01.png\n"
    with pytest.raises(ValueError, match="line 1"):
        load_one_shot_runs(write_zip(tmp_path / "g.zip", {**members, "run01/class_labels.txt": garbled.encode()}))
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_one_shot_runs()                                     # nothing in METATUT_DATA, no download
