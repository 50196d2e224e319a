"""One server's part of a deploy, in Capistrano's phases.

``stage``  (check + updating): lock, probe, plan, prepare (backup, hard links), transfer,
           verify, rename into releases/ -- the live model is untouched throughout;
``publish`` (publishing + finishing): hand the lock to the go-live program on the server and
           follow its status file until it ends (the server finishes without us).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftctl import __version__
from ftctl.deploy.history import probe, retention
from ftctl.deploy.local import LocalModel
from ftctl.deploy.plan import Plan, RemoteState, make_plan, plan_lines, prehash, python_text
from ftctl.deploy.results import HostResult
from ftctl.deploy.server.shared import FINAL_STATES, now_iso, utc_stamp
from ftctl.deploy.session import LinkDead, Lock, Session, lock_info, lock_owner, q
from ftctl.deploy.transfer import Hooks, Master, Sent, send, verify
from ftctl.errors import DeployError, FtctlError, RollbackFailed
from ftctl.progress import NULL, Reporter

ConnectFn = Callable[[Any], Any]


@dataclass
class Staged:
    """A host whose release is on the server, lock held, ready to go live."""

    session: Session
    hr: HostResult
    lock: Lock | None
    release: str | None  # None: nothing to do (already live)
    previous: str | None
    digest: str | None
    prune: list[str] = field(default_factory=list)  # releases retention removes once live
    started: float = field(default_factory=time.monotonic)
    note: dict = field(default_factory=dict)  # extra fields of the deploys.log entry

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        with contextlib.suppress(Exception):
            self.session.conn.close()


def check_state(session: Session, st: RemoteState) -> None:
    cfg, host = session.cfg, session.host
    if st.missing_tools:
        raise DeployError(
            f"{host}: remote tools missing: {', '.join(st.missing_tools)}",
            hint="install them on the server (coreutils)",
        )
    path = f"{cfg.remote_dir}/{cfg.link_name}"
    if st.link == "other":
        raise DeployError(
            f"{host}: {path} is neither a directory nor a link",
            hint="move it away by hand, then rerun",
        )
    if st.link == "link" and st.live is None:
        raise DeployError(
            f"{host}: {path} is a link that does not point into releases/",
            hint=f"replace it by the directory it points at (the first deploy backs that up), "
            f"or point it at {cfg.remote_dir}/releases/<name>",
        )


def _check_space(session: Session, st: RemoteState, plan: Plan) -> None:
    cfg = session.cfg
    need = int(sum(s.size for s in plan.steps if s.action != "link") * cfg.min_free_factor)
    if st.free_bytes < need:
        raise DeployError(
            f"{session.host}: {st.free_bytes / 1e6:.0f} MB free in {cfg.remote_dir}, need "
            f"{need / 1e6:.0f} MB ({cfg.min_free_factor:g}x the files to send)",
            hint="free space on the server (old releases: lower keep_releases) and rerun",
        )


def dry_run_host(conn, cfg, model: LocalModel, hr: HostResult, reporter: Reporter = NULL) -> None:
    session = Session(conn, cfg, reporter)
    st = probe(session, model)
    plan = make_plan(model, st, cfg, session.local, count=True)
    _record_plan(hr, cfg, st, model, plan)
    hr.ok = True


def note_recovery(session: Session, hr: HostResult, rec: dict | None, reporter: Reporter) -> None:
    """Say what the server finished of a job that died under the lock (before this one)."""
    if not rec:
        return
    hr.recovered = rec
    if rec.get("op") == "golive":
        what = f"the {rec.get('action')} {rec.get('id')} whose go-live died"
    else:
        what = "a first deploy's backup that was killed"
    hr.warnings.append(f"finished {what}: {rec.get('did')}")
    reporter.warn(f"{session.host}: {hr.warnings[-1]}")


@contextlib.contextmanager
def timed(hr: HostResult, step: str):
    """Seconds spent in ``step``, into ``hr.timings``."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        hr.timings[step] = round(time.monotonic() - t0, 3)


