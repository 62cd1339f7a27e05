r"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): download, verify, extract, decode once, cache, split.

The data are 1,623 handwritten characters from 50 alphabets, each drawn once by 20 people, as
105x105 binary PNGs laid out as ``<alphabet>/<character>/<id>_<drawer>.png`` (possibly under one
top folder, e.g. ``images_background/``).

Pipeline:

1. :func:`fetch_zip` gets an official zip (the URLs and MD5s torchvision's ``Omniglot`` uses) into
   ``METATUT_DATA/omniglot`` (:func:`metatut.data_dir`): it downloads with
   :func:`torch.hub.download_url_to_file` (torchvision is not needed) into a private temporary folder,
   checks the MD5 (:func:`check_integrity`; a SHA-256 works too), then writes
   the file in place atomically (:mod:`metatut.fileio`), so an interrupted or corrupt download never looks
   like data. Offline, place the zips there yourself.
2. :func:`extract_zip` extracts a zip into a new folder, atomically, rejecting any member whose path
   would leave the target folder (absolute paths, ``..``).
3. :func:`load_omniglot_from` decodes any zips or folders in Omniglot's layout **once** into a uint8 tensor
   ``[characters, 20, S, S]`` and caches it (keyed by the sources' names, sizes and mtimes and by ``S``);
   later loads read the cache (``torch.load(weights_only=True)``) after checking that it holds what the
   request asks for (shape, dtype, image size, names, a SHA-256 of the pixels); a cache that does not is
   rebuilt with a warning. What the key does not catch, and how to clear the cache: ``data/README.md``.

Several processes may load at once (e.g. every rank of a ``torchrun`` launch on a fresh machine): the
steps that write (download, extraction, cache) run under an exclusive :class:`metatut.fileio.FileLock`,
``.metatut-data.lock`` in the data folder (for the cache, in the cache folder's parent); the others wait,
saying so on stderr, and then use the finished result. Temporaries of killed processes are deleted there.

:func:`load_omniglot` does all three for a named set: ``'full'`` (1,623 characters), ``'background'``,
``'evaluation'`` or ``'small'`` (the two small background sets, 242 characters).

Preprocessing (as in the MAML paper, which uses 28x28 images): each PNG is converted to greyscale and
resized 105 -> ``image_size`` with Pillow's Lanczos filter (antialiased), then inverted so that
**ink is high**: 255 = stroke, 0 = background (the files store strokes as black). Note: the MAML
repository's ``resize_images.py`` calls ``resize(..., LANCZOS)`` on the mode-"1" (1-bit) images, for which
Pillow ignores the filter and uses nearest neighbour, so its 28x28 files are binary; ours keep grey levels.

Splits are by character (no character's images are in two splits): :func:`maml_split` (1,100 / 100 / 423)
for the full set and :func:`fraction_split` for smaller sets, with rotations by k*90 degrees added as new
classes to the training split only (:func:`with_rotations`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..budget import data_dir
from ..fileio import FileLock, _umask, atomic_save, atomic_write, remove_stale_temporaries, temporary_folder
from ..tasks.base import check_positive_int

__all__ = [
    "IMAGES_PER_CHARACTER", "OFFICIAL_ZIPS", "URL_PREFIX", "OmniglotImages", "OmniglotSplit",
    "omniglot_dir", "fetch_zip", "extract_zip", "decode_png", "load_omniglot_from", "load_omniglot",
    "with_rotations", "split_characters", "maml_split", "fraction_split", "data_lock", "LOCK_NAME",
]

IMAGES_PER_CHARACTER = 20
ORIGINAL_SIZE = 105
CACHE_FORMAT = 2
ROTATION_TAG = "@rot"
#: The lock file that serialises downloads, extraction and cache writing in a data folder.
LOCK_NAME = ".metatut-data.lock"

#: torchvision's ``Omniglot.download_url_prefix`` (the dataset's public repository).
URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

#: name -> (path under :data:`URL_PREFIX`, MD5). The first two are torchvision's ``Omniglot.zips_md5``;
#: the other MD5s are those of the files in the dataset's public repository (checked against its SHA256 list).
OFFICIAL_ZIPS: dict[str, tuple[str, str]] = {
    "images_background": ("images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": ("images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
    "images_background_small1": ("images_background_small1.zip", "e704a628b5459e08445c13499850abc4"),
    "images_background_small2": ("images_background_small2.zip", "b75a71a51d3b13f821f212756fe481fd"),
    "all_runs": ("one-shot-classification/all_runs.zip", "e8996daecdf12afeeb4a53a179f06b19"),
}

#: The character sets :func:`load_omniglot` knows: name -> (zips, expected number of characters).
SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "full": (("images_background", "images_evaluation"), 1623),
    "background": (("images_background",), 964),
    "evaluation": (("images_evaluation",), 659),
    "small": (("images_background_small1", "images_background_small2"), 242),
}

_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, zipfile.LargeZipFile, NotImplementedError)


# ------------------------------------------------------------------------------------------ container
@dataclass(frozen=True)
class OmniglotImages:
    """Decoded characters: ``images`` uint8 ``[characters, 20, S, S]`` (ink = 255) and their ``names``.

    ``names[i]`` is ``'alphabet/character'`` (e.g. ``'Greek/character01'``); a rotated copy made by
    :func:`with_rotations` is ``'Greek/character01@rot90'``.

    Example::

        >>> tiny = OmniglotImages(torch.zeros(5, 20, 4, 4, dtype=torch.uint8), [f"A/c{i}" for i in range(5)])
        >>> len(tiny), tiny.image_size, tiny.alphabets
        (5, 4, ('A',))
    """

    images: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [characters, images_per_character, S, S] (got "
                            f"{getattr(self.images, 'dtype', type(self.images).__name__)} "
                            f"{tuple(getattr(self.images, 'shape', ()))})")
        object.__setattr__(self, "names", tuple(self.names))
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"names has {len(self.names)} entries but images has {self.images.shape[0]} characters")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def alphabets(self) -> tuple[str, ...]:
        """The sorted alphabet names present."""
        return tuple(sorted({n.split("/")[0] for n in self.names}))

    def select(self, indices: Sequence[int]) -> "OmniglotImages":
        """The characters at ``indices``, in that order."""
        indices = list(indices)
        index = torch.tensor(indices, dtype=torch.long, device=self.images.device)
        return OmniglotImages(self.images.index_select(0, index), tuple(self.names[i] for i in indices))

    def to(self, device) -> "OmniglotImages":
        """The same data on ``device`` (episodes are sampled where the images live)."""
        return OmniglotImages(self.images.to(device), self.names)


@dataclass(frozen=True)
class OmniglotSplit:
    """A character-level split. ``train`` may hold rotated copies (new classes); ``val``/``test`` never do.

    Example::

        >>> tiny = OmniglotImages(torch.zeros(5, 20, 4, 4, dtype=torch.uint8), [f"A/c{i}" for i in range(5)])
        >>> split = split_characters(tiny, (3, 1, 1), seed=0, rotations=(0,))
        >>> split.sizes()
        (3, 1, 1)
    """

    train: OmniglotImages
    val: OmniglotImages
    test: OmniglotImages
    seed: int
    rotations: tuple[int, ...]

    def sizes(self) -> tuple[int, int, int]:
        """Number of classes in (train, val, test), rotations included."""
        return len(self.train), len(self.val), len(self.test)


# ------------------------------------------------------------------------------------ download/extract
def omniglot_dir(create: bool = True) -> Path:
    """Where Omniglot's zips, folders and caches live: ``METATUT_DATA/omniglot``.

    Example::

        >>> omniglot_dir(create=False).name
        'omniglot'
    """
    path = data_dir(create) / "omniglot"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def download_url(url: str, root: str, filename: str) -> None:
    """Download ``url`` to ``root/filename`` with :func:`torch.hub.download_url_to_file` (no torchvision).

    A progress bar is shown unless :func:`metatut.budget.quiet`. The file is not checked here:
    :func:`fetch_zip` calls this inside a private temporary folder and verifies the result with
    :func:`check_integrity` before anything is put in place.

    Example::

        >>> # downloads: fetch_zip calls download_url in a private folder, then checks the MD5
        >>> download_url.__module__
        'metatut.data.omniglot'
    """
    from torch.hub import download_url_to_file

    from ..budget import quiet
    download_url_to_file(url, str(Path(root) / filename), progress=not quiet())


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of the file at ``path`` (read in 1 MiB blocks), e.g. ``'md5'`` or ``'sha256'``.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "hello.txt"
        ...     _ = path.write_bytes(b"hello")
        ...     print(file_digest(path, "md5"))
        5d41402abc4b2a76b9719d911017c592
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_integrity(path: str | os.PathLike, checksum: str) -> bool:
    """True when ``path`` is a file whose MD5 (a 32-digit ``checksum``) or SHA-256 (64 digits) matches.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "hello.txt"
        ...     _ = path.write_bytes(b"hello")
        ...     print(check_integrity(path, "5d41402abc4b2a76b9719d911017c592"),
        ...           check_integrity(path, hashlib.sha256(b"hello").hexdigest()),
        ...           check_integrity(Path(folder) / "missing.zip", "5d41402abc4b2a76b9719d911017c592"))
        True True False
    """
    checksum = checksum.strip().lower()
    algorithm = {32: "md5", 64: "sha256"}.get(len(checksum))
    if algorithm is None:
        raise ValueError(f"checksum must be an MD5 (32 hex digits) or a SHA-256 (64 hex digits), got {checksum!r}")
    path = Path(path)
    return path.is_file() and file_digest(path, algorithm) == checksum


def _official(name: str) -> tuple[str, str]:
    if name not in OFFICIAL_ZIPS:
        raise ValueError(f"name must be one of {tuple(OFFICIAL_ZIPS)} (got {name!r})")
    relative, md5 = OFFICIAL_ZIPS[name]
    return f"{URL_PREFIX}/{relative}", md5


def fetch_zip(name: str, root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Return the path of the verified official ``<name>.zip`` in ``root`` (default :func:`omniglot_dir`).

    A file already there is kept if its MD5 matches. Otherwise, with ``download=True``, the file is
    downloaded into a private temporary folder in ``root`` (:func:`metatut.fileio.temporary_folder`),
    checked, and only then written to ``<name>.zip`` atomically (a bad file there is replaced only by a
    good one); on any failure nothing new is left behind and the error says how to place the file by hand.
    Safe to call from several processes at once (each downloads; the last verified copy wins); to download
    only once, call it under ``FileLock(root / LOCK_NAME)`` as :func:`load_omniglot` does.

    Example::

        >>> import tempfile
        >>> try:
        ...     fetch_zip("images_background", tempfile.mkdtemp(), download=False)
        ... except FileNotFoundError as err:
        ...     print("not found and download=False" in str(err))
        True
    """
    url, md5 = _official(name)
    root = Path(root) if root is not None else omniglot_dir()
    path = root / f"{name}.zip"
    manual = (f"Without network access, download {url} on another machine and copy it to {path} "
              f"(MD5 {md5}).")
    if path.is_file():
        if check_integrity(str(path), md5):
            return path
        if not download:
            raise ValueError(f"{path} fails its MD5 check (expected {md5}): it is truncated or not the official "
                             f"file. Delete it and call again with download=True. {manual}")
    elif not download:
        raise FileNotFoundError(f"{path} not found and download=False. Call with download=True. {manual}")
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root, path.name)
    with temporary_folder(path) as work:
        partial = work / path.name
        try:
            download_url(url, str(work), filename=partial.name)
        except Exception as err:
            raise RuntimeError(f"downloading {url} failed ({type(err).__name__}: {err}). {manual}") from err
        if not check_integrity(str(partial), md5):
            raise RuntimeError(f"the file downloaded from {url} fails its MD5 check (expected {md5}); "
                               f"nothing was kept. Try again later. {manual}")
        with open(partial, "rb") as downloaded:
            atomic_write(path, lambda f: shutil.copyfileobj(downloaded, f, 1 << 20))
    return path


def _wait_message(folder: Path, what: str):
    def tell(holder: dict | None) -> None:
        who = f"pid {holder['pid']} on {holder.get('host', '?')}" if holder and "pid" in holder else "another process"
        print(f"metatut: waiting for {who} to finish {what} in {folder} (lock {folder / LOCK_NAME}) ...",
              file=sys.stderr, flush=True)
    return tell


def data_lock(folder: str | os.PathLike, what: str = "preparing Omniglot data") -> FileLock:
    """The exclusive lock that serialises writing into the data folder ``folder`` (``folder/.metatut-data.lock``).

    Blocks until free; while it waits it says so once on stderr. Re-check for the finished result after
    taking it: another process may have done the work meanwhile.

    Example::

        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with data_lock(root):
        ...     done = (root / "images_background").is_dir()   # re-check, then download/extract if needed
        >>> done
        False
    """
    folder = Path(folder)
    return FileLock(folder / LOCK_NAME, timeout=None, purpose=what, on_wait=_wait_message(folder, what))


def _verified(name: str, root: Path) -> Path | None:
    """``root/<name>.zip`` if it is there with the right MD5, else None (reads only)."""
    path = root / f"{name}.zip"
    return path if path.is_file() and check_integrity(str(path), _official(name)[1]) else None


def _fetch_zip_once(name: str, root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """:func:`fetch_zip` for several processes at once: a verified file is used as it is (read only);
    otherwise the download happens under :func:`data_lock` of ``root``, by whichever process gets the lock
    first, and the others use its file."""
    root = Path(root) if root is not None else omniglot_dir()
    ready = _verified(name, root)
    if ready is not None or not download:
        return ready or fetch_zip(name, root, download=False)
    with data_lock(root, f"downloading {name}.zip"):
        return fetch_zip(name, root, download=True)


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    """Reject member names that could write outside the target folder (zip-slip)."""
    normal = name.replace("\\", "/")
    parts = PurePosixPath(normal).parts
    if (normal.startswith("/") or (parts and ":" in parts[0]) or ".." in parts or not parts):
        raise ValueError(f"unsafe path {name!r} in {archive}: zip members must be relative paths without '..'; "
                         "refusing to read or extract this archive")
    return PurePosixPath(normal)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        raise ValueError(f"{path} is not a readable zip archive ({err}); it may be truncated or corrupt. "
                         "Delete it and download it again (see metatut.data.fetch_zip).") from err


def extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract ``zip_path`` into the new folder ``dest``, atomically and safely; return ``dest``.

    Every member path is checked first (no absolute paths, no ``..``). When all members share one top
    folder (as in ``images_background.zip``) that folder becomes ``dest``. Extraction goes to a temporary
    folder next to ``dest`` (:func:`metatut.fileio.temporary_folder`) that is renamed only when complete,
    so ``dest`` exists only if whole; the leftovers of a killed extraction are deleted by
    :func:`metatut.fileio.remove_stale_temporaries` (which :func:`load_omniglot` runs). Two processes
    extracting to the same ``dest`` at once: one wins, the other raises :class:`FileExistsError` (run them
    under :func:`data_lock`, as :func:`load_omniglot` does, and re-check ``dest`` after taking it).

    Example::

        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with zipfile.ZipFile(folder / "x.zip", "w") as archive:
        ...     archive.writestr("images_x/A/c1/01.png", b"...")
        >>> extract_zip(folder / "x.zip", folder / "out").name
        'out'
        >>> [png.read_bytes() for png in (folder / "out").rglob("01.png")]
        [b'...']
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; delete it to extract {zip_path.name} again")
    with temporary_folder(dest) as tmp:
        with _open_zip(zip_path) as archive:
            members = archive.infolist()
            paths = [_check_member_name(m.filename, zip_path) for m in members]
            tops = {p.parts[0] for p in paths}
            single_top = len(tops) == 1 and all(len(p.parts) > 1 or m.is_dir()
                                                for p, m in zip(paths, members, strict=True))
            try:
                archive.extractall(tmp)
            except _ZIP_ERRORS as err:
                raise ValueError(f"{zip_path} is corrupt ({err}); delete it and download it again") from err
        source = tmp / next(iter(tops)) if single_top else tmp
        if source == tmp:   # the private folder itself becomes dest: give it the usual permissions
            os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.replace(source, dest)
        except OSError as err:
            if not dest.exists():
                raise
            raise FileExistsError(f"{dest} was created by another process while {zip_path.name} was being "
                                  "extracted; it is kept as it is (extract under metatut.data.omniglot.data_lock "
                                  "to avoid the duplicate work)") from err
    return dest


# ---------------------------------------------------------------------------------------------- decode
def decode_png(data: bytes, image_size: int = 28) -> Tensor:
    """Decode one Omniglot PNG into uint8 ``[image_size, image_size]``, ink = 255 (Lanczos resize).

    Example::

        >>> buffer = io.BytesIO()
        >>> Image.new("1", (105, 105), 1).save(buffer, format="PNG")      # a blank sheet: no ink
        >>> image = decode_png(buffer.getvalue())
        >>> image.shape, image.dtype, int(image.max())
        (torch.Size([28, 28]), torch.uint8, 0)
    """
    with Image.open(io.BytesIO(data)) as image:
        grey = image.convert("L")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(image_size, image_size)
    return 255 - pixels


def _check_image_size(image_size) -> int:
    check_positive_int("image_size", image_size)
    if image_size > ORIGINAL_SIZE:
        raise ValueError(f"image_size must be an int in [1, {ORIGINAL_SIZE}] (got {image_size})")
    return image_size


class _Source:
    """One zip or folder in Omniglot's layout: lists its PNGs and reads their bytes."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"Omniglot source {path} does not exist (give a zip or a folder laid out as "
                                    "<alphabet>/<character>/<id>_<drawer>.png)")
        self.path = path
        self.is_zip = path.is_file()
        self.archive = _open_zip(path) if self.is_zip else None
        self._names: list[str] | None = None

    def png_names(self) -> list[str]:
        if self._names is None:
            if self.archive is not None:
                names = [m.filename for m in self.archive.infolist() if not m.is_dir()]
                for n in names:
                    _check_member_name(n, self.path)
            else:
                names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
            self._names = sorted(n for n in names if n.lower().endswith(".png") and not _hidden(n))
        return self._names

    def read(self, name: str) -> bytes:
        if self.archive is None:
            return (self.path / name).read_bytes()
        try:
            return self.archive.read(name)
        except _ZIP_ERRORS as err:
            raise ValueError(f"{self.path} is corrupt: reading {name} failed ({err}). Delete it and download "
                             "it again (see metatut.data.fetch_zip).") from err

    def fingerprint(self) -> dict:
        stat = self.path.stat()
        if self.is_zip:
            return {"zip": str(self.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        digest = hashlib.sha256()
        for name in self.png_names():
            s = (self.path / name).stat()
            digest.update(f"{name}\t{s.st_size}\t{s.st_mtime_ns}\n".encode())
        return {"folder": str(self.path.resolve()), "files": digest.hexdigest()}

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _decode(sources: Sequence[_Source], image_size: int) -> tuple[Tensor, list[str]]:
    """Decode every character of ``sources`` (deduplicated by ``alphabet/character``, first source wins)."""
    groups: dict[str, tuple[_Source, list[str]]] = {}
    for source in sources:
        found: dict[str, list[str]] = {}
        for name in source.png_names():
            parts = name.split("/")
            if len(parts) not in (3, 4):
                raise ValueError(f"{source.path}: {name!r} is not in Omniglot's layout "
                                 "<alphabet>/<character>/<id>_<drawer>.png (optionally under one top folder)")
            found.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(name)
        for character, files in found.items():
            if character not in groups:
                groups[character] = (source, files)
    if not groups:
        raise ValueError(f"no PNG images found in {[str(s.path) for s in sources]}")
    names = sorted(groups)
    wrong = [f"{n} ({len(groups[n][1])} images)" for n in names if len(groups[n][1]) != IMAGES_PER_CHARACTER]
    if wrong:
        raise ValueError(f"every Omniglot character must have {IMAGES_PER_CHARACTER} images; these do not: "
                         + ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    images = torch.empty(len(names), IMAGES_PER_CHARACTER, image_size, image_size, dtype=torch.uint8)
    for i, character in enumerate(names):
        source, files = groups[character]
        for j, file in enumerate(sorted(files, key=lambda f: f.rsplit("/", 1)[-1])):
            try:
                images[i, j] = decode_png(source.read(file), image_size)
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"{source.path}: {file} is not a readable PNG ({err})") from err
    return images, names


def _cache_key(sources: Sequence[_Source], image_size: int) -> str:
    description = {"format": CACHE_FORMAT, "image_size": image_size, "images_per_character": IMAGES_PER_CHARACTER,
                   "sources": [s.fingerprint() for s in sources]}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _pixels_digest(images: Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def _cache_problem(state, key: str, image_size: int) -> str | None:
    """Why ``state`` (a loaded cache file) must not be returned for this request, or None if it may."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a cache record"
    if state.get("format") != CACHE_FORMAT:
        return f"it has cache format {state.get('format')!r}, not {CACHE_FORMAT} (written by another metatut version)"
    if state.get("key") != key:
        return "it was made from other sources or settings (its key differs)"
    if state.get("image_size") != image_size:
        return f"it records image_size {state.get('image_size')!r}, but {image_size} was asked for"
    images, names = state.get("images"), state.get("names")
    expected = f"uint8 [characters, {IMAGES_PER_CHARACTER}, {image_size}, {image_size}]"
    if not isinstance(images, Tensor):
        return f"its images are a {type(images).__name__}, not a tensor {expected}"
    if (images.dtype != torch.uint8 or images.dim() != 4
            or tuple(images.shape[1:]) != (IMAGES_PER_CHARACTER, image_size, image_size)):
        return f"its images are {images.dtype} {list(images.shape)}, not {expected}"
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return "its names are not a list of strings"
    if len(names) != images.shape[0] or len(set(names)) != len(names) or list(names) != sorted(names):
        return (f"it has {len(names)} names for {images.shape[0]} characters (names must be sorted and distinct, "
                "one per character)")
    if state.get("images_sha256") != _pixels_digest(images):
        return "its pixels do not match the checksum stored with them (the file was damaged or edited)"
    return None


def _read_cache(path: Path, key: str, image_size: int) -> OmniglotImages | None:
    """The cached images at ``path`` if the file is there and holds exactly what this request asks for.

    Anything else (unreadable, another format, key, image size, shape, dtype, names, or a pixel checksum
    mismatch) gives a warning and None: the caller decodes again and replaces the file.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable Omniglot cache {path} ({type(err).__name__}: {str(err)[:200]}); "
                      "decoding again and replacing it", stacklevel=3)
        return None
    problem = _cache_problem(state, key, image_size)
    if problem is not None:
        warnings.warn(f"ignoring Omniglot cache {path}: {problem}; decoding again and replacing it", stacklevel=3)
        return None
    return OmniglotImages(state["images"], tuple(state["names"]))


def _cache_lock(folder: Path) -> FileLock:
    """:func:`data_lock` of the cache folder's parent (the data folder itself for the default cache), so that
    the cache folder holds nothing but cache files; inside the cache folder if its parent is not writable."""
    parent = folder.parent if folder.parent != folder else folder
    if os.access(parent, os.W_OK | os.X_OK) or not parent.exists():
        return data_lock(parent, "decoding Omniglot into its cache")
    return data_lock(folder, "decoding Omniglot into its cache")


def load_omniglot_from(*sources: str | os.PathLike, image_size: int = 28, cache: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> OmniglotImages:
    """Decode Omniglot zips and/or folders into :class:`OmniglotImages` ``[characters, 20, S, S]``.

    Characters are deduplicated by ``alphabet/character`` (the first source that has one wins; e.g. Greek
    and Latin are in both small background sets) and sorted by name. Each character must have 20 images,
    ordered by file name (i.e. by drawer). With ``cache=True`` the result is saved atomically in
    ``cache_dir`` (default ``METATUT_DATA/omniglot/cache``) under a key made of the sources' resolved paths,
    sizes and modification times (for a folder: of every PNG in it) and ``image_size``; a later call with
    unchanged sources loads that file instead of decoding, after checking that it holds what was asked
    for (otherwise it warns, decodes and replaces it). A corrupt source raises before anything is cached.
    Decoding into the cache runs under :func:`data_lock` (of the cache folder's parent): of several
    processes loading at once, one decodes and writes, the others wait and read its file.

    Example::

        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> buffer = io.BytesIO()
        >>> Image.new("1", (105, 105), 1).save(buffer, format="PNG")
        >>> with zipfile.ZipFile(folder / "tiny.zip", "w") as archive:
        ...     for c in ("c1", "c2"):
        ...         for k in range(1, 21):
        ...             archive.writestr(f"images_tiny/Alpha/{c}/{c}_{k:02d}.png", buffer.getvalue())
        >>> data = load_omniglot_from(folder / "tiny.zip", image_size=8, cache=False)
        >>> data.images.shape, data.names
        (torch.Size([2, 20, 8, 8]), ('Alpha/c1', 'Alpha/c2'))
    """
    if not sources:
        raise ValueError("give at least one Omniglot zip or folder (e.g. metatut.data.fetch_zip('images_background'))")
    image_size = _check_image_size(image_size)
    opened: list[_Source] = []
    try:
        for s in sources:
            opened.append(_Source(Path(s).expanduser()))
        path = None
        if cache:
            key = _cache_key(opened, image_size)
            folder = Path(cache_dir) if cache_dir is not None else omniglot_dir() / "cache"
            path = folder / f"omniglot-{image_size}px-{key[:24]}.pt"
            cached = _read_cache(path, key, image_size)
            if cached is not None:
                return cached
            with _cache_lock(folder):
                if path.is_file():                  # another process may have written it while we waited
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")      # (the first read has warned already)
                        cached = _read_cache(path, key, image_size)
                    if cached is not None:
                        return cached
                images, names = _decode(opened, image_size)
                remove_stale_temporaries(folder)
                atomic_save({"format": CACHE_FORMAT, "key": key, "image_size": image_size, "images": images,
                             "names": list(names), "images_sha256": _pixels_digest(images)}, path)
                return OmniglotImages(images, tuple(names))
        images, names = _decode(opened, image_size)
        return OmniglotImages(images, tuple(names))
    finally:
        for s in opened:
            s.close()


def load_omniglot(which: str = "full", *, root: str | os.PathLike | None = None, download: bool = True,
             image_size: int = 28, cache: bool = True, cache_dir: str | os.PathLike | None = None) -> OmniglotImages:
    """Load one of the official character sets: ``'full'`` (1,623), ``'background'`` (964),
    ``'evaluation'`` (659) or ``'small'`` (the two small background sets, deduplicated: 242).

    Zips are fetched into ``root`` (default ``METATUT_DATA/omniglot``) with :func:`fetch_zip`
    (``download=False``: they must already be there). The full sets are extracted to ``root/<name>/``
    with :func:`extract_zip` and decoded from there; the small sets are decoded straight from their zips
    (so a read-only ``root`` works for them). Raises if the number of characters is not the expected one.

    Safe for several processes at once (e.g. every rank of a multi-GPU launch on a fresh machine): the
    download and extraction run under :func:`data_lock` of ``root`` and the cache writing under that of the
    cache folder's parent; whoever gets a lock first does the work, the others wait (saying so on stderr)
    and then use the result. Temporaries left in ``root`` by killed downloads or extractions are deleted.

    Example::

        >>> import tempfile
        >>> try:
        ...     load_omniglot("small", root=tempfile.mkdtemp(), download=False)
        ... except FileNotFoundError as err:
        ...     print("download=False" in str(err))
        True
    """
    if which not in SETS:
        raise ValueError(f"which must be one of {tuple(SETS)} (got {which!r})")
    names, expected = SETS[which]
    root = Path(root).expanduser() if root is not None else omniglot_dir()
    extract = which != "small"

    def ready(name: str) -> Path | None:
        """The source for ``name`` if it can be read as it is (reads only), else None."""
        if extract:
            return root / name if (root / name).is_dir() else None
        if download:
            return _verified(name, root)
        return fetch_zip(name, root, download=False)    # raises if missing or damaged

    sources = [ready(name) for name in names]
    if any(s is None for s in sources):
        with data_lock(root, f"fetching and extracting Omniglot '{which}'"):
            remove_stale_temporaries(root)
            for i, name in enumerate(names):
                if ready(name) is not None:             # done meanwhile by another process
                    sources[i] = ready(name)
                elif extract:
                    sources[i] = extract_zip(fetch_zip(name, root, download=download), root / name)
                else:
                    sources[i] = fetch_zip(name, root, download=download)
    data = load_omniglot_from(*sources, image_size=image_size, cache=cache, cache_dir=cache_dir)
    if len(data) != expected:
        raise ValueError(f"expected {expected} characters in Omniglot '{which}' but found {len(data)} in "
                         f"{[str(s) for s in sources]}; delete the folders there and call again to re-extract")
    return data


# ---------------------------------------------------------------------------------------------- splits
def with_rotations(data: OmniglotImages, rotations: Sequence[int] = (0, 1, 2, 3)) -> OmniglotImages:
    """Add rotated copies as new classes: ``k`` in ``rotations`` turns each character by ``k*90`` degrees
    counter-clockwise. Output ``[characters * len(rotations), 20, S, S]``, each character's rotations adjacent;
    ``k=0`` keeps the plain name, others get the suffix ``@rot90``, ``@rot180``, ``@rot270``.

    Example::

        >>> tiny = OmniglotImages(torch.zeros(5, 20, 4, 4, dtype=torch.uint8), [f"A/c{i}" for i in range(5)])
        >>> rotated = with_rotations(tiny, (0, 1))
        >>> len(rotated), rotated.names[:2]
        (10, ('A/c0', 'A/c0@rot90'))
    """
    rotations = tuple(rotations)
    if not rotations or len(set(rotations)) != len(rotations) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= 3 for k in rotations):
        raise ValueError(f"rotations must be distinct ints in [0, 3] (multiples of 90 degrees) (got {rotations!r})")
    if any(ROTATION_TAG in n for n in data.names):
        raise ValueError("data already holds rotated classes; rotate only once")
    images = torch.stack([torch.rot90(data.images, k, dims=(-2, -1)) for k in rotations], dim=1)
    names = [n if k == 0 else f"{n}{ROTATION_TAG}{90 * k}" for n in data.names for k in rotations]
    return OmniglotImages(images.flatten(0, 1), tuple(names))


def split_characters(data: OmniglotImages, sizes: Sequence[int], *, seed: int,
                     rotations: Sequence[int] = (0, 1, 2, 3)) -> OmniglotSplit:
    """Split characters into train/val/test of ``sizes = (n_train, n_val, n_test)`` after a seeded shuffle.

    The characters are first sorted by name (so the result does not depend on load order), then permuted
    with ``torch.randperm`` under a ``torch.Generator`` seeded with ``seed``. Rotated copies
    (:func:`with_rotations` with ``rotations``) are added to the training split only; pass
    ``rotations=(0,)`` for none.

    Example::

        >>> tiny = OmniglotImages(torch.zeros(5, 20, 4, 4, dtype=torch.uint8), [f"A/c{i}" for i in range(5)])
        >>> split = split_characters(tiny, (3, 1, 1), seed=0)      # rotations: training classes only
        >>> split.sizes()
        (12, 1, 1)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (got {seed!r})")
    sizes = tuple(sizes)
    if len(sizes) != 3:
        raise ValueError(f"sizes must be (n_train, n_val, n_test) (got {sizes!r})")
    for name, n in zip(("n_train", "n_val", "n_test"), sizes, strict=True):
        check_positive_int(f"sizes: {name}", n)
    if sum(sizes) != len(data):
        raise ValueError(f"sizes must add up to the number of characters, {len(data)} (got {sizes}, sum {sum(sizes)})")
    if any(ROTATION_TAG in n for n in data.names):
        raise ValueError("split the plain characters, before adding rotations (rotated copies of one character "
                         "must not land in different splits)")
    by_name = sorted(range(len(data)), key=lambda i: data.names[i])
    order = [by_name[i] for i in torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()]
    a, b = sizes[0], sizes[0] + sizes[1]
    train = data.select(order[:a])
    rotations = tuple(rotations)
    if rotations != (0,):
        train = with_rotations(train, rotations)
    return OmniglotSplit(train, data.select(order[a:b]), data.select(order[b:]), seed, rotations)


def maml_split(data: OmniglotImages, *, seed: int = 1, rotations: Sequence[int] = (0, 1, 2, 3)) -> OmniglotSplit:
    """The MAML protocol on the full set: 1,100 train / 100 validation / 423 test characters, training
    classes augmented with 90-degree rotations (4,400 training classes).

    The official code (``data_generator.py`` in github.com/cbfinn/maml) shuffles the character folders with
    Python's ``random.seed(1); random.shuffle`` over an ``os.listdir`` order, which is filesystem
    dependent, so its exact permutation cannot be reproduced. Here the same sizes come from
    :func:`split_characters` (names sorted, then ``torch.randperm`` seeded with ``seed``): deterministic,
    but a different set of characters from the paper's. The official code also draws a random rotation
    per class in every task (validation/test included); here rotations are training classes only.

    Example::

        >>> tiny = OmniglotImages(torch.zeros(5, 20, 4, 4, dtype=torch.uint8), [f"A/c{i}" for i in range(5)])
        >>> try:
        ...     maml_split(tiny)
        ... except ValueError as err:
        ...     print(str(err)[:52])
        maml_split needs the full set of 1623 characters (go
    """
    if len(data) != 1623:
        raise ValueError(f"maml_split needs the full set of 1623 characters (got {len(data)}); "
                         "use fraction_split or split_characters for other sets")
    return split_characters(data, (1100, 100, 423), seed=seed, rotations=rotations)


def fraction_split(data: OmniglotImages, fractions: Sequence[float] = (0.6, 0.2, 0.2), *, seed: int = 0,
                   rotations: Sequence[int] = (0, 1, 2, 3)) -> OmniglotSplit:
    """A character-level split by ``fractions = (train, val, test)`` (summing to 1) for any set.

    ``n_val = round(val * C)``, ``n_test = round(test * C)``, train gets the rest; e.g. the 242 characters of
    the small sets give 146 / 48 / 48 with the defaults. Shuffle and rotations as :func:`split_characters`.

    Example::

        >>> tiny = OmniglotImages(torch.zeros(5, 20, 4, 4, dtype=torch.uint8), [f"A/c{i}" for i in range(5)])
        >>> fraction_split(tiny, (0.6, 0.2, 0.2), rotations=(0,)).sizes()
        (3, 1, 1)
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not 0 < f < 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three numbers in (0, 1) summing to 1 (got {fractions!r})")
    n_val, n_test = round(fractions[1] * len(data)), round(fractions[2] * len(data))
    sizes = (len(data) - n_val - n_test, n_val, n_test)
    if min(sizes) < 1:
        raise ValueError(f"fractions {fractions} leave an empty split for {len(data)} characters (sizes {sizes})")
    return split_characters(data, sizes, seed=seed, rotations=rotations)


# --------------------------------------------------------------------------------- offline small copy
SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
ONE_SHOT_RUNS_ZIP = "all_runs.zip"


def offline_omniglot_dir(files: Sequence[str] = (*SMALL_ZIPS, ONE_SHOT_RUNS_ZIP)) -> Path | None:
    """The first folder that holds all of ``files`` (by default the two small background sets and the
    one-shot runs), or None: ``$METATUT_SHARED_OMNIGLOT``, then ``METATUT_DATA/omniglot``, then the
    course's offline copy ``<repo>/../shared/data/omniglot``. With None, load with ``download=True``.

    Example::

        >>> folder = offline_omniglot_dir()
        >>> folder is None or all((folder / name).is_file() for name in (*SMALL_ZIPS, ONE_SHOT_RUNS_ZIP))
        True
    """
    candidates = []
    if os.environ.get("METATUT_SHARED_OMNIGLOT"):
        candidates.append(Path(os.environ["METATUT_SHARED_OMNIGLOT"]).expanduser())
    candidates += [data_dir(create=False) / "omniglot",
                   Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"]
    return next((c for c in candidates if all((c / f).is_file() for f in files)), None)
