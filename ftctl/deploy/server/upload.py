"""Under the lock, before the go-live: clean leftovers, back up a real ``final/`` (the first
deploy), make the upload directory with hard links, hash what arrives, rename it into releases/.

The backup never leaves ``final`` half-deleted. With renameat2 (glibc >= 2.28) a hard-linked
copy and one RENAME_EXCHANGE: no moment without ``final``. Without it (CentOS 7, Ubuntu 18.04)
two renames, ``final`` -> ``releases/<ts>-original`` then a link -> ``final``, with a journal
written first: a kill between them is repaired by the next process that takes the lock.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from . import journal, tensordelta
from .fsops import atomic_write, fsync_path, hash_file, state_dir, write_json
from .layout import exchange, index_path, link_state, new_link, release_index
from .shared import utc_stamp


def _pause(req, name, remote_dir):
    """A test hook: stop here for a while when the client asks (``FTCTL_TEST_PAUSE_AT``), with
    a marker file saying so, so a test can kill the process at exactly this point."""
    if req.get("pause_at") != name:
        return
    atomic_write(os.path.join(state_dir(remote_dir), "paused-" + name), str(os.getpid()))
    time.sleep(float(req.get("pause_s", 60)))


def _write_index(remote_dir, release, index):
    os.makedirs(os.path.dirname(index_path(remote_dir, release)), mode=0o700, exist_ok=True)
    write_json(index_path(remote_dir, release), index)


def backup_original(remote_dir, link, hash_rels, req):
    """A real ``final/`` becomes ``releases/<ts>-original/`` and ``final`` a link to it (see the
    module docstring). The files in ``hash_rels`` (those a new release would link) are hashed,
    once, for its index."""
    name = utc_stamp() + "-original"
    final = os.path.join(remote_dir, link)
    rel_dir = os.path.join(remote_dir, "releases")
    os.makedirs(rel_dir, exist_ok=True)
    dest = os.path.join(rel_dir, name)
    atomic = req.get("renameat2", True) and _exchange_backup(remote_dir, link, final, dest, name)
    if not atomic:
        _two_renames(remote_dir, link, final, dest, name, req)
    files = {}
    for rel in sorted(hash_rels):
        p = os.path.join(dest, rel)
        if os.path.isfile(p):
            files[rel] = [hash_file(p, fsync=False), os.path.getsize(p)]
    _write_index(remote_dir, name, files)
    return {"backup": name, "atomic": bool(atomic)}


def _exchange_backup(remote_dir, link, final, dest, name):
    """The hard-linked copy, then one exchange of the names; False (nothing changed) where
    renameat2 is not available."""
    subprocess.run(
        ["cp", "-al", "--", final, dest], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    tmp = new_link(remote_dir, link, "releases/" + name)
    if exchange(tmp, final):
        shutil.rmtree(tmp)  # the old directory, now under the temporary name (links only)
        fsync_path(remote_dir)
        return True
    os.unlink(tmp)
    shutil.rmtree(dest)
    return False


def _two_renames(remote_dir, link, final, dest, name, req):
    tmp = new_link(remote_dir, link, "releases/" + name)
    journal.write(remote_dir, {"op": "backup", "link": link, "backup": name, "tmp": tmp})
    os.rename(final, dest)  # from here until the next rename there is no `final`
    _pause(req, "backup-renames", remote_dir)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(dest))
    fsync_path(remote_dir)
    journal.clear(remote_dir)


def repair_backup(remote_dir, j):
    """Finish a backup killed between its two renames (from its journal)."""
    link, name = j["link"], j["backup"]
    final, tmp = os.path.join(remote_dir, link), j.get("tmp") or ""
    dest = os.path.join(remote_dir, "releases", name)
    if os.path.lexists(final):
        if tmp and os.path.islink(tmp):
            os.unlink(tmp)
        return {"op": "backup", "ok": True, "did": "nothing to repair: %s is in place" % link}
    if not os.path.isdir(dest):
        return {
            "op": "backup",
            "ok": False,
            "did": "cannot repair: neither %s nor releases/%s exists" % (link, name),
        }
    if not (tmp and os.path.islink(tmp)):
        tmp = new_link(remote_dir, link, "releases/" + name)
    os.rename(tmp, final)
    fsync_path(remote_dir)
    return {
        "op": "backup",
        "ok": True,
        "did": "finished the first deploy's backup: %s -> releases/%s (the model it had)"
        % (link, name),
    }


def cmd_prepare(req):
    """Under the lock: clean leftovers, back up a real final/, make the upload directory with
    hard links of the unchanged files (and the bases of the delta transfers)."""
    d, link = req["remote_dir"], req["link"]
    state_dir(d)
    out = {"backup": None}
    for name in os.listdir(d):
        if name.startswith(".incoming-"):
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    kind, _live = link_state(d, link)
    checked = {}
    if kind == "dir":
        links = req.get("links", {}).values()
        from_final = {src[len(link) + 1 :] for src in links if src.startswith(link + "/")}
        out.update(backup_original(d, link, from_final, req))
        checked = release_index(d, out["backup"])  # hashed just now: trust it, not the manifest
    out["link"], out["live"] = link_state(d, link)
    out["unlinked"] = []
    if not req.get("incoming"):  # reusing a release: nothing to upload into
        return 0, out
    incoming = os.path.join(d, req["incoming"])
    os.makedirs(incoming)
    shas = req.get("shas", {})
    for rel, src in sorted(req.get("links", {}).items()):
        if src.startswith(link + "/") and kind == "dir" and rel in shas:
            got = checked.get(src[len(link) + 1 :])
            if not got or got[0] != shas[rel]:
                out["unlinked"].append(rel)  # the old manifest was wrong: send this file
                continue
        if src.startswith(link + "/") and kind == "dir":  # final/ is releases/<backup>/ now
            src = "releases/%s/%s" % (out["backup"], src[len(link) + 1 :])
        _link(os.path.join(d, src), os.path.join(incoming, rel))
    for rel, src in sorted(req.get("bases", {}).items()):  # rsync's basis for a delta
        with contextlib.suppress(OSError):
            _link(os.path.join(d, src), os.path.join(incoming, rel))
    for rel in req.get("dirs", []):
        os.makedirs(os.path.join(incoming, rel), exist_ok=True)
    return 0, out


def _link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.link(src, dst, follow_symlinks=False)


class Watcher(threading.Thread):
    """Hash (and flush to disk) a file while rsync writes it: rsync writes ``.<name>.XXXXXX``
    sequentially beside the final name and renames it at the end. Whatever does not go that
    way (a retry, another name) is simply hashed again by ``verify``."""

    def __init__(self, path):
        threading.Thread.__init__(self, daemon=True)
        self.path = path
        self.result = None  # (what the file was, its sha256)
        self.stop = threading.Event()

    def _find(self):
        parent, base = os.path.split(self.path)
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                if name.startswith("." + base + "."):
                    return os.open(os.path.join(parent, name), os.O_RDONLY | os.O_NOFOLLOW)
        return None

    def run(self):
        fd = None
        while fd is None and not self.stop.wait(0.01):
            fd = self._find()
        if fd is None:
            return
        try:
            self._follow(fd)
        finally:
            os.close(fd)

    def _follow(self, fd):
        ino, h, pos, synced = os.fstat(fd).st_ino, hashlib.sha256(), 0, 0
        while True:
            size = os.fstat(fd).st_size
            if size > pos:
                data = os.pread(fd, min(size - pos, 4 << 20), pos)
                h.update(data)
                pos += len(data)
                if pos - synced >= 64 << 20:  # start the writeback early, not all at the end
                    os.fdatasync(fd)
                    synced = pos
                continue
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == ino:  # renamed into place: complete
                    os.fsync(fd)
                    self.result = (_identity(os.fstat(fd)), h.hexdigest())
                    return
            if self.stop.wait(0.005):
                return


WATCHES = {}


def cmd_watch(req):
    """Start hashing the given files of an upload while they arrive."""
    incoming = os.path.join(req["remote_dir"], req["incoming"])
    for rel in req["files"]:
        w = Watcher(os.path.join(incoming, rel))
        WATCHES[w.path] = w
        w.start()
    return 0, {"watching": len(req["files"])}


def cmd_tdelta(req):
    """Rebuild files of the upload from tensor deltas that follow the request on stdin, one
    after the other in ``req["files"]`` order ([{"rel", "basis"}], the basis relative to
    ``remote_dir``). Each is written beside its name, hashed while written, fsynced and renamed
    into place only when its sha256 matches the stream's (see :mod:`.tensordelta`). Answers
    {rel: {sha256, identity}} of the files rebuilt, and on the first that fails (exit 1) its
    name and why: the rest of the stream is not read. Runs as its own process only (its input
    is stdin): never through the lock holder."""
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwinds through apply: no temp file left
        signal.signal(sig, tensordelta.exit_on_signal)
    incoming = os.path.join(req["remote_dir"], req["incoming"])
    done = {}
    for f in req["files"]:
        out = os.path.join(incoming, f["rel"])
        t0 = time.monotonic()
        try:
            sha = tensordelta.apply(
                sys.stdin.buffer, os.path.join(req["remote_dir"], f["basis"]), out
            )
        except (tensordelta.DeltaError, OSError) as exc:
            return 1, {"files": done, "failed": f["rel"], "error": str(exc)}
        st = os.stat(out)
        done[f["rel"]] = {
            "sha256": sha,
            "identity": list(_identity(st)),
            "seconds": round(time.monotonic() - t0, 3),
        }
    return 0, {"files": done}


def _received_sha(path, hashed=None):
    """The sha256 of a received file: the one taken while it was written (a tensor delta's
    apply: ``hashed`` = [sha256, identity]; or the watcher's), if it is this very file
    unchanged since, else hashed now."""
    if hashed and list(_identity(os.stat(path))) == list(hashed[1]):
        return hashed[0]
    w = WATCHES.pop(path, None)
    if w is not None:
        w.stop.set()
        w.join(timeout=5)
        if w.result and w.result[0] == _identity(os.stat(path)):  # not touched since
            return w.result[1]
    return hash_file(path)


def _identity(st):
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cmd_verify(req):
    """Hash each received file once (fsyncing it on the way), check the linked ones' sizes;
    all good: index it and rename the upload into releases/."""
    d = req["remote_dir"]
    incoming = os.path.join(d, req["incoming"])
    bad, index = [], {}
    received = set(req["received"])
    hashed = req.get("hashed") or {}  # a tensor delta's apply hashed these as it wrote them
    for rel, (sha, size) in sorted(req["expected"].items()):
        path = os.path.join(incoming, rel)
        try:
            if os.path.islink(path):
                raise OSError("a symlink")
            got_size = os.path.getsize(path)
            got = _received_sha(path, hashed.get(rel)) if rel in received else sha
        except OSError:
            bad.append(rel)
            continue
        if got != sha or got_size != size:
            bad.append(rel)
        index[rel] = [sha, size]
    if bad:
        shutil.rmtree(incoming, ignore_errors=True)
        return 1, {"bad": bad}
    for dirpath, _dirs, _files in os.walk(incoming):
        fsync_path(dirpath)
    _write_index(d, req["release"], index)
    os.makedirs(os.path.join(d, "releases"), exist_ok=True)
    os.rename(incoming, os.path.join(d, "releases", req["release"]))
    fsync_path(os.path.join(d, "releases"))
    return 0, {"release": req["release"]}
