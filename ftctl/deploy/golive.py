"""The server side of a deploy: one program that runs ON THE SERVER with its own ``python3``.

Standard library only (the server has python3, not ftctl). The client copies this file to
``<remote_dir>/.ftctl/golive-<sha8>.py`` and runs its subcommands:

``probe``    what is there (link, releases, lock, tools, file index, sampled blocks);
             changes nothing
``hold``     take ``.deploy.lock`` and hold it while the client's SSH session lives: a heartbeat
             line every few seconds keeps it, EOF or a missed heartbeat releases it; the line
             ``golive JOB`` hands the lock to a detached ``run`` (below) and exits
``prepare``  under the lock: clean old uploads, back up a real ``final/`` (no moment without
             ``final``), make ``.incoming-<id>/`` with hard links of the unchanged files
``verify``   hash each received file once (and fsync it), then rename the upload into releases/
``run``      the go-live transaction, detached from SSH: fsync, swap, restart or reload, health,
             smoke, swap back + restart on failure, retention, ``deploys.log``, unlock; progress in
             ``.ftctl/status.json``
``follow``   print each new version of the status file (one JSON line) until the run ends

What was live before and what retention removes are decided by the client
(:mod:`ftctl.deploy.history`) from the probe's answer and passed in the job.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

LOCK = ".deploy.lock"
LOG = "deploys.log"
STATE_DIR = ".ftctl"
STATUS = "status.json"
OUTPUT_MAX = 2000  # characters of a command's output kept in deploys.log / the status file
LEGACY_STALE_S = 3600.0  # a lock without a holder pid (an older ftctl) is stale after this
FINAL_STATES = ("ok", "rolled_back", "rollback_failed", "failed")
RELEASE_RE = re.compile(r"^\d{14}-(?P<tag>[0-9a-f]{8}|original)$")
SYSTEMCTL_RE = re.compile(
    r"^(?P<prefix>(?:sudo\s+(?:-\S+\s+)*)?\S*systemctl\S*(?:\s+-\S+)*)\s+"
    r"(?:restart|try-restart|reload-or-restart|try-reload-or-restart|reload|start)\s+"
    r"(?P<unit>[\w@.:-]+)\s*$"
)
SAMPLE_BLOCK = 1 << 16


# --------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def bounded(text: str, limit: int = OUTPUT_MAX) -> str:
    """The end of ``text``, at most ``limit`` characters (marked when cut)."""
    text = text or ""
    return text if len(text) <= limit else "[...cut...]" + text[-limit:]


_EMIT = threading.Lock()


def emit(obj: dict) -> None:
    line = json.dumps(obj, ensure_ascii=False) + "\n"
    with _EMIT:
        sys.stdout.write(line)
        sys.stdout.flush()


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fsync_tree(root: str) -> None:
    """Every file and directory of ``root`` on disk (a no-op for what already is)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def release_tag(name: str | None) -> str | None:
    m = RELEASE_RE.match(name or "")
    return m["tag"] if m and m["tag"] != "original" else None


def release_key(name: str) -> tuple[str, int, str]:
    """Release order: by time; a <ts>-original backup sorts before a release of the same second."""
    return (name[:14], 0 if name.endswith("-original") else 1, name)


def utc_stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live holder from a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_alive(lock: dict) -> bool | None:
    """True/False for a lock taken by this program on this host; None when it cannot tell."""
    pid, start = lock.get("pid"), lock.get("start")
    if not isinstance(pid, int) or not start or lock.get("server") != socket.gethostname():
        return None
    return proc_start(pid) == start


# --------------------------------------------------------------------------- history


