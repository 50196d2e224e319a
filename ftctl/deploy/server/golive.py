"""The go-live transaction, detached from the SSH session: fsync, swap, restart or reload,
health, smoke; on any failure, exception or signal after the swap, swap back and restart.

It holds the deploy lock for its whole life (the lock holder hands it the very open file),
writes a journal before the swap, and reports through ``.ftctl/status.json``. A go-live that
is killed outright (SIGKILL, OOM, reboot) leaves the journal; :mod:`.recovery` finishes it.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from . import journal
from .fsops import (
    append_log,
    bounded,
    fsync_tree,
    read_json,
    state_dir,
    write_json,
)
from .layout import link_state, prune, swap_link
from .lock import Lock
from .shared import HEALTHY, OUTPUT_MAX, SETTLED, STATUS, UNCHECKED, now_iso, release_tag

SYSTEMCTL_RE = re.compile(
    r"^(?P<prefix>(?:sudo\s+(?:-\S+\s+)*)?\S*systemctl\S*(?:\s+-\S+)*)\s+"
    r"(?:restart|try-restart|reload-or-restart|try-reload-or-restart|reload|start)\s+"
    r"(?P<unit>[\w@.:-]+)\s*$"
)
UNIT_PROPS = ("MainPID", "NRestarts", "ActiveState")


class Failure(Exception):
    """A go-live step failed (the message says which and why)."""


class Interrupted(BaseException):
    """The go-live got a signal (SIGTERM, SIGINT): it swaps back if it had swapped."""


def _interrupt(signum, _frame):
    raise Interrupted("interrupted by %s" % signal.Signals(signum).name)


def why(exc):
    if isinstance(exc, (Failure, Interrupted)):
        return str(exc)
    return "%s: %s" % (type(exc).__name__, exc)


class Status:
    """The status file the client follows (and ``ftctl status`` reads later). While
    ``strict``, a failed write is an error (after the swap: a reason to swap back); once the
    swap back has begun, writes are best effort (the repair must not stop for a full disk)."""

    def __init__(self, remote_dir, job, doc=None):
        self.path = os.path.join(state_dir(remote_dir), STATUS)
        self.strict = True
        self.doc = doc or {
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

    @classmethod
    def resume(cls, remote_dir, job):
        """The status of ``job``'s run as it was left (a fresh one if another run wrote since)."""
        doc = read_json(os.path.join(remote_dir, ".ftctl", STATUS))
        return cls(remote_dir, job, doc if doc and doc.get("run") == job["run"] else None)

    def step(self, name, detail=""):
        self.doc["step"] = name
        t = round(time.monotonic() - self.t0, 2)
        self.doc["steps"].append({"step": name, "t": t, "detail": detail})
        self.write()

    def write(self, **fields):
        self.doc.update(fields)
        self.doc["updated"] = now_iso()
        try:
            write_json(self.path, self.doc)
        except OSError:
            if self.strict:
                raise


# --------------------------------------------------------------------------- commands, checks


