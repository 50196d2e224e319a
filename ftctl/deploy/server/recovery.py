"""Finish what a process that died under the lock left half done (its journal).

Run by whoever takes the lock next: a deploy's or rollback's lock holder, or ``status``, from
any machine. Nobody else can be running (we hold the lock), so the journal's writer is dead.

* a first deploy's backup killed between its two renames: the second rename is done;
* a go-live that died before the swap: nothing changed, its status and log say so;
* after the swap, before its checks passed: the release that was live before (the last
  checked one) is put back and restarted, and its checks run again; with no release before
  it, the checks are run again on the live one;
* after its checks passed: it stays; only the log and status are written.
"""

from . import journal
from .golive import REPAIR_TRIES, Status, activate, finish, why
from .layout import link_state, swap_link
from .shared import now_iso
from .upload import repair_backup


def finish_dead(remote_dir, who):
    """Under the lock: the report of what was repaired, or None when nothing was left."""
    j = journal.read(remote_dir)
    if j is None:
        return None
    if j.get("op") == "backup":
        report = repair_backup(remote_dir, j)
        journal.clear(remote_dir)
        return report
    if j.get("op") == "golive" and isinstance(j.get("job"), dict):
        return _finish_golive(remote_dir, j, who)
    journal.clear(remote_dir)
    return {"op": str(j.get("op")), "ok": False, "did": "removed an unreadable journal"}


def _finish_golive(remote_dir, j, who):
    job, phase = j["job"], j.get("phase")
    link, new, prev = job["link"], job["release"], job.get("previous")
    st = Status.resume(remote_dir, job)
    st.strict = False
    died_at = st.doc.get("step")
    live = link_state(remote_dir, link)[1]
    report = {
        "op": "golive",
        "run": job["run"],
        "id": job["id"],
        "action": job["action"],
        "release": new,
        "previous": prev,
        "died_at": died_at,
    }
    out = {"ok": False, "rolled_back": False, "health": None}
    if phase == "checked":
        out.update(ok=True, state="ok", health=st.doc.get("health"))
        did = "its checks had passed: %s stays live" % new
    elif phase == "start" or (phase == "swap" and live != new):
        out.update(state="failed", nothing_changed=True)
        did = "it died before the swap: %s stays live, nothing changed" % (live or "the link")
    elif prev is None:
        did = _recheck(job, st, live, out)
    else:
        did = _put_back(job, st, prev, out)
    if out["state"] != "ok":
        out["error"] = "the go-live died at step %s (no process held the lock); %s" % (died_at, did)
    entry = finish(
        job, st, out, 0.0, {"recovered": {"by": who.get("owner"), "time": now_iso(), "did": did}}
    )
    report.update(did=did, state=out["state"], ok=out["state"] in ("ok", "rolled_back", "failed"))
    report["health"] = entry.get("health")
    return report


def _put_back(job, st, prev, out):
    d, link = job["remote_dir"], job["link"]
    try:
        st.step("recover", "%s -> releases/%s" % (link, prev))
        swap_link(d, link, "releases/" + prev)
        checks = activate(dict(job, smoke=[]), st, prev, None, REPAIR_TRIES)
    except BaseException as exc:
        out.update(state="rollback_failed")
        return "putting back %s failed: %s" % (prev, why(exc))
    out.update(state="rolled_back", rolled_back=True, checks_after_swap_back=checks)
    out["health"] = checks["health"]
    return "put back %s (the last checked release); %s exited %d; health: %s" % (
        prev,
        checks["command"],
        checks["exit"],
        checks["health"],
    )


def _recheck(job, st, live, out):
    """No release to go back to: run the checks again on the live one and say how they went."""
    try:
        st.step("recover", "re-check %s" % live)
        checks = activate(dict(job, smoke=[]), st, live, None, REPAIR_TRIES)
    except BaseException as exc:
        out.update(state="rollback_failed")
        return "no release to go back to, and %s fails its checks: %s" % (live, why(exc))
    out.update(ok=True, state="ok", checks=checks, health=checks["health"])
    return "no release to go back to; %s passed its checks again (health: %s)" % (
        live,
        checks["health"],
    )