def read_log(remote_dir: str) -> list[dict]:
    """Every JSON line of deploys.log (unreadable lines skipped), oldest first."""
    out = []
    with contextlib.suppress(OSError), open(os.path.join(remote_dir, LOG), encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
    return out


# --------------------------------------------------------------------------- state


def link_state(remote_dir: str, link: str) -> tuple[str, str | None]:
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


def list_releases(remote_dir: str) -> list[str]:
    d = os.path.join(remote_dir, "releases")
    with contextlib.suppress(OSError):
        return sorted(
            (n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))), key=release_key
        )
    return []


def read_lock(remote_dir: str) -> dict | None:
    try:
        with open(os.path.join(remote_dir, LOCK), encoding="utf-8") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        lock = json.loads(raw)
        return lock if isinstance(lock, dict) else {"raw": raw.strip()}
    except ValueError:
        return {"raw": raw.strip()}


def index_path(remote_dir: str, release: str) -> str:
    return os.path.join(remote_dir, STATE_DIR, "index", release + ".json")


def release_index(remote_dir: str, release: str) -> dict[str, list]:
    """{relpath: [sha256, size]} of a release: the index written when it was verified, else
    its manifest.json's ``files`` map (sizes read from disk)."""
    with contextlib.suppress(OSError, ValueError), open(index_path(remote_dir, release)) as fh:
        return json.load(fh)
    return manifest_index(os.path.join(remote_dir, "releases", release))


def manifest_index(root: str) -> dict[str, list]:
    """{relpath: [sha256, size]} from the manifest.json of a model directory (empty without)."""
    out: dict[str, list] = {}
    with contextlib.suppress(OSError, ValueError), open(os.path.join(root, "manifest.json")) as fh:
        files = json.load(fh).get("files") or {}
        for rel, sha in files.items():
            with contextlib.suppress(OSError):
                out[rel] = [sha, os.path.getsize(os.path.join(root, rel))]
    return out


def sample_hashes(path: str, size: int, count: int) -> list[str | None]:
    """sha1 of ``count`` blocks at fixed offsets spread over a file of ``size`` bytes (the client
    hashes the same offsets of its file: equal hashes mean equal bytes at the same place)."""
    out: list[str | None] = []
    try:
        with open(path, "rb") as fh:
            for off in sample_offsets(size, count):
                fh.seek(off)
                out.append(hashlib.sha1(fh.read(SAMPLE_BLOCK)).hexdigest())
    except OSError:
        return [None] * count
    return out


def sample_offsets(size: int, count: int) -> list[int]:
    if size <= SAMPLE_BLOCK or count <= 1:
        return [0]
    step = (size - SAMPLE_BLOCK) / (count - 1)
    return [int(i * step) for i in range(count)]


def cmd_probe(req: dict) -> tuple[int, dict]:
    """Everything the client needs to plan, in one answer. Changes nothing."""
    d, link = req["remote_dir"], req["link"]
    tools = req.get("tools", [])
    st: dict = {"lock": read_lock(d) if os.path.isdir(d) else None}
    st["link"], st["live"] = link_state(d, link) if os.path.isdir(d) else ("missing", None)
    st["releases"] = list_releases(d)
    st["missing_tools"] = [t for t in tools if shutil.which(t) is None]
    st["has_rsync"] = shutil.which("rsync") is not None
    probe_dir = d
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    fs = os.statvfs(probe_dir)
    st["free_bytes"] = fs.f_bavail * fs.f_frsize
    st["index"] = {r: release_index(d, r) for r in st["releases"]}
    if st["link"] == "dir":
        st["final_index"] = manifest_index(os.path.join(d, link))
    keys = ("action", "ok", "release", "previous", "rolled_back")
    st["log"] = [{k: e.get(k) for k in keys} for e in read_log(d)[-500:]]
    basis = st["live"] or (st["releases"][-1] if st["releases"] else None)
    if st["link"] == "dir":  # first deploy: the real final/ is the basis
        basis_root = os.path.join(d, link)
    else:
        basis_root = os.path.join(d, "releases", basis) if basis else None
    st["samples"] = {}
    for rel, size in (req.get("sample") or {}).items():
        path = os.path.join(basis_root, rel) if basis_root else ""
        if basis_root and os.path.isfile(path):
            st["samples"][rel] = {
                "size": os.path.getsize(path),
                "hashes": sample_hashes(path, size, req.get("sample_count", 32)),
            }
    return 0, st


