"""Atomic writes and hashing. Every file ftctl writes goes through here."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_CHUNK = 1 << 20


def umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the only portable way is to set it and put it back
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: 0o777 less the umask (0o755 under 022)."""
    return 0o777 & ~umask()


def normalize_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes ``open()``/``mkdir`` would under the
    umask (libraries write some files 0600 through temp files: safetensors does)."""
    root = Path(root)
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, dmode if p.is_dir() else fmode)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file that becomes ``path`` only when the block ends without an error: written
    to a temp file in the same directory, fsynced, renamed (one rename). A failed or
    interrupted write leaves the previous file (or nothing), never half a file. The file gets
    ``mode``, by default the mode a plain ``open()`` would give it (mkstemp's is 0600: a model
    copied with ``scp -r`` would be unreadable by a service running as another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`), with ``mode`` if given."""
    with atomic_file(path, mode=mode) as fh:
        fh.write(data)
    return Path(path)


def rewrite_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace an existing file's content atomically as :func:`atomic_write_bytes` does, but
    keep what the file is: its mode, and a symlink stays a symlink (the file it points to is
    replaced). A missing file is created with the default mode."""
    real = Path(os.path.realpath(path))
    try:
        mode = real.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    return atomic_write_bytes(real, data, mode=mode)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = 120.0) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` for a read-modify-write of ``path`` by several
    processes. The lock is a file of its own beside the real file (``.NAME.lock``): an atomic
    replace gives ``path`` a new inode, so a lock on the old one would not exclude anyone.
    TimeoutError after ``timeout`` seconds of waiting."""
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    lock = real.parent / f".{real.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"{lock}: held by another process for {timeout:.0f}s"
                    raise TimeoutError(msg) from None
                time.sleep(0.02)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; rename it to ``final`` only if the block succeeds.

    ``final`` therefore appears only when complete. With ``overwrite`` an existing ``final`` is
    replaced (moved aside, then removed after the rename); without it, it is an error. The
    directory and every file in it get the modes a plain ``mkdir``/``open()`` would give them
    (mkdtemp's is 0700; see :func:`normalize_modes`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        normalize_modes(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_tree(root: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every regular file under ``root``, keyed by POSIX relative path, sorted."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out