def _record_plan(hr: HostResult, cfg, st: RemoteState, model: LocalModel, plan: Plan) -> None:
    hr.python = python_text(cfg, st.python)
    hr.plan = plan_lines(cfg, st, model, plan)
    hr.method = plan.method
    hr.expected_bytes = plan.expected_bytes
    hr.linked_files = len(plan.links)


def stage(
    conn,
    cfg,
    model: LocalModel,
    deploy_id: str,
    hr: HostResult,
    *,
    reporter: Reporter = NULL,
    hooks: Hooks | None = None,
    bar: bool = True,
    release: str | None = None,
) -> Staged:
    """Upload ``model`` next to the live one; the live model is untouched. Raises DeployError.
    ``release``: the name to give it (promote keeps staging's), default ``<UTC ts>-<sha8>``."""
    session = Session(conn, cfg, reporter)
    hr.host = f"{conn.user}@{conn.host}:{conn.port}"
    reporter.stage(f"{session.host}: lock and look")
    digests = prehash(cfg, model)  # the likely tensor delta basis, hashed while we connect
    master = _maybe_master(session)  # OpenSSH connects meanwhile too
    try:
        with timed(hr, "connect+lock"):
            lock = Lock(session, "deploy", lock_info("deploy", deploy_id)).acquire()
    except BaseException:
        if master is not None:
            master.close()
        raise
    incoming = None
    try:
        note_recovery(session, hr, lock.recovered, reporter)
        with timed(hr, "probe"):
            st = probe(session, model)
        check_state(session, st)
        with timed(hr, "plan"):
            plan = make_plan(model, st, cfg, session.local, digests=digests)
        _record_plan(hr, cfg, st, model, plan)
        if plan.method != "rsync" and not plan.tensor_deltas and master is not None:
            master.close()
            master = None
        hr.previous = st.live
        if plan.method == "live":
            reporter.info(f"{session.host}: {st.live} is already live; nothing to do")
            hr.release, hr.reused = st.live, True
            return Staged(session, hr, lock, None, st.live, model.digest)
        _check_space(session, st, plan)
        name = plan.reuse or release or f"{utc_stamp()}-{model.sha8}"
        incoming = None if plan.reuse else f".incoming-{os.urandom(6).hex()}"
        with timed(hr, "prepare"):
            prep = _prepare(session, plan, incoming)
        hr.backup = prep.get("backup")
        hr.previous = prep.get("live") or st.live
        if plan.reuse:
            hr.reused = True
        else:
            _upload(session, model, plan, incoming, name, hr, reporter, hooks, master, bar)
        hr.release = name
        doomed = retention({*st.releases, name}, cfg.keep_releases, name, hr.previous)
        return Staged(session, hr, lock, name, hr.previous, model.digest, doomed)
    except BaseException as exc:
        if incoming:
            _discard(session, incoming)
        if isinstance(exc, FtctlError):
            hr.error = exc.to_dict()
            log_failure(session, hr, deploy_id, model.digest)
        lock.release()
        raise
    finally:
        if master is not None:
            master.close()


def _maybe_master(session: Session) -> Master | None:
    """Start OpenSSH's connection early (it connects while the probe runs): rsync and the
    tensor delta go through it."""
    if session.local or session.cfg.transfer == "sftp" or not shutil.which("ssh"):
        return None
    return Master(session)


def _prepare(session: Session, plan: Plan, incoming: str | None) -> dict:
    from ftctl.deploy.plan import FileStep

    cfg = session.cfg
    req = {
        "remote_dir": cfg.remote_dir,
        "link": cfg.link_name,
        "incoming": incoming,
        "links": plan.links,
        "shas": plan.shas,
        "bases": plan.bases,
        "dirs": sorted({os.path.dirname(s.rel) for s in plan.steps} - {""}),
        **server_knobs(),
    }
    ans = session.call("prepare", req, what="prepare the release directory")
    for rel in ans.get("unlinked", []):  # the old final/'s manifest did not match its files
        for i, s in enumerate(plan.steps):
            if s.rel == rel:
                plan.steps[i] = FileStep(rel, s.size, "send", expect=s.size, sha=s.sha)
    return ans


