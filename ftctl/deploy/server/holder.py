"""``hold``: the lock holder of one deploy's SSH session.

It takes the lock (finishing first whatever a process that died under it left), answers who
holds it when it cannot, and then serves the client over frames on stdin/stdout:

``hb``       the client's heartbeat (a missed one, or EOF, gives the lock back)
``call``     a subcommand (probe, prepare, watch, verify, ...) run here: no new process per step
``release``  give the lock back and end
``golive``   start the detached go-live with the job, hand it the lock (the same open file, so
             there is no moment without a holder), then relay its progress (the status file)
             and its stderr until it ends
"""

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

from .channel import TIMEOUT
from .commands import COMMANDS, ONE_SHOT
from .fsops import read_log, state_dir
from .lock import Lock, holder, proc_start
from .probe import python_info
from .recovery import finish_dead
from .shared import FINAL_STATES, GOLIVE_OUT, STATUS, frame, frame_bytes

TICK_S = 2.0  # "still working" to the client while a step runs


def with_ticks(chan, fn):
    """``fn()`` on a thread, ticking to the client meanwhile: (result, exception)."""
    done, box = threading.Event(), {}

    def work():
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = exc
        done.set()

    threading.Thread(target=work, daemon=True).start()
    while not done.wait(TICK_S):
        chan.send({"tick": time.time()})
    return box.get("result"), box.get("error")


def hold(chan, program, req):
    d = req["remote_dir"]
    try:
        os.makedirs(d, exist_ok=True)
        state_dir(d)
        lk = Lock.take(d)
    except OSError as exc:
        chan.send({"error": "cannot take %s/.deploy.lock: %s" % (d, exc), "python": python_info()})
        return 1
    if lk is None:
        chan.send({"held": holder(d) or {"owner": "unknown"}, "python": python_info()})
        return 3
    info = dict(req["lock"], pid=os.getpid(), holder="session", server=socket.gethostname())
    info["start"] = proc_start(os.getpid())
    lk.write_owner(info)
    handed = []

    def bye(_signum, _frame):
        if not handed:  # after a hand-over the lock is the go-live's: leave it alone
            lk.release()
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, bye)
    recovered, err = with_ticks(chan, lambda: finish_dead(d, info))
    if err is not None:
        recovered = {"ok": False, "did": "finishing a job that died failed: %r" % err}
    chan.send({"locked": info, "recovered": recovered, "python": python_info()})
    beat = float(req.get("heartbeat", 30))
    while True:
        msg = chan.recv(beat)
        if msg is None or msg is TIMEOUT:  # EOF (the session is gone) or a missed heartbeat
            lk.release()
            return 0 if msg is None else 4
        op = msg.get("op")
        if op == "hb":
            chan.send({"hb": time.time()})
        elif op == "call":
            serve_call(chan, msg["sub"], msg.get("req") or {})
        elif op == "release":
            lk.release()
            chan.send({"released": True})
            return 0
        elif op == "golive":
            return hand_over(chan, program, lk, info, msg["job"], handed)


def serve_call(chan, sub, req):
    """Run a subcommand for the client; tick while it works (the link is alive)."""
    fn = COMMANDS.get(sub)
    if fn is None or sub in ONE_SHOT:
        chan.send({"reply": {"error": "unknown command %s" % sub}, "rc": 2})
        return
    result, err = with_ticks(chan, lambda: fn(req))
    if err is not None:
        chan.send({"reply": {"error": "%s: %s" % (type(err).__name__, err)}, "rc": 1})
    else:
        chan.send({"reply": result[1], "rc": result[0]})


def hand_over(chan, program, lk, info, job, handed):
    """Start the detached go-live with the lock's open file, then follow it."""
    d = job["remote_dir"]
    out_path = os.path.join(state_dir(d), GOLIVE_OUT)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    out_fd = os.open(out_path, flags, 0o600)
    offset = os.fstat(out_fd).st_size
    boot = zipfile.ZipFile(io.BytesIO(program)).read("ftctl_server/boot.py").decode("utf-8")
    sha = hashlib.sha256(program).hexdigest()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", boot, sha, "run", str(lk.fd)],
            stdin=subprocess.PIPE,
            stdout=out_fd,
            stderr=out_fd,
            pass_fds=(lk.fd,),
            start_new_session=True,  # not the SSH session's: it lives on if the client goes
        )
    except OSError as exc:
        chan.send({"error": "cannot start the go-live: %s" % exc})
        lk.release()
        return 1
    finally:
        os.close(out_fd)
    with contextlib.suppress(OSError):  # a go-live that died at once is seen by follow
        proc.stdin.write(frame_bytes(program) + frame(job))
        proc.stdin.close()
    owner = dict(info, holder="golive", pid=proc.pid, start=proc_start(proc.pid))
    with contextlib.suppress(OSError):
        lk.write_owner(owner)
    handed.append(True)
    lk.forget()  # the go-live holds the lock now; our copy goes
    chan.send({"started": proc.pid})
    try:
        return follow(chan, job, proc, out_path, offset)
    except OSError:  # the client went away: the go-live goes on without us
        return 0


def follow(chan, job, proc, out_path, offset):
    """Send each new version of the go-live's status file and relay its stderr until it ends.
    A go-live that ends without a final status (a full disk, a kill) is reported from its line
    in deploys.log, or as dead (the next lock holder finishes its job)."""
    d = job["remote_dir"]
    path = os.path.join(d, ".ftctl", STATUS)
    deadline = time.monotonic() + float(job.get("follow_s", 3600))
    relay = _Relay(out_path, offset)
    last, tick = None, time.monotonic()
    while time.monotonic() < deadline:
        relay.pump()
        ended = proc.poll() is not None
        doc = _status(path, job["run"])
        if doc is not None and doc != last:
            last = doc
            chan.send(doc)
            tick = time.monotonic()
            if doc.get("state") in FINAL_STATES:
                relay.pump()
                return 0
        if ended:
            relay.pump()
            chan.send(_ended(d, job, proc.returncode, last))
            return 0
        if time.monotonic() - tick > TICK_S:
            chan.send({"tick": time.time()})
            tick = time.monotonic()
        time.sleep(0.05)
    chan.send({"timeout": True})
    return 1


def _status(path, run):
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("run") == run else None


def _ended(d, job, code, last):
    """What to tell the client about a go-live that ended without a final status."""
    for entry in reversed(read_log(d, last=50)):
        if entry.get("run") == job["run"]:  # it finished, but could not write its status
            doc = dict(entry, step="done", from_log=True)
            doc.setdefault("state", "ok" if entry.get("ok") else "failed")
            return doc
    how = "killed by signal %d" % -code if code < 0 else "exited %d" % code
    step = (last or {}).get("step", "start")
    return {
        "state": "failed",
        "died": True,
        "run": job["run"],
        "step": step,
        "error": "the go-live %s at step %s without a result" % (how, step),
    }


class _Relay:
    """The go-live's stderr (its output file, from where it started) to this process's stderr,
    which the client shows."""

    def __init__(self, path, offset):
        self.path, self.offset = path, offset

    def pump(self):
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1  # whole lines only
        if cut:
            self.offset += cut
            sys.stderr.write(data[:cut].decode("utf-8", "replace"))
            sys.stderr.flush()
