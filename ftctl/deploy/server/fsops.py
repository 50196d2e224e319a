"""Files on the server: written atomically under unpredictable names (``mkstemp``: O_EXCL, so
no symlink planted in advance can redirect a write), fsynced, with the modes the design asks:
the state directory 0700 and its files 0600, deploys.log 0640."""

import contextlib
import hashlib
import json
import os
import stat
import tempfile

from .shared import LOG, OUTPUT_MAX, STATE_DIR


def bounded(text, limit=OUTPUT_MAX):
    """The end of ``text``, at most ``limit`` characters (marked when cut)."""
    text = text or ""
    return text if len(text) <= limit else "[...cut...]" + text[-limit:]


def state_dir(remote_dir):
    """``<remote_dir>/.ftctl``: made 0700 if missing; refused if it is not a real directory of
    ours (a symlink or another user's directory would let that user steer our writes)."""
    path = os.path.join(remote_dir, STATE_DIR)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError("%s is not a directory (a symlink?); remove it by hand" % path)
    if st.st_uid != os.geteuid():
        raise OSError(
            "%s belongs to uid %d, not to this user; remove it by hand" % (path, st.st_uid)
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def atomic_write(path, data, mode=0o600):
    """Replace ``path`` with ``data`` (str or bytes) in one rename, on disk before it appears."""
    if not isinstance(data, bytes):
        data = data.encode("utf-8")
    parent, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix="." + base + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path, doc, mode=0o600):
    atomic_write(path, json.dumps(doc, ensure_ascii=False, default=str), mode)


def read_json(path):
    """A JSON file's object (None if missing, unreadable, a symlink or not an object)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root):
    """Every file and directory of ``root`` on disk (a no-op for what already is)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def hash_file(path, fsync=True):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def append_log(remote_dir, entry):
    """One JSON line at the end of deploys.log (0640: it names commands and URLs), on disk."""
    line = json.dumps(entry, ensure_ascii=False, default=str) + "\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    fd = os.open(os.path.join(remote_dir, LOG), flags, 0o640)
    try:
        os.fchmod(fd, 0o640)
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(remote_dir, last=None):
    """The JSON lines of deploys.log (unreadable lines skipped), oldest first."""
    out = []
    try:
        fd = os.open(os.path.join(remote_dir, LOG), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return out
    with os.fdopen(fd, "rb") as fh:
        for raw in fh:
            with contextlib.suppress(ValueError):
                entry = json.loads(raw.decode("utf-8", "replace"))
                if isinstance(entry, dict):
                    out.append(entry)
    return out[-last:] if last else out