# --------------------------------------------------------------------------- the lock


def take_lock(remote_dir: str, info: dict) -> tuple[dict | None, dict | None]:
    """Create the lock (O_EXCL). Returns (the lock held by someone else, a dead lock broken)."""
    path = os.path.join(remote_dir, LOCK)
    broke = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_lock(remote_dir) or {}
            if holder_alive(held) is not False:
                return held, broke
            # its holder is provably gone (same server, pid dead or reused): break it; the
            # rename lets only one of two racing deploys do that
            aside = f"{path}.dead-{os.getpid()}"
            with contextlib.suppress(OSError):
                os.rename(path, aside)
                os.unlink(aside)
                broke = held
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(info) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return None, broke
    return read_lock(remote_dir) or {}, broke


def release_lock(remote_dir: str, token: str) -> bool:
    lock = read_lock(remote_dir)
    if lock and lock.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(remote_dir, LOCK))
        return True
    return False


def _read_lines(fd: int, buf: bytearray, timeout: float) -> list[str] | None:
    """Lines from ``fd`` within ``timeout`` ([] on timeout, None on EOF)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return []
    chunk = os.read(fd, 4096)
    if not chunk:
        return None
    buf.extend(chunk)
    lines = []
    while b"\n" in buf:
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        lines.append(line.decode("utf-8", "replace").strip())
    return lines


def cmd_hold(req: dict) -> int:
    """Hold the lock for the client's SSH session (see the module docstring)."""
    d = req["remote_dir"]
    os.makedirs(os.path.join(d, STATE_DIR), exist_ok=True)
    info = dict(req["lock"])
    info.update(pid=os.getpid(), start=proc_start(os.getpid()), server=socket.gethostname())
    info["holder"] = "session"
    held, broke = take_lock(d, info)
    if held is not None:
        age = None
        with contextlib.suppress(TypeError, ValueError, KeyError):
            since = datetime.datetime.fromisoformat(held["time"])
            age = time.time() - since.timestamp()
        stale = holder_alive(held) is None and age is not None and age > LEGACY_STALE_S
        emit({"held": held, "stale": stale, "age": age})
        return 3
    token = info["token"]

    def bye(*_):
        release_lock(d, token)
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, bye)
    emit({"locked": info, "broke": broke})
    buf = bytearray()
    beat = float(req.get("heartbeat", 30))
    while True:
        lines = _read_lines(0, buf, beat)
        if lines is None or lines == []:  # EOF (the session is gone) or a missed heartbeat
            release_lock(d, token)
            return 0 if lines is None else 4
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "hb":
                emit({"hb": time.time()})
            elif word == "call":  # a subcommand, run here: no new process per step
                sub, _, arg = rest.partition(" ")
                _serve_call(sub, json.loads(arg))
            elif word == "release":
                release_lock(d, token)
                emit({"released": True})
                return 0
            elif word == "golive":
                job = json.loads(rest)
                if _hand_over(d, token, job) != 0:
                    return 1
                return cmd_follow({"remote_dir": d, "run": job["run"], "timeout": job["follow_s"]})


def _serve_call(sub: str, req: dict) -> None:
    """Run a subcommand for the client; tick every 2 s while it works (the link is alive)."""
    done = threading.Event()
    result: dict = {}

    def work() -> None:
        try:
            result["rc"], result["reply"] = HANDLERS[sub](req)
        except Exception as exc:  # reported to the client, which raises a DeployError
            result["rc"], result["reply"] = 1, {"error": f"{type(exc).__name__}: {exc}"}
        done.set()

    threading.Thread(target=work, daemon=True).start()
    while not done.wait(2.0):
        emit({"tick": time.time()})
    emit({"reply": result["reply"], "rc": result["rc"]})