def server_knobs() -> dict:
    """Knobs for tests, from the environment: ``FTCTL_NO_RENAMEAT2=1`` takes the backup's
    two-rename path (the one of glibc < 2.28); ``FTCTL_TEST_PAUSE_AT=backup-renames`` stops
    between those renames for a while (a test kills the process there)."""
    knobs: dict = {}
    if os.environ.get("FTCTL_NO_RENAMEAT2") == "1":
        knobs["renameat2"] = False
    if os.environ.get("FTCTL_TEST_PAUSE_AT"):
        knobs["pause_at"] = os.environ["FTCTL_TEST_PAUSE_AT"]
    return knobs


def _upload(session, model, plan, incoming, name, hr, reporter, hooks, master, bar) -> None:
    remote_incoming = f"{session.cfg.remote_dir}/{incoming}"
    n, deltas = len(plan.to_send), len(plan.tensor_deltas)
    how = f"{deltas} as a tensor delta, the rest by {plan.method}" if deltas else plan.method
    reporter.stage(
        f"{session.host}: {n} files to send ({how}; ~{plan.expected_bytes / 1e6:.1f} MB),"
        f" {len(plan.links)} hard-linked"
    )
    sent = Sent(plan.method)
    try:
        with timed(hr, "transfer"):
            send(
                session, model, plan, remote_incoming, master=master, reporter=reporter,
                hooks=hooks, bar=bar, out=sent,
            )  # fmt: skip
    finally:  # also what a failed upload sent (deploys.log keeps it)
        _record_sent(hr, sent)
    reporter.stage(f"{session.host}: verify sha256 of {n} received files")
    with timed(hr, "verify"):
        verify(session, model, plan, remote_incoming, name, sent.hashed)


def _record_sent(hr: HostResult, sent: Sent) -> None:
    hr.uploaded_files, hr.uploaded_bytes, hr.wire_bytes = (
        sent.files,
        sent.file_bytes,
        sent.wire_bytes,
    )
    hr.methods, hr.fallbacks = sent.by_method, sent.fallbacks
    if sent.by_method:
        hr.method = sent.method
    hr.warnings += [f"{rel}: tensor delta failed, sent otherwise: {why}"
                    for rel, why in sent.fallbacks.items()]  # fmt: skip


def _discard(session: Session, incoming: str) -> None:
    session.reopen()
    with contextlib.suppress(FtctlError):
        session.run(f"rm -rf -- {q(session.cfg.remote_dir + '/' + incoming)}", what="discard")


# --------------------------------------------------------------------------- go live


def job_for(s: Staged, action: str, deploy_id: str, release: str, previous: str | None) -> dict:
    cfg = s.session.cfg
    hr = s.hr
    return {
        "id": deploy_id,  # the deploy's, shared by the fleet and a revert
        "run": os.urandom(6).hex(),  # this go-live's
        "action": action,
        "host": hr.host,
        "remote_dir": cfg.remote_dir,
        "link": cfg.link_name,
        "release": release,
        "previous": previous,
        "digest": s.digest if action == "deploy" else None,
        "restart_cmd": cfg.restart_cmd,
        "reload_cmd": cfg.reload_cmd,
        "health_url": cfg.health_url,
        "health_cmd": cfg.health_cmd,
        "health_timeout": cfg.health_timeout,
        "health_settle": cfg.health_settle,
        "command_timeout": cfg.command_timeout,
        "predict_url": predict_url(cfg),
        "smoke": [list(x) for x in cfg.smoke] if action == "deploy" else [],
        "prune": s.prune if action == "deploy" else [],
        "follow_s": 2 * (cfg.command_timeout + cfg.health_timeout + cfg.health_settle) + 60,
        "log": {
            "by": lock_owner(),
            "host": hr.host,
            "sha256": s.digest,
            "method": hr.method,
            "uploaded_bytes": hr.uploaded_bytes,
            "wire_bytes": hr.wire_bytes,
            "methods": hr.methods,
            "fallbacks": hr.fallbacks,
            "linked_files": hr.linked_files,
            "backup": hr.backup,
            "seconds": round(time.monotonic() - s.started, 2),
            "ftctl": __version__,
            **s.note,
        },
    }


def predict_url(cfg) -> str | None:
    if cfg.predict_url:
        return cfg.predict_url
    if cfg.health_url:
        return cfg.health_url.rsplit("/", 1)[0] + "/predict"
    return None


