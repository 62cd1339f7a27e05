"""Files that survive kills and concurrent processes: one atomic-write helper and one lock for the project.

* :func:`atomic_write` (and :func:`atomic_write_text`, :func:`atomic_save`) writes to a fresh temporary file
  in the destination's folder (exclusive create, an unpredictable name, so a symlink planted there is never
  followed), flushes and fsyncs it, then renames it over the destination. A reader sees the old file or the
  new one, never half of one. Every file metatut writes goes through it.
* Temporary names carry the writer's process id (``.<name>.<pid>.<random>.tmp``), so
  :func:`remove_stale_temporaries` can delete the leftovers of a process that was killed between the
  fsync and the rename, and leave those of a live writer alone. :func:`temporary_folder` makes a
  private folder under the same naming scheme (for downloads and zip extraction), so the same clean-up
  finds the leftovers of those too. Process ids are those of this machine: on a folder shared by
  several machines, run the clean-up under a :class:`FileLock` that every writer takes.
* :class:`FileLock` is an exclusive advisory lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows)
  that the operating system releases when its holder dies. The lock file records its holder; a lock file
  still naming a holder when the lock is free means that holder crashed, which :attr:`FileLock.stale_holder`
  reports.

Example::

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with FileLock(folder / ".lock", timeout=0):
    ...     path = atomic_write_text(folder / "config.json", '{"steps": 10}\\n')
    >>> path.read_text()
    '{"steps": 10}\\n'
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text", "atomic_save", "temporary_folder", "remove_stale_temporaries",
           "FileLock", "LockTimeout", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes to a binary file object) to ``path`` atomically.

    The temporary file is created exclusively (``O_EXCL``) under an unpredictable name in ``path``'s folder,
    fsynced, given the usual permissions (``0o666`` less the umask) and renamed over ``path``. If anything
    fails, the temporary file is removed and ``path`` is untouched. Returns ``path``.

    Example::

        >>> import tempfile, pathlib
        >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "x.bin", b"abc")
        >>> p.read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` for text.

    Example::

        >>> import tempfile, pathlib
        >>> atomic_write_text(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hi").read_text()
        'hi'
    """
    return atomic_write(path, text.encode(encoding))


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`: never a half-written file.

    Example::

        >>> import tempfile, pathlib, torch
        >>> p = atomic_save({"w": torch.ones(2)}, pathlib.Path(tempfile.mkdtemp()) / "w.pt")
        >>> torch.load(p, weights_only=True)["w"].tolist()
        [1.0, 1.0]
    """
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


@contextmanager
def temporary_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new private folder next to ``path``, named like :func:`atomic_write`'s temporaries, removed on exit.

    The folder (mode ``0o700``, created exclusively under an unpredictable name ``.<name>.<pid>.<random>.tmp``)
    is for work that must not be seen half done: download or extract into it, then move the finished
    result to ``path`` (:func:`os.replace` for a folder, :func:`atomic_write` for a file) before the
    ``with`` block ends. Whatever is left inside is deleted on exit; if the process is killed first,
    :func:`remove_stale_temporaries` deletes it later.

    Example::

        >>> import tempfile, pathlib, os
        >>> dest = pathlib.Path(tempfile.mkdtemp()) / "extracted"
        >>> with temporary_folder(dest) as work:
        ...     _ = (work / "a.txt").write_text("done")
        ...     os.replace(work, dest)
        >>> sorted(p.name for p in dest.parent.iterdir())
        ['extracted']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # cannot tell cheaply: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporaries left in ``folder`` by :func:`atomic_write` or :func:`temporary_folder` calls of
    processes that no longer run (killed between writing and renaming).

    ``name`` limits the clean-up to the temporaries of one destination. Temporaries of live processes
    (including this one) are kept; a temporary folder is deleted with its contents, a symlink planted under
    such a name is removed without touching its target. Returns the paths removed.

    Example::

        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / ".ckpt.pt.999999999.abc.tmp").write_bytes(b"half")  # no such process
        >>> [p.name for p in remove_stale_temporaries(folder, "ckpt.pt")]
        ['.ckpt.pt.999999999.abc.tmp']
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    pattern = f".{name}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"
    for candidate in folder.glob(pattern):
        parts = candidate.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        try:
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
        except OSError:  # gone already (another clean-up), or not ours to remove: leave it
            pass
    return removed


class LockTimeout(RuntimeError):
    """The lock is held by another process (and did not become free within the timeout).

    Example (another thread stands in for another process: each :class:`FileLock` opens the file anew)::

        >>> import tempfile, pathlib, threading
        >>> lock_path = pathlib.Path(tempfile.mkdtemp()) / ".lock"
        >>> errors = []
        >>> def try_lock():
        ...     try:
        ...         FileLock(lock_path, timeout=0).acquire()
        ...     except LockTimeout as err:
        ...         errors.append(err)
        >>> with FileLock(lock_path, purpose="training"):
        ...     worker = threading.Thread(target=try_lock)
        ...     worker.start()
        ...     worker.join()
        >>> print(errors[0])
        /.../.lock is locked by another process (pid ... since ..., training)
    """


class FileLock:
    """An exclusive lock on ``path`` between processes, released by the OS if the holder dies.

    ``timeout=None`` waits as long as it takes, ``0`` fails at once with :class:`LockTimeout`, a number
    waits that many seconds; ``on_wait(holder)`` is called once if the lock is busy (e.g. to print
    "waiting for ..."). The lock file holds a line of JSON about the holder (pid, host, start time,
    ``purpose``) while it is held and is emptied on release. If the file still names a holder when the
    lock is acquired, that holder ended without releasing it (a crash or a kill): its record is kept in
    :attr:`stale_holder` so that callers can report it.

    Example::

        >>> import tempfile, pathlib
        >>> lock_path = pathlib.Path(tempfile.mkdtemp()) / ".lock"
        >>> with FileLock(lock_path, purpose="demo") as lock:
        ...     lock.holder()["purpose"]
        'demo'
    """

    _held: dict[str, int] = {}          # lock files held in this process -> holding thread
    _held_guard = threading.Lock()

    def __init__(self, path: str | os.PathLike, *, timeout: float | None = None, poll: float = 0.1,
                 purpose: str = "", on_wait: Callable[[dict | None], None] | None = None) -> None:
        self.path = Path(path)
        self.timeout, self.poll, self.purpose, self.on_wait = timeout, poll, purpose, on_wait
        self.stale_holder: dict | None = None
        self._fd: int | None = None

    # -- platform primitives
    def _try_lock(self, fd: int) -> bool:
        if os.name == "posix":
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                return False
            return True
        import msvcrt  # pragma: no cover - Windows

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(self, fd: int) -> None:
        if os.name == "posix":
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    @staticmethod
    def _read(fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return {"record": text[:200]}
        return value if isinstance(value, dict) else {"record": text[:200]}

    def holder(self) -> dict | None:
        """The record of the process that holds (or last crashed holding) the lock, or ``None``."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return self._read(fd)
        finally:
            os.close(fd)

    # -- public API
    def acquire(self) -> FileLock:
        """Take the lock (see the class docstring for ``timeout``); returns ``self``."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self._key()
        with FileLock._held_guard:
            if FileLock._held.get(key) == threading.get_ident():
                raise RuntimeError(f"{self.path} is already locked by this thread (through another FileLock); "
                                   "waiting for it would never end. Take the lock once around all the work.")
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as err:
            raise OSError(f"cannot open the lock file {self.path}: {err.strerror or err}") from None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        told = False
        while not self._try_lock(fd):
            if deadline is not None and time.monotonic() >= deadline:
                holder = self._read(fd)
                os.close(fd)
                raise LockTimeout(f"{self.path} is locked by another process ({_describe(holder)})")
            if not told and self.on_wait is not None:
                self.on_wait(self._read(fd))
                told = True
            time.sleep(self.poll)
        self.stale_holder = self._read(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "purpose": self.purpose, "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        with FileLock._held_guard:
            FileLock._held[key] = threading.get_ident()
        return self

    def _key(self) -> str:
        return str(self.path.parent.resolve() / self.path.name)

    def release(self) -> None:
        """Empty the lock file (so the next holder does not report a crash) and release the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with FileLock._held_guard:
            FileLock._held.pop(self._key(), None)
        try:
            os.ftruncate(fd, 0)
            self._unlock(fd)
        finally:
            os.close(fd)

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    if "pid" in holder:
        text = f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('since', '?')}"
        return text + (f", {holder['purpose']}" if holder.get("purpose") else "")
    return str(holder.get("record", holder))
