"""The release directory on the server: the link, releases/, their file indexes, the swap."""

import contextlib
import json
import os
import shutil

from .fsops import fsync_path, read_json, remove
from .shared import STATE_DIR, release_key


def link_state(remote_dir, link):
    """("link"|"dir"|"missing"|"other", the release the link points at)."""
    path = os.path.join(remote_dir, link)
    if os.path.islink(path):
        target = os.readlink(path).rstrip("/")
        rel = os.path.relpath(target, remote_dir) if os.path.isabs(target) else target
        parts = rel.split("/")
        live = parts[1] if len(parts) == 2 and parts[0] == "releases" else None
        return "link", live
    if os.path.isdir(path):
        return "dir", None
    return ("other", None) if os.path.lexists(path) else ("missing", None)


def list_releases(remote_dir):
    d = os.path.join(remote_dir, "releases")
    with contextlib.suppress(OSError):
        names = [n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
        return sorted(names, key=release_key)
    return []


def index_path(remote_dir, release):
    return os.path.join(remote_dir, STATE_DIR, "index", release + ".json")


def release_index(remote_dir, release):
    """{relpath: [sha256, size]} of a release: the index written when it was verified, else
    its manifest.json's ``files`` map (sizes read from disk)."""
    index = read_json(index_path(remote_dir, release))
    if index is not None:
        return index
    return manifest_index(os.path.join(remote_dir, "releases", release))


def manifest_index(root):
    """{relpath: [sha256, size]} from the manifest.json of a model directory (empty without)."""
    out = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(root, "manifest.json"), "rb") as fh:
            files = json.loads(fh.read().decode("utf-8")).get("files") or {}
        for rel, sha in files.items():
            with contextlib.suppress(OSError):
                out[rel] = [sha, os.path.getsize(os.path.join(root, rel))]
    return out


def temp_name(remote_dir, base, kind="tmp"):
    """An unpredictable name beside ``base`` in ``remote_dir`` (for a link or an aside)."""
    return os.path.join(remote_dir, ".%s.%s-%s" % (base, kind, os.urandom(6).hex()))


def new_link(remote_dir, base, target):
    """A symlink to ``target`` under a fresh unpredictable name (symlink() never follows a name
    that exists: a clash is simply another try)."""
    while True:
        tmp = temp_name(remote_dir, base)
        try:
            os.symlink(target, tmp)
            return tmp
        except FileExistsError:
            continue


def swap_link(remote_dir, link, target):
    """Point ``link`` at ``target`` with one rename (atomic for readers)."""
    tmp = new_link(remote_dir, link, target)
    try:
        os.replace(tmp, os.path.join(remote_dir, link))
    except BaseException:
        remove(tmp)
        raise
    fsync_path(remote_dir)


def exchange(a, b):
    """renameat2(RENAME_EXCHANGE): swap two names in one step (Linux >= 3.15, glibc >= 2.28).
    False where the C library has no renameat2 or the filesystem refuses it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0


def prune(remote_dir, names, keep):
    """Remove the releases the client chose (never the live one, the previous or a backup)."""
    doomed = [n for n in names if n not in keep and not n.endswith("-original")]
    for name in doomed:
        shutil.rmtree(os.path.join(remote_dir, "releases", name), ignore_errors=True)
        remove(index_path(remote_dir, name))
    return doomed
