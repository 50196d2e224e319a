"""Looking at the server: ``probe`` (what the client plans from), ``status`` (how the last
go-live ended; finishes one that died), ``log`` (a line in deploys.log for the client)."""

import os
import shutil
import sys

from . import journal
from .fsops import append_log, bounded, read_json, read_log
from .layout import link_state, list_releases, manifest_index, release_index
from .lock import Lock, holder, proc_start
from .recovery import finish_dead
from .shared import STATE_DIR, STATUS, sample_hashes


def python_info():
    """The interpreter this program runs on (``remote_python`` on the client's side)."""
    return {"path": sys.executable, "version": "%d.%d.%d" % tuple(sys.version_info[:3])}


def cmd_probe(req):
    """Everything the client needs to plan, in one answer. Changes nothing."""
    d, link = req["remote_dir"], req["link"]
    there = os.path.isdir(d)
    st = {"python": python_info(), "lock": holder(d, wait=0.5) if there else None}
    st["link"], st["live"] = link_state(d, link) if there else ("missing", None)
    st["releases"] = list_releases(d)
    st["missing_tools"] = [t for t in req.get("tools", []) if shutil.which(t) is None]
    st["has_rsync"] = shutil.which("rsync") is not None
    probe_dir = d
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    fs = os.statvfs(probe_dir)
    st["free_bytes"] = fs.f_bavail * fs.f_frsize
    st["index"] = {r: release_index(d, r) for r in st["releases"]}
    # what each release's manifest says (the index of a first deploy's backup holds only the
    # files it hashed): a tensor delta may use these as its basis, checked as it reads them
    st["claims"] = {r: manifest_index(os.path.join(d, "releases", r)) for r in st["releases"]}
    if st["link"] == "dir":
        st["final_index"] = manifest_index(os.path.join(d, link))
    keys = ("action", "ok", "release", "previous", "rolled_back")
    st["log"] = [{k: e.get(k) for k in keys} for e in read_log(d, last=500)]
    st["pending"] = there and journal.read(d) is not None  # a job that died, to finish
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


def cmd_status(req):
    """The last go-live's status file, the lock, the newest lines of deploys.log. A job that
    died under the lock (its journal is there, nobody holds the lock) is finished first."""
    d, link = req["remote_dir"], req["link"]
    out = {"python": python_info(), "recovered": None}
    if os.path.isdir(d) and journal.read(d) is not None:
        lk = Lock.take(d, wait=0)
        if lk is not None:
            who = dict(req.get("lock") or {}, holder="status", pid=os.getpid())
            who["start"] = proc_start(os.getpid())
            try:
                lk.write_owner(who)
                out["recovered"] = finish_dead(d, who)
            finally:
                lk.release()
    out["link"], out["live"] = link_state(d, link) if os.path.isdir(d) else ("missing", None)
    out["lock"] = holder(d, wait=0.5) if os.path.isdir(d) else None
    out["status"] = read_json(os.path.join(d, STATE_DIR, STATUS))
    out["log"] = read_log(d, last=int(req.get("entries", 5)))
    return 0, out


def cmd_log(req):
    """Append the client's line (a deploy that failed before its go-live) to deploys.log."""
    entry = dict(req["entry"])
    entry["error"] = bounded(str(entry.get("error") or ""), 500) or None
    os.makedirs(req["remote_dir"], exist_ok=True)
    append_log(req["remote_dir"], entry)
    return 0, {"logged": True}