def _hand_over(remote_dir: str, token: str, job: dict) -> int:
    """Start the detached go-live and wait until it holds the lock (or died without it)."""
    state = os.path.join(remote_dir, STATE_DIR)
    job_file = os.path.join(state, f"job-{job['run']}.json")
    atomic_write(job_file, json.dumps(job, ensure_ascii=False))
    with open(os.path.join(state, "golive.out"), "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "run", job_file],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # not the SSH session's: it lives on if the client goes
            close_fds=True,
        )
    while True:
        lock = read_lock(remote_dir) or {}
        if lock.get("token") == token and lock.get("holder") == "golive":
            emit({"started": proc.pid})
            return 0
        if proc.poll() is not None:
            release_lock(remote_dir, token)
            emit({"error": f"the go-live program exited {proc.returncode} before it started"})
            return 1
        time.sleep(0.02)


# --------------------------------------------------------------------------- prepare / verify


def swap_link(remote_dir: str, link: str, target: str) -> None:
    """Point ``link`` at ``target`` with one rename (atomic for readers)."""
    tmp = os.path.join(remote_dir, f".{link}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, os.path.join(remote_dir, link))
    fsync_path(remote_dir)


def _exchange(a: str, b: str) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two names in one step (Linux >= 3.15)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0


def hash_file(path: str, fsync: bool = True) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def backup_original(remote_dir: str, link: str, hash_rels: set[str]) -> dict:
    """A real ``final/`` becomes ``releases/<ts>-original/`` and ``final`` a link to it, with no
    moment where ``final`` is missing: a hard-linked copy, then one exchange of the two names.
    The files in ``hash_rels`` (those a new release would link) are hashed, once, for its index."""
    name = f"{utc_stamp()}-original"
    final = os.path.join(remote_dir, link)
    rel_dir = os.path.join(remote_dir, "releases")
    os.makedirs(rel_dir, exist_ok=True)
    dest = os.path.join(rel_dir, name)
    subprocess.run(["cp", "-al", "--", final, dest], check=True, capture_output=True)
    files = {}
    for rel in sorted(hash_rels):
        p = os.path.join(dest, rel)
        if os.path.isfile(p):
            files[rel] = [hash_file(p, fsync=False), os.path.getsize(p)]
    os.makedirs(os.path.dirname(index_path(remote_dir, name)), exist_ok=True)
    atomic_write(index_path(remote_dir, name), json.dumps(files))
    tmp = os.path.join(remote_dir, f".{link}.tmp-{os.getpid()}")
    os.symlink(f"releases/{name}", tmp)
    atomic = _exchange(tmp, final)
    if atomic:
        shutil.rmtree(tmp)  # the old directory, now under the temporary name (links only)
    else:  # no renameat2 here: the classic way, a moment without final
        shutil.rmtree(final)
        os.replace(tmp, final)
    fsync_path(remote_dir)
    return {"backup": name, "atomic": atomic}


def cmd_prepare(req: dict) -> tuple[int, dict]:
    """Under the lock: clean leftovers, back up a real final/, make the upload directory with
    hard links of the unchanged files (and the bases of the delta transfers)."""
    d, link = req["remote_dir"], req["link"]
    out: dict = {"backup": None}
    for name in os.listdir(d):
        if name.startswith(".incoming-"):
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    kind, _live = link_state(d, link)
    checked: dict[str, list] = {}
    if kind == "dir":
        links = req.get("links", {}).values()
        from_final = {src[len(link) + 1 :] for src in links if src.startswith(link + "/")}
        out.update(backup_original(d, link, from_final))
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
        dst = os.path.join(incoming, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(os.path.join(d, src), dst)
    for rel, src in sorted(req.get("bases", {}).items()):  # rsync's basis for a delta
        dst = os.path.join(incoming, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with contextlib.suppress(OSError):
            os.link(os.path.join(d, src), dst)
    for rel in req.get("dirs", []):
        os.makedirs(os.path.join(incoming, rel), exist_ok=True)
    out["link"], out["live"] = link_state(d, link)
    return 0, out


class Watcher(threading.Thread):
    """Hash (and flush to disk) a file while rsync writes it: rsync writes ``.<name>.XXXXXX``
    sequentially beside the final name and renames it at the end. Whatever does not go that
    way (a retry, another name) is simply hashed again by ``verify``."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.result: tuple[tuple, str] | None = None  # (what the file was, its sha256)
        self.stop = threading.Event()

    def _find(self) -> int | None:
        parent, base = os.path.split(self.path)
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                if name.startswith(f".{base}."):
                    return os.open(os.path.join(parent, name), os.O_RDONLY)
        return None

    def run(self) -> None:
        fd = None
        while fd is None and not self.stop.wait(0.01):
            fd = self._find()
        if fd is None:
            return
        try:
            self._follow(fd)
        finally:
            os.close(fd)

    def _follow(self, fd: int) -> None:
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


WATCHES: dict[str, Watcher] = {}


def cmd_watch(req: dict) -> tuple[int, dict]:
    """Start hashing the given files of an upload while they arrive."""
    incoming = os.path.join(req["remote_dir"], req["incoming"])
    for rel in req["files"]:
        w = Watcher(os.path.join(incoming, rel))
        WATCHES[w.path] = w
        w.start()
    return 0, {"watching": len(req["files"])}


def _received_sha(path: str) -> str:
    """The sha256 of a received file: the watcher's, if it saw this very file, else now."""
    w = WATCHES.pop(path, None)
    if w is not None:
        w.stop.set()
        w.join(timeout=5)
        if w.result and w.result[0] == _identity(os.stat(path)):  # not touched since
            return w.result[1]
    return hash_file(path)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cmd_verify(req: dict) -> tuple[int, dict]:
    """Hash each received file once (fsyncing it on the way), check the linked ones' sizes;
    all good: index it and rename the upload into releases/."""
    d = req["remote_dir"]
    incoming = os.path.join(d, req["incoming"])
    bad, index = [], {}
    for rel, (sha, size) in sorted(req["expected"].items()):
        path = os.path.join(incoming, rel)
        try:
            got_size = os.path.getsize(path)
            got = _received_sha(path) if rel in req["received"] else sha
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
    os.makedirs(os.path.dirname(index_path(d, req["release"])), exist_ok=True)
    atomic_write(index_path(d, req["release"]), json.dumps(index))
    os.makedirs(os.path.join(d, "releases"), exist_ok=True)
    os.rename(incoming, os.path.join(d, "releases", req["release"]))
    fsync_path(os.path.join(d, "releases"))
    return 0, {"release": req["release"]}


# --------------------------------------------------------------------------- the go-live


class Failure(Exception):
    """A go-live step failed (the message says which and why)."""


class Status:
    """The status file the client follows (and ``ftctl status`` reads later)."""

    def __init__(self, remote_dir: str, job: dict) -> None:
        self.path = os.path.join(remote_dir, STATE_DIR, STATUS)
        self.doc = {
            "id": job["id"],
            "run": job["run"],
            "action": job["action"],
            "host": job.get("host"),
            "release": job["release"],
            "previous": job.get("previous"),
            "state": "running",
            "step": "start",
            "steps": [],
            "pid": os.getpid(),
            "started": now_iso(),
        }
        self.t0 = time.monotonic()

    def step(self, name: str, detail: str = "") -> None:
        self.doc["step"] = name
        self.doc["steps"].append(
            {"step": name, "t": round(time.monotonic() - self.t0, 2), "detail": detail}
        )
        self.write()

    def write(self, **fields) -> None:
        self.doc.update(fields, updated=now_iso())
        atomic_write(self.path, json.dumps(self.doc, ensure_ascii=False))


def run_shell(cmd: str, timeout: float) -> tuple[int, str]:
    """(exit status, output tail) of a shell command; a timeout is exit 124."""
    try:
        res = subprocess.run(
            cmd, shell=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return 124, bounded(out.decode("utf-8", "replace") + f"\n(timed out after {timeout:.0f}s)")
    out = (res.stdout or b"") + (res.stderr or b"")
    return res.returncode, bounded(out.decode("utf-8", "replace").strip())


def http(url: str, text: str | None = None, timeout: float = 5) -> tuple[int, object]:
    data = None if text is None else json.dumps({"text": text}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode("utf-8", "replace")
            try:
                return r.status, json.loads(raw or "null")
            except ValueError:
                return r.status, raw[:200]
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError) as exc:
        return 0, str(getattr(exc, "reason", exc))


def systemd_check(cmd: str, timeout: float) -> tuple[str, str] | None:
    """For ``systemctl restart X`` (or reload, ...): ``systemctl is-active X`` once the unit has
    settled. None for other commands; else (state, the command run)."""
    m = SYSTEMCTL_RE.match(cmd.strip())
    if not m:
        return None
    check = f"{m['prefix']} is-active {m['unit']}"
    deadline = time.monotonic() + timeout
    while True:
        _rc, out = run_shell(check, 30)
        state = (out.strip().splitlines() or ["unknown"])[-1].strip()
        if state not in ("activating", "reloading", "deactivating") or time.monotonic() > deadline:
            return state, check
        time.sleep(0.2)


def _reload_failed(before: dict, body: dict) -> str | None:
    """A reload the service reports as failed (so the deploy need not wait out the timeout)."""
    for key in ("reload_failures", "failed_reloads"):
        if isinstance(body.get(key), int) and body[key] > int(before.get(key) or 0):
            return str(body.get("last_reload_error") or "reload failed")
    err = body.get("last_reload_error")
    if err and err != before.get("last_reload_error"):
        return str(err)
    return None


def wait_healthy(job: dict, release: str, before: dict | None) -> tuple[str, str]:
    """("healthy", detail) once the health check passes (serving ``release`` when the service
    reports a digest); ("unchecked", why) when nothing is configured; Failure on timeout."""
    url, cmd = job.get("health_url"), job.get("health_cmd")
    if not url and not cmd:
        return "unchecked", "no health_url or health_cmd"
    want = job.get("digest") if job.get("release") == release and job.get("digest") else None
    tag = release_tag(release)
    deadline = time.monotonic() + float(job["health_timeout"])
    last = ""
    while True:
        if cmd:
            rc, out = run_shell(cmd, max(5.0, float(job["health_timeout"])))
            if rc == 0:
                return "healthy", "health_cmd exited 0"
            last = f"health_cmd exited {rc}: {out[-300:]}"
        else:
            status, raw = http(url)
            body = raw if isinstance(raw, dict) else {}
            sha = str(body.get("sha256") or "")
            serving = not sha or (sha == want if want else (not tag or sha[:8] == tag))
            if isinstance((before or {}).get("reloads"), int):  # the reload must have happened
                serving = serving and int(body.get("reloads") or 0) > before["reloads"]
            if status == 200 and serving:
                return "healthy", f"{url} answered 200" + (f", serving {sha[:8]}" if sha else "")
            if status == 200 and before is not None:
                failed = _reload_failed(before, body)
                if failed:
                    raise Failure(f"the service reports a failed reload: {bounded(failed, 300)}")
            last = (
                f"serving {sha[:8]}, expected {tag or want}"
                if status == 200
                else (f"HTTP {status}" if status else str(raw or "no answer"))
            )
        if time.monotonic() >= deadline:
            raise Failure(f"service not healthy after {float(job['health_timeout']):.0f}s: {last}")
        time.sleep(0.1)


def smoke_test(job: dict) -> list[dict]:
    cases = job.get("smoke") or []
    if not cases:
        return []
    url = job.get("predict_url")
    if not url:
        raise Failure("smoke cases need predict_url or health_url")
    results = []
    for text, want in cases:
        status, body = http(url, text, timeout=30)
        got = body.get("label") if isinstance(body, dict) else None
        results.append(
            {"text": text, "expected": want, "label": got, "ok": got == want, "status": status}
        )
    wrong = [r for r in results if not r["ok"]]
    if wrong:
        detail = "; ".join(f"{r['text']!r}: got {r['label']}, want {r['expected']}" for r in wrong)
        raise Failure(f"smoke test failed: {detail}")
    return results


def activate(job: dict, st: Status, release: str, before: dict | None) -> dict:
    """Restart or reload, then every check; returns what was checked. Raises Failure."""
    what = "reload" if job.get("reload_cmd") else "restart"
    cmd = job.get("reload_cmd") or job["restart_cmd"]
    st.step(what, cmd)
    rc, out = run_shell(cmd, float(job.get("command_timeout", 600)))
    checks = {"command": cmd, "exit": rc, "output": out}
    if rc != 0:
        raise Failure(f"{what} command exited {rc}: {bounded(out, 300)}")
    unit = systemd_check(cmd, float(job["health_timeout"]))
    if unit is not None:
        checks["is_active"] = {"command": unit[1], "state": unit[0]}
        if unit[0] != "active":
            raise Failure(f"`{unit[1]}` says {unit[0]} after the {what}")
    st.step("health")
    checks["health"], checks["health_detail"] = wait_healthy(job, release, before)
    st.step("smoke")
    checks["smoke"] = smoke_test(job)
    return checks


def _health_before(job: dict) -> dict | None:
    if job.get("reload_cmd") and job.get("health_url"):
        status, body = http(job["health_url"])
        if status == 200 and isinstance(body, dict):
            return body
    return None


def go_live(job: dict, st: Status) -> dict:
    d, link = job["remote_dir"], job["link"]
    release, previous = job["release"], job.get("previous")
    st.step("fsync", f"releases/{release}")
    fsync_tree(os.path.join(d, "releases", release))
    before = _health_before(job)
    st.step("swap", f"{link} -> releases/{release}")
    swap_link(d, link, f"releases/{release}")
    try:
        checks = activate(job, st, release, before)
    except Failure as exc:
        return _swap_back(job, st, previous, str(exc))
    out = {"state": "ok", "ok": True, "checks": checks, "health": checks["health"]}
    if job["action"] == "deploy":
        st.step("retention")
        out["pruned"] = prune(d, job.get("prune", []), {release, previous})
    return out


def _swap_back(job: dict, st: Status, previous: str | None, why: str) -> dict:
    d, link = job["remote_dir"], job["link"]
    out = {"ok": False, "error": why, "rolled_back": False, "health": None}
    if previous is None:
        return {
            **out,
            "state": "rollback_failed",
            "error": f"{why}; no previous release to swap back to",
        }
    st.step("swap back", f"{why}; {link} -> releases/{previous}")
    try:
        swap_link(d, link, f"releases/{previous}")
        checks = activate({**job, "smoke": []}, st, previous, _health_before(job))
    except (Failure, OSError) as exc:
        return {
            **out,
            "state": "rollback_failed",
            "error": f"{why}; swapping back to {previous} failed too: {exc}",
        }
    return {**out, "state": "rolled_back", "rolled_back": True, "checks_after_swap_back": checks}


def prune(remote_dir: str, names: list[str], keep: set) -> list[str]:
    """Remove the releases the client chose (never the live one, the previous or a backup)."""
    doomed = [n for n in names if n not in keep and not n.endswith("-original")]
    for name in doomed:
        shutil.rmtree(os.path.join(remote_dir, "releases", name), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(index_path(remote_dir, name))
    return doomed


def append_log(remote_dir: str, entry: dict) -> None:
    line = json.dumps(entry, ensure_ascii=False, default=str) + "\n"
    fd = os.open(os.path.join(remote_dir, LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_run(job_file: str) -> int:
    """The go-live transaction (detached from the SSH session)."""
    with open(job_file, encoding="utf-8") as fh:
        job = json.load(fh)
    d = job["remote_dir"]
    lock = read_lock(d) or {}
    if lock.get("token") != job["token"]:
        return 2  # not ours: the holder reports it
    lock.update(holder="golive", pid=os.getpid(), start=proc_start(os.getpid()))
    atomic_write(os.path.join(d, LOCK), json.dumps(lock) + "\n")
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    st = Status(d, job)
    t0 = time.monotonic()
    try:
        out = go_live(job, st)
    except Exception as exc:  # an unexpected error must still log and unlock
        out = {"state": "failed", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    entry = dict(job.get("log") or {})
    entry.update(
        time=now_iso(),
        id=job["id"],
        action=job["action"],
        ok=out.get("ok", False),
        release=job["release"],
        previous=job.get("previous"),
        rolled_back=out.get("rolled_back", False),
        health=out.get("health"),
        error=out.get("error"),
        checks=_log_checks(out),
        pruned=out.get("pruned", []),
        seconds=round(float(entry.get("seconds", 0)) + time.monotonic() - t0, 2),
    )
    with contextlib.suppress(OSError):
        append_log(d, entry)
    release_lock(d, job["token"])
    st.write(**out, step="done", log=entry)
    with contextlib.suppress(OSError):
        os.unlink(job_file)
    return 0


def _log_checks(out: dict) -> dict:
    """What deploys.log keeps of the checks: bounded command output, no smoke bodies."""
    checks = out.get("checks") or out.get("checks_after_swap_back") or {}
    keep = {k: v for k, v in checks.items() if k != "smoke"}
    if "output" in keep:
        keep["output"] = bounded(str(keep["output"]), OUTPUT_MAX)
    if checks.get("smoke"):
        keep["smoke"] = f"{sum(r['ok'] for r in checks['smoke'])}/{len(checks['smoke'])} ok"
    return keep


def cmd_follow(req: dict) -> int:
    """Print the status file each time it changes (and a tick every 2 s) until the go-live
    ``run`` ends or ``timeout`` passes."""
    path = os.path.join(req["remote_dir"], STATE_DIR, STATUS)
    deadline = time.monotonic() + float(req.get("timeout", 3600))
    last, tick = None, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as fh:
                raw = fh.read()
            if raw != last:
                last = raw
                doc = json.loads(raw)
                if req.get("run") in (None, doc.get("run")):
                    emit(doc)
                    if doc.get("state") in FINAL_STATES:
                        return 0
                    tick = time.monotonic()
        if time.monotonic() - tick > 2:
            lock = read_lock(req["remote_dir"]) or {}
            if lock.get("holder") == "golive" and holder_alive(lock) is False:
                emit({"state": "failed", "error": "the go-live died; see .ftctl/golive.out"})
                return 1
            emit({"tick": time.time()})
            tick = time.monotonic()
        time.sleep(0.05)
    emit({"timeout": True})
    return 1


HANDLERS = {"probe": cmd_probe, "prepare": cmd_prepare, "verify": cmd_verify, "watch": cmd_watch}


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "run":
        return cmd_run(args[0])
    req = json.loads(args[0]) if args else {}
    if cmd == "hold":
        return cmd_hold(req)
    if cmd == "follow":
        return cmd_follow(req)
    if cmd not in HANDLERS:
        sys.stderr.write(f"unknown command {cmd}\n")
        return 2
    rc, out = HANDLERS[cmd](req)
    emit(out)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