def run_shell(cmd, timeout):
    """(exit status, output tail) of a shell command; a timeout is exit 124."""
    try:
        res = subprocess.run(
            cmd,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode("utf-8", "replace")
        return 124, bounded(out + "\n(timed out after %.0fs)" % timeout)
    return res.returncode, bounded((res.stdout or b"").decode("utf-8", "replace").strip())


def http(url, text=None, timeout=5):
    """(status, JSON body or text) of one request; (0, why) when no HTTP answer came (refused,
    timed out, or bytes that are not HTTP)."""
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
    except (OSError, ValueError, HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        return 0, bounded("%s: %s" % (type(exc).__name__, reason), 300)


def unit_of(cmd):
    """(systemctl prefix, unit) for ``systemctl restart X`` and its kin; None for others."""
    m = SYSTEMCTL_RE.match((cmd or "").strip())
    return (m.group("prefix"), m.group("unit")) if m else None


def wait_active(prefix, unit, timeout):
    """``systemctl is-active X`` once the unit has left activating/reloading: (state, command)."""
    check = "%s is-active %s" % (prefix, unit)
    deadline = time.monotonic() + timeout
    while True:
        _rc, out = run_shell(check, 30)
        state = (out.strip().splitlines() or ["unknown"])[-1].strip()
        if state not in ("activating", "reloading", "deactivating"):
            return state, check
        if time.monotonic() > deadline:
            return state, check
        time.sleep(0.2)


def unit_show(prefix, unit):
    """MainPID, NRestarts (absent before systemd 235) and ActiveState of a unit."""
    cmd = "%s show -p %s %s" % (prefix, ",".join(UNIT_PROPS), unit)
    _rc, out = run_shell(cmd, 30)
    props = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in UNIT_PROPS:
            props[key.strip()] = value.strip()
    return cmd, props


def settle(prefix, unit, seconds):
    """Watch the unit for ``seconds``: it must stay active with the same main process and no
    restart (a Type=simple unit is "active" as soon as it forked; one that crash-loops under
    Restart=always stays "active" too: only MainPID and NRestarts show it)."""
    cmd, first = unit_show(prefix, unit)
    deadline = time.monotonic() + seconds
    while True:
        _cmd, now = unit_show(prefix, unit)
        moved = [k for k in ("MainPID", "NRestarts") if now.get(k) != first.get(k)]
        if now.get("ActiveState") != "active" or moved:
            raise Failure(
                "%s did not stay up for %gs: %s"
                % (
                    unit,
                    seconds,
                    ", ".join(
                        "%s %s -> %s" % (k, first.get(k), now.get(k))
                        for k in UNIT_PROPS
                        if now.get(k) != first.get(k) or k == "ActiveState"
                    ),
                )
            )
        left = deadline - time.monotonic()
        if left <= 0:
            return dict(now, command=cmd, seconds=seconds)
        time.sleep(min(0.5, left))


def _reload_failed(before, body):
    """A reload the service reports as failed (so the deploy need not wait out the timeout)."""
    for key in ("reload_failures", "failed_reloads"):
        if isinstance(body.get(key), int) and body[key] > int(before.get(key) or 0):
            return str(body.get("last_reload_error") or "reload failed")
    err = body.get("last_reload_error")
    if err and err != before.get("last_reload_error"):
        return str(err)
    return None


def check_health(job, want=None, tag=None, before=None):
    """One health check: (True, what passed) or (False, why not). ``want``/``tag``: the digest
    (or its first 8 characters) the service must report serving; ``before``: /health before a
    reload (the reload must have happened). A failed reload raises Failure."""
    url, cmd = job.get("health_url"), job.get("health_cmd")
    if cmd:
        rc, out = run_shell(cmd, max(5.0, float(job.get("health_timeout") or 30)))
        if rc == 0:
            return True, "health_cmd exited 0"
        return False, "health_cmd exited %d: %s" % (rc, out[-300:])
    status, raw = http(url)
    body = raw if isinstance(raw, dict) else {}
    sha = str(body.get("sha256") or "")
    serving = not sha or (sha == want if want else (not tag or sha[:8] == tag))
    if isinstance((before or {}).get("reloads"), int):  # the reload must have happened
        serving = serving and int(body.get("reloads") or 0) > before["reloads"]
    if status == 200 and serving:
        return True, "%s answered 200%s" % (url, ", serving " + sha[:8] if sha else "")
    if status == 200 and before is not None:
        failed = _reload_failed(before, body)
        if failed:
            raise Failure("the service reports a failed reload: " + bounded(failed, 300))
    if status == 200:
        return False, "serving %s, expected %s" % (sha[:8], (tag or want or "?")[:8])
    return False, "HTTP %d" % status if status else str(raw or "no answer")


def wait_healthy(job, release, before):
    """("healthy", detail) once the health check passes (serving ``release`` when the service
    reports a digest); Failure on timeout. ``before``: /health before a reload."""
    want = job.get("digest") if job.get("release") == release and job.get("digest") else None
    tag = release_tag(release)
    timeout = float(job["health_timeout"])
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = check_health(job, want, tag, before)
        if ok:
            return HEALTHY, detail
        if time.monotonic() >= deadline:
            raise Failure("service not healthy after %.0fs: %s" % (timeout, detail))
        time.sleep(0.1)


def cmd_health(req):
    """One health check of the live service, as the go-live makes it (the canary wait polls
    this): exit 0 when healthy and serving ``digest`` (when given and reported), else 1."""
    try:
        ok, detail = check_health(req, want=req.get("digest") or None)
    except Failure as exc:
        ok, detail = False, str(exc)
    return (0 if ok else 1), {"healthy": ok, "detail": detail}


def smoke_test(job):
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
        ok = got == want
        results.append({"text": text, "expected": want, "label": got, "ok": ok, "status": status})
    wrong = [r for r in results if not r["ok"]]
    if wrong:
        detail = "; ".join(
            "%r: got %s, want %s" % (r["text"], r["label"], r["expected"]) for r in wrong
        )
        raise Failure("smoke test failed: " + detail)
    return results


REPAIR_TRIES = 3  # a swap back's restart may meet the one it interrupted still under way
REPAIR_PAUSE_S = 3.0


def activate(job, st, release, before, tries=1):
    """Restart or reload, then every check; returns what was checked. Raises Failure. With
    ``tries`` > 1 a failing command is run again after a pause (a swap back, a recovery: the
    service manager may still be busy with the restart that was cut short)."""
    what = "reload" if job.get("reload_cmd") else "restart"
    cmd = job.get("reload_cmd") or job["restart_cmd"]
    for attempt in range(tries):
        st.step(what, cmd if attempt == 0 else "%s (try %d)" % (cmd, attempt + 1))
        rc, out = run_shell(cmd, float(job.get("command_timeout", 600)))
        if rc == 0:
            break
        if attempt + 1 < tries:
            time.sleep(REPAIR_PAUSE_S)
    checks = {"command": cmd, "exit": rc, "output": out}
    if rc != 0:
        raise Failure("%s command exited %d: %s" % (what, rc, bounded(out, 300)))
    unit = unit_of(cmd)
    if unit is not None:
        state, check = wait_active(unit[0], unit[1], float(job["health_timeout"]))
        checks["is_active"] = {"command": check, "state": state}
        if state != "active":
            raise Failure("`%s` says %s after the %s" % (check, state, what))
    st.step("health")
    if job.get("health_url") or job.get("health_cmd"):
        checks["health"], checks["health_detail"] = wait_healthy(job, release, before)
    elif unit is not None and float(job.get("health_settle") or 0) > 0:
        seconds = float(job["health_settle"])
        st.step("settle", "%s for %gs" % (unit[1], seconds))
        checks["settle"] = settle(unit[0], unit[1], seconds)
        checks["health"] = SETTLED
        checks["health_detail"] = "%s kept its process and stayed active for %gs" % (
            unit[1],
            seconds,
        )
    else:
        checks["health"], checks["health_detail"] = UNCHECKED, "no health_url or health_cmd"
    st.step("smoke")
    checks["smoke"] = smoke_test(job)
    return checks


def health_before(job):
    """/health before a reload (its counters tell that the reload happened)."""
    if job.get("reload_cmd") and job.get("health_url"):
        status, body = http(job["health_url"])
        if status == 200 and isinstance(body, dict):
            return body
    return None


# --------------------------------------------------------------------------- the transaction


def go_live(job, st):
    d, link = job["remote_dir"], job["link"]
    release, previous = job["release"], job.get("previous")
    st.step("fsync", "releases/" + release)
    fsync_tree(os.path.join(d, "releases", release))
    before = health_before(job)
    journal.write(d, {"op": "golive", "phase": "swap", "job": job, "pid": os.getpid()})
    try:
        st.step("swap", "%s -> releases/%s" % (link, release))
        swap_link(d, link, "releases/" + release)
        checks = activate(job, st, release, before)
    except BaseException as exc:  # a Failure, a signal, anything: never end on it unchecked
        _quiet_signals()
        if link_state(d, link)[1] != release:  # it never went live: nothing to put back
            return {"state": "failed", "ok": False, "error": why(exc), "nothing_changed": True}
        return swap_back(job, st, previous, why(exc))
    _quiet_signals()  # checked: nothing left worth interrupting
    st.strict = False
    _journal_phase(d, "checked")
    out = {"state": "ok", "ok": True, "checks": checks, "health": checks["health"]}
    if job["action"] == "deploy":
        st.step("retention")
        out["pruned"] = prune(d, job.get("prune", []), {release, previous})
    return out


def swap_back(job, st, previous, reason):
    """Put ``previous`` back and restart it; signals no longer interrupt (this is the repair)."""
    d, link = job["remote_dir"], job["link"]
    _quiet_signals()
    st.strict = False
    out = {"ok": False, "error": reason, "rolled_back": False, "health": None}
    if previous is None:
        out.update(state="rollback_failed", error=reason + "; no previous release to swap back to")
        return out
    _journal_phase(d, "back")
    try:
        st.step("swap back", "%s; %s -> releases/%s" % (reason, link, previous))
        swap_link(d, link, "releases/" + previous)
        checks = activate(dict(job, smoke=[]), st, previous, health_before(job), REPAIR_TRIES)
    except BaseException as exc:
        out.update(
            state="rollback_failed",
            error="%s; swapping back to %s failed too: %s" % (reason, previous, why(exc)),
        )
        return out
    out.update(state="rolled_back", rolled_back=True, checks_after_swap_back=checks)
    out["health"] = checks["health"]
    return out


def _quiet_signals():
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _journal_phase(remote_dir, phase):
    """Move the journal on (best effort: a full disk must not stop a swap back)."""
    j = journal.read(remote_dir)
    if j is not None:
        j["phase"] = phase
        with contextlib.suppress(OSError):
            journal.write(remote_dir, j)


def log_checks(out):
    """What deploys.log keeps of the checks: bounded command output, no smoke bodies."""
    checks = out.get("checks") or out.get("checks_after_swap_back") or {}
    keep = {k: v for k, v in checks.items() if k != "smoke"}
    if "output" in keep:
        keep["output"] = bounded(str(keep["output"]), OUTPUT_MAX)
    if checks.get("smoke"):
        ok = sum(1 for r in checks["smoke"] if r["ok"])
        keep["smoke"] = "%d/%d ok" % (ok, len(checks["smoke"]))
    return keep


def finish(job, st, out, seconds, extra=None):
    """One line in deploys.log, the final status, the journal removed (best effort each: the
    journal goes last, so a failure before it leaves the job to the next lock holder)."""
    d = job["remote_dir"]
    entry = dict(job.get("log") or {})
    entry.update(
        time=now_iso(),
        id=job["id"],
        run=job["run"],
        action=job["action"],
        ok=out.get("ok", False),
        state=out.get("state"),
        release=job["release"],
        previous=job.get("previous"),
        rolled_back=out.get("rolled_back", False),
        health=out.get("health"),
        error=out.get("error"),
        checks=log_checks(out),
        pruned=out.get("pruned", []),
        seconds=round(float(entry.get("seconds", 0)) + seconds, 2),
    )
    entry.update(extra or {})
    st.strict = False
    try:
        append_log(d, entry)
    except OSError as exc:
        out["log_error"] = why(exc)
    st.write(step="done", log=entry, **out)
    journal.clear(d)
    return entry


def run_detached(chan, lock_fd):
    """The go-live: the job comes as the frame after the program; the lock is ``lock_fd``."""
    os.set_inheritable(lock_fd, False)  # the service a restart starts must not hold it
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    for sig in (signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    job = chan.recv()
    if not isinstance(job, dict) or "run" not in job:
        return 2  # the holder died before it sent the job: nothing was done
    t0 = time.monotonic()
    st = Status(job["remote_dir"], job)
    try:
        journal.write(job["remote_dir"], {"op": "golive", "phase": "start", "job": job})
        st.write()
        out = go_live(job, st)
    except BaseException as exc:  # before the swap (go_live handles everything after it)
        _quiet_signals()
        out = {"state": "failed", "ok": False, "error": why(exc), "nothing_changed": True}
    finish(job, st, out, time.monotonic() - t0)
    Lock(job["remote_dir"], lock_fd).release()  # exiting would do it too; this is sooner
    return 0