def health_now(session: Session, digest: str | None) -> tuple[bool, str]:
    """The profile's health check, made on the server now by the server program (the
    go-live's own check: ``health_cmd`` exits 0, or ``health_url`` answers 200 and, when it
    reports a digest, serves ``digest``): (healthy, what passed or why not)."""
    cfg = session.cfg
    if not (cfg.health_url or cfg.health_cmd):
        return False, "no health_url or health_cmd in the profile: nothing says it is healthy"
    req = {
        "health_url": cfg.health_url,
        "health_cmd": cfg.health_cmd,
        "health_timeout": cfg.health_timeout,
        "digest": digest,
    }
    try:
        ans = session.call("health", req, what="health check", ok_codes=(0, 1))
    except FtctlError as exc:
        return False, exc.message
    return bool(ans.get("healthy")), str(ans.get("detail") or "unhealthy")


def publish(s: Staged, action: str, deploy_id: str, reporter: Reporter = NULL) -> None:
    """Go live on the server (detached) and follow it to the end. Raises on failure."""
    hr, session = s.hr, s.session
    if s.release is None or s.release == s.previous:
        hr.ok = True
        hr.release = s.previous
        s.close()
        return
    job = job_for(s, action, deploy_id, s.release, s.previous)
    reporter.stage(f"{session.host}: go live on the server ({s.release})")
    pipe = s.lock.hand_over(job)  # the go-live owns the lock now
    s.lock = None
    with timed(hr, "go-live"):
        doc = follow(session, pipe, reporter)
    if doc.get("died"):
        doc = _finish_dead(session, hr, doc, reporter)
    _record_outcome(hr, doc)
    hr.seconds = time.monotonic() - s.started
    if doc["state"] == "ok":
        hr.ok = True
        return
    err = doc.get("error") or doc["state"]
    if doc["state"] == "failed" and doc.get("nothing_changed"):
        raise DeployError(
            f"{session.host}: {err}", hint="the previous model is still live; see deploys.log"
        )
    if doc["state"] == "rolled_back":
        raise DeployError(
            f"{session.host}: {err}; rolled back to {s.previous}",
            hint="the previous model is live again; see deploys.log on the server",
        )
    raise RollbackFailed(
        f"{session.host}: {err}",
        hint="the service may be down: look at the server now (`ftctl status`)",
    )


def _finish_dead(session: Session, hr: HostResult, doc: dict, reporter: Reporter) -> dict:
    """The go-live died on the server (killed): finish its job now, as the next ftctl command
    anywhere would (put back the last checked release), and say what was done."""
    from ftctl.deploy.history import last_status

    reporter.warn(f"{session.host}: {doc.get('error')}; finishing its job")
    session.reopen()
    try:
        rec = last_status(session).get("recovered")
    except FtctlError as exc:
        rec = {"ok": False, "did": f"could not finish it: {exc.message}"}
    note_recovery(session, hr, rec, reporter)
    if rec is None:  # no journal: it died before it wrote one, so before the swap
        rec = {
            "ok": True,
            "state": "failed",
            "did": "it died before its first step: nothing changed",
        }
    state = rec.get("state") if rec.get("ok") else "rollback_failed"
    return {
        "state": state or "rollback_failed",
        "rolled_back": state == "rolled_back",
        "health": rec.get("health"),
        "error": f"{doc.get('error')}; {rec.get('did')}",
        "nothing_changed": state == "failed",
    }


def _record_outcome(hr: HostResult, doc: dict) -> None:
    hr.rolled_back = bool(doc.get("rolled_back"))
    hr.health = doc.get("health")
    checks = doc.get("checks") or {}
    hr.smoke = checks.get("smoke", [])
    hr.checks = {k: v for k, v in checks.items() if k != "smoke"}
    hr.pruned = doc.get("pruned", [])
    hr.golive_steps = [{"step": x.get("step"), "t": x.get("t")} for x in doc.get("steps") or []]


def follow(session: Session, pipe, reporter: Reporter = NULL) -> dict:
    """The go-live's status, line by line, until it ends. A lost link is an error that says
    the server goes on without us."""
    cfg = session.cfg
    step = None
    try:
        while True:
            try:
                doc = pipe.recv(cfg.link_timeout)
            except TimeoutError:
                session.kill_link(f"no answer from {session.host} for {cfg.link_timeout:.0f}s")
                doc = None
            if doc is None or doc.get("timeout"):
                raise LinkDead(
                    f"{session.host}: lost the go-live's progress "
                    f"({session.dead or 'the session ended'}); it goes on on the server",
                    hint="run `ftctl status` with the same --host to see how it ended",
                )
            if "tick" in doc:
                continue
            if doc.get("step") != step:
                step = doc.get("step")
                detail = (doc.get("steps") or [{}])[-1].get("detail", "")
                reporter.info(f"{session.host}: {step}" + (f" ({detail})" if detail else ""))
            if doc.get("state") in FINAL_STATES:
                return doc
    finally:
        pipe.close()


# --------------------------------------------------------------------------- rollback


def stage_rollback(conn, cfg, to: str | None, deploy_id: str, hr: HostResult, action: str,
                   dry_run: bool = False, reporter: Reporter = NULL) -> Staged:  # fmt: skip
    """Lock and choose the release to return to (default: the one live before, by history)."""
    session = Session(conn, cfg, reporter)
    hr.host = f"{conn.user}@{conn.host}:{conn.port}"
    if dry_run:
        st = probe(session)
        target = rollback_target(session, st, to)
        hr.release, hr.previous = target, st.live
        hr.python = python_text(cfg, st.python)
        hr.plan = _rollback_plan(cfg, st, target)
        hr.ok = True
        return Staged(session, hr, None, None, st.live, None)
    lock = Lock(session, action, lock_info(action, deploy_id)).acquire()
    try:
        note_recovery(session, hr, lock.recovered, reporter)
        st = probe(session)
        target = rollback_target(session, st, to)
    except BaseException:
        lock.release()
        raise
    hr.release, hr.previous = target, st.live
    hr.plan = _rollback_plan(cfg, st, target)
    return Staged(session, hr, lock, target, st.live, None)


def _rollback_plan(cfg, st: RemoteState, target: str) -> list[str]:
    from ftctl.deploy.plan import health_text

    return [
        f"swap {cfg.link_name} -> releases/{target} (was: {st.live}) on the server (detached)",
        f"run: {cfg.reload_cmd or cfg.restart_cmd}",
        f"health: {health_text(cfg)}",
        f"on failure: swap back to {st.live}",
    ]


def rollback_target(session: Session, st: RemoteState, to: str | None) -> str:
    host = session.host
    if st.link != "link" or st.live is None:
        raise DeployError(
            f"{host}: nothing to roll back: the link is {st.link}",
            hint="deploy at least once with `ftctl deploy` first",
        )
    if to is not None:
        matches = [r for r in st.releases if r == to or r.endswith(f"-{to}")]
        if not matches:
            raise DeployError(
                f"{host}: no release '{to}' (have: {', '.join(st.releases)})",
                hint="see `ftctl releases`",
            )
        return matches[-1]
    if st.previous is None:
        raise DeployError(
            f"{host}: no release was live before {st.live}",
            hint="name one with --to RELEASE (see `ftctl releases`)",
        )
    return st.previous


def log_failure(
    session: Session, hr: HostResult, deploy_id: str, digest: str | None, error: str | None = None
) -> None:
    """A line in deploys.log for a deploy that failed or stopped before going live (the go-live
    writes its own); ``error`` (default: the host's error) says why."""
    entry = {
        "time": now_iso(),
        "id": deploy_id,
        "action": hr.action,
        "ok": False,
        "by": lock_owner(),
        "host": hr.host,
        "release": None,
        "previous": hr.previous,
        "sha256": digest,
        "method": hr.method,
        "uploaded_bytes": hr.uploaded_bytes,
        "methods": hr.methods,
        "fallbacks": hr.fallbacks,
        "rolled_back": False,
        "error": error or (hr.error or {}).get("message", ""),
        "ftctl": __version__,
    }
    session.reopen()
    with contextlib.suppress(FtctlError):
        session.call("log", {"remote_dir": session.cfg.remote_dir, "entry": entry}, what="log")
