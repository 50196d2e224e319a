"""Deploy, roll back, revert across hosts.

Upload to every host in parallel (each host's live model untouched), then go live one host at a
time. With ``canary = N`` the first N hosts go live first (health + smoke, as every host) and
are watched for ``canary_wait`` seconds (:mod:`ftctl.deploy.canary`) before the rest; a canary
failure reverts the canaries and stops. A host whose link drops during its go-live is reached
again (up to ``reconnect_timeout``) and its go-live's own outcome counts; not reached, it is
"unknown", a failure. Any failure stops the rest and, by default (``on_failure = "revert"``),
puts back every host that may serve the new model: those switched, and an unknown one, reached
again within ``reconnect_timeout`` (else named, exit 6). The fleet never stays mixed in
silence: every host's state is in the result (:data:`~ftctl.deploy.results.HOST_STATES`). One
deploy id for all of it, in each host's deploys.log (hosts that never went live get a line
saying why).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ftctl.deploy import canary
from ftctl.deploy.host import (
    ConnectFn,
    Staged,
    dry_run_host,
    log_failure,
    publish,
    stage,
    stage_rollback,
)
from ftctl.deploy.local import load_local_model
from ftctl.deploy.plan import health_text
from ftctl.deploy.results import MAY_SERVE_NEW, DeployResult, HostResult
from ftctl.deploy.server.shared import utc_stamp
from ftctl.deploy.session import LinkDead, Session
from ftctl.deploy.transfer import Hooks
from ftctl.errors import DeployError, FtctlError, HostKeyError, LockHeld, RollbackFailed
from ftctl.progress import NULL, Reporter

RETRY_S = 2.0  # between two tries to reach a host whose link dropped


def new_id(tag: str) -> str:
    return f"{utc_stamp()}-{tag}-{os.urandom(3).hex()}"


def _check(cfg) -> None:
    from ftctl.config import check

    check(cfg)


def _connect_and(connect: ConnectFn, spec, fn):
    conn = connect(spec)
    try:
        return fn(conn)
    except BaseException:
        conn.close()
        raise


def deploy(
    model_dir: str | Path,
    cfg,
    hosts: list,
    connect: ConnectFn,
    *,
    dry_run: bool = False,
    reporter: Reporter = NULL,
    hooks: Hooks | None = None,
    release: str | None = None,
    note: dict | None = None,
) -> DeployResult:
    """Deploy to every host (see the module docstring); failures are recorded in the result.
    ``release`` names the new release (default ``<UTC ts>-<sha8>``); ``note`` adds fields to
    each host's deploys.log entry (promote: ``promoted_from``)."""
    _check(cfg)
    model = load_local_model(model_dir, reporter)
    deploy_id = new_id(model.sha8)
    result = DeployResult("deploy", str(model.path), model.digest, id=deploy_id)
    result.hosts = [
        HostResult(host=str(spec), action="deploy", dry_run=dry_run, canary=i < cfg.canary)
        for i, spec in enumerate(hosts)
    ]
    result.plan = rollout_plan(cfg, [h.host for h in result.hosts])
    if dry_run:
        for spec, hr in zip(hosts, result.hosts, strict=True):
            try:
                conn = connect(spec)
                try:
                    dry_run_host(conn, cfg, model, hr, reporter)
                finally:
                    conn.close()
            except FtctlError as exc:
                hr.error, result.error = exc.to_dict(), exc
                break
        return result
    bar = len(hosts) == 1

    def one(i: int) -> Staged:
        hr = result.hosts[i]
        return _connect_and(
            connect,
            hosts[i],
            lambda conn: stage(
                conn, cfg, model, deploy_id, hr, reporter=reporter, hooks=hooks, bar=bar,
                release=release,
            ),
        )  # fmt: skip

    staged = _in_parallel(one, len(hosts), result)
    for s in staged:
        if s is not None:
            s.note = dict(note or {})
    if result.error is not None:  # nothing switched anywhere: give the other locks back
        for s in staged:
            if s is not None:
                s.close()
        return result
    _Rollout(cfg, staged, hosts, connect, result, reporter).run()
    return result


def rollout_plan(cfg, hosts: list[str]) -> list[str]:
    """The fleet's order and what a failure does (``--dry-run`` prints it)."""
    n = min(cfg.canary, len(hosts))
    checks = health_text(cfg) + (f" + {len(cfg.smoke)} smoke cases" if cfg.smoke else "")
    lines = []
    if n:
        lines += [
            f"canary: {', '.join(hosts[:n])} go live first, one at a time (each: {checks})",
            f"canary wait: {cfg.canary_wait:g}s, watching {canary.watch_text(cfg)}",
            "a canary failure reverts the canaries and stops (exit 5; 6 if a revert fails)",
        ]
        if hosts[n:]:
            lines.append(f"then, one at a time: {', '.join(hosts[n:])} (each: {checks})")
    else:
        lines.append(f"go live one at a time: {', '.join(hosts)} (each: {checks})")
    if cfg.on_failure == "revert":
        lines.append(
            "on a failure: stop; put back every host already switched, and one whose link "
            f"dropped during its go-live (reached again within {cfg.reconnect_timeout:g}s, "
            "else named 'unknown': exit 6)"
        )
    else:
        lines.append(
            "on a failure: stop; hosts already switched stay on the new model "
            "(--on-failure stop); a host whose link dropped is reported 'unknown'"
        )
    return lines


def _in_parallel(fn, n: int, result: DeployResult) -> list:
    """Run ``fn(i)`` for every host at once; record each failure on its host."""
    out: list = [None] * n
    errors: list[tuple[int, FtctlError]] = []
    if n == 1:  # in this thread: the progress bar and Ctrl-C behave
        try:
            out[0] = fn(0)
        except FtctlError as exc:
            errors.append((0, exc))
    else:
        with ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
            futures = [pool.submit(fn, i) for i in range(n)]
            for i, fut in enumerate(futures):
                try:
                    out[i] = fut.result()
                except FtctlError as exc:
                    errors.append((i, exc))
    for i, exc in errors:
        result.hosts[i].error = exc.to_dict()
    if errors:
        result.error = errors[0][1]
    return out


def go_live(s: Staged, action: str, deploy_id: str, reporter: Reporter) -> FtctlError | None:
    """``publish`` one host and set its state; the error, if it failed."""
    hr = s.hr
    try:
        publish(s, action, deploy_id, reporter)
    except FtctlError as exc:
        hr.error = exc.to_dict()
        hr.state = state_after(exc, hr)
        return exc
    hr.state = "untouched" if s.release in (None, s.previous) else "switched"
    return None


def state_after(exc: FtctlError, hr: HostResult) -> str:
    """A failed go-live's host state: a lost link leaves it unknown (the server goes on)."""
    if isinstance(exc, LinkDead):
        return "unknown"
    if isinstance(exc, RollbackFailed):
        return "failed"
    return "rolled_back" if hr.rolled_back else "untouched"


@dataclass
class _Rollout:
    """The go-live of staged hosts, one at a time, canaries first; what a failure does."""

    cfg: object
    staged: list[Staged]
    specs: list
    connect: ConnectFn
    result: DeployResult
    reporter: Reporter

    def run(self) -> None:
        n = min(self.cfg.canary, len(self.staged))
        try:
            for i, s in enumerate(self.staged):
                exc = go_live(s, "deploy", self.result.id, self.reporter)
                if isinstance(exc, LinkDead):
                    exc = self._outcome(s, self.specs[i], exc)
                if exc is not None:
                    self._stop(i + 1, exc, canary=i < n)
                    return
                if i + 1 == n:
                    exc = self._canary_wait(n)
                    if exc is not None:
                        self._stop(n, exc, canary=True)
                        return
        except KeyboardInterrupt:  # not silent: say where each host was left
            states = ", ".join(f"{h} {s}" for h, s in self.result.states.items())
            self.reporter.warn(f"interrupted; hosts: {states} (`ftctl status` tells more)")
            raise
        finally:
            for s in self.staged:
                s.close()

    def _outcome(self, s: Staged, spec, lost: LinkDead) -> FtctlError | None:
        """The link dropped during ``s``'s go-live, which goes on on the server by itself:
        reach the host again (up to ``reconnect_timeout``) and take the go-live's own outcome.
        Unreachable, or still going at the deadline: the host stays unknown (``lost``)."""
        hr = s.hr
        self.reporter.warn(
            f"{hr.host}: the link dropped during its go-live; reaching it again (up to "
            f"{self.cfg.reconnect_timeout:g}s) for its outcome"
        )
        s.close()
        deadline = time.monotonic() + self.cfg.reconnect_timeout
        while True:
            doc = self._status(spec)
            st = (doc or {}).get("status") or {}
            ours = st.get("id") == self.result.id and st.get("release") == s.release
            if ours and st.get("state") not in (None, "running"):
                break
            if time.monotonic() >= deadline:
                return lost
            time.sleep(RETRY_S)
        live, why = doc["live"], st.get("error") or st["state"]
        if st["state"] == "ok" and live == s.release:
            hr.ok, hr.state, hr.error, hr.release = True, "switched", None, s.release
            hr.warnings.append("the link dropped during the go-live; reached again, it went live")
            return None
        exc: FtctlError
        if live == s.previous:
            hr.state, hr.rolled_back = "rolled_back", True
            exc = DeployError(
                f"{hr.host}: {why}; rolled back to {s.previous} (seen after the link dropped)",
                hint="the previous model is live again; see deploys.log on the server",
            )
        else:
            hr.state = "failed"
            exc = RollbackFailed(
                f"{hr.host}: {why}; it serves {live} (seen after the link dropped)",
                hint="look at the server now (`ftctl status`)",
            )
        hr.error = exc.to_dict()
        return exc

    def _status(self, spec) -> dict | None:
        """``ftctl status`` of one host (it finishes a go-live that died); None if unreachable."""
        from ftctl.deploy.history import last_status

        try:
            conn = self.connect(spec)
        except HostKeyError:
            raise
        except FtctlError:
            return None
        try:
            return last_status(Session(conn, self.cfg, self.reporter))
        except FtctlError:
            return None
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _canary_wait(self, n: int) -> FtctlError | None:
        live = [s for s in self.staged[:n] if s.hr.state == "switched"]
        w = canary.watch(live, self.cfg, self.reporter)
        self.result.canary = w
        if w.failure is None:
            return None
        return DeployError(
            f"canary failed during the {self.cfg.canary_wait:g}s canary wait: {w.failure}",
            hint="the canaries are put back; the other hosts never went live",
        )

    def _stop(self, gone: int, exc: FtctlError, *, canary: bool) -> None:
        """A failure once ``gone`` hosts went (or tried to go) live: the rest stay as they are,
        those that may serve the new model are put back (canary phase, or on_failure revert)."""
        for s in self.staged[gone:]:
            why = f"not gone live: {exc.message}"
            log_failure(s.session, s.hr, self.result.id, s.digest, error=why)
            s.close()
        reverting = canary or self.cfg.on_failure == "revert"
        problems: list[str] = []
        if reverting:
            touched = range(gone)
            order = [i for i in reversed(touched) if self.staged[i].hr.state == "switched"]
            order += [i for i in touched if self.staged[i].hr.state == "unknown"]
            for i in order:
                problem = self._revert(self.staged[i], self.specs[i])
                if problem:
                    problems.append(problem)
        self.result.error = fleet_error(exc, self.result.hosts, problems, reverting=reverting)

    def _revert(self, s: Staged, spec) -> str | None:
        """Put one host back on the release live before (an unknown one is reached first);
        what went wrong, if something did."""
        hr, rep = s.hr, self.reporter
        if hr.state == "unknown":
            rep.warn(
                f"{hr.host}: the link dropped during its go-live; reaching it again (up to "
                f"{self.cfg.reconnect_timeout:g}s) to see what it serves"
            )
        else:
            rep.warn(f"{hr.host}: reverting to {s.previous} (the fleet must not stay mixed)")
        s.close()
        back_hr = HostResult(host=hr.host, action="revert")
        try:
            back = self._reach(spec, s.previous, back_hr)
        except FtctlError as exc:
            return _note(hr, f"{hr.host}: revert: {exc.message}")
        live = back.previous  # what the host serves now
        if live != s.release:  # an unknown host whose go-live did not go through
            back.close()
            hr.state = "untouched" if live == s.previous else "failed"
            what = f"reached again, it serves {live}"
            if live == s.previous:
                hr.warnings.append(f"{what}, the release live before")
                return None
            return _note(hr, f"{hr.host}: {what}: neither {s.release} nor {s.previous}")
        exc = go_live(back, "revert", self.result.id, rep)
        if exc is None:
            hr.state = "reverted"
            return None
        # the revert's own go-live failed: swapped back to the new release, broken, or unknown
        hr.state = {"unknown": "unknown", "failed": "failed"}.get(back_hr.state, "switched")
        return _note(hr, f"{hr.host}: revert: {exc.message}")

    def _reach(self, spec, to: str | None, hr: HostResult) -> Staged:
        """Connect and take the lock for a revert, trying again until ``reconnect_timeout``:
        the host may be down, or its go-live may still hold the lock."""
        deadline = time.monotonic() + self.cfg.reconnect_timeout
        while True:
            try:
                conn = self.connect(spec)
            except HostKeyError:
                raise
            except FtctlError as exc:
                last = exc
            else:
                try:
                    return stage_rollback(conn, self.cfg, to, self.result.id, hr, "revert")
                except (LockHeld, LinkDead) as exc:
                    last = exc
                    with contextlib.suppress(Exception):
                        conn.close()
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.close()
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkDead(
                    f"not reached within {self.cfg.reconnect_timeout:g}s: {last.message}",
                    hint="run `ftctl status` with this --host once it answers",
                )
            time.sleep(min(RETRY_S, left))


def _note(hr: HostResult, message: str) -> str:
    """Record a problem on a host (its error, or a warning if it has one); returns it."""
    if hr.error is None:
        hr.error = {"error": "DeployError", "message": message}
    else:
        hr.warnings.append(message)
    return message


def fleet_error(
    first: FtctlError, hosts: list[HostResult], problems: list[str], *, reverting: bool
) -> FtctlError:
    """The deploy's error once the fleet settled, every host's state named: exit 6 when a
    host may still serve the new model after a revert, or one is known broken."""
    failed = [h for h in hosts if h.state == "failed"]
    mixed = [h for h in hosts if h.state in MAY_SERVE_NEW] if reverting else []
    unknown = [h for h in hosts if h.state == "unknown"]
    if len(hosts) == 1 and hosts[0].state in ("untouched", "rolled_back") and not problems:
        return first
    message = f"{first.message}; hosts: " + ", ".join(f"{h.host} {h.state}" for h in hosts)
    message += "".join(f"; {p}" for p in problems)
    if failed or mixed:
        return RollbackFailed(
            message,
            hint="the fleet may be mixed: look at the hosts named above now (`ftctl status "
            "--host ...`), then `ftctl rollback` or deploy again",
        )
    if unknown:
        return type(first)(
            message,
            hint="an unknown host's go-live goes on on the server and ends on a checked model "
            "(the new one or the one before): `ftctl status --host ...` tells which",
        )
    back = all(h.state in ("untouched", "rolled_back", "reverted") for h in hosts)
    hint = (
        "no host serves the new model: each is on the release live before (its deploys.log "
        "says so); fix the cause named above and deploy again"
        if back and any(h.state == "reverted" for h in hosts)
        else first.hint
    )
    return type(first)(message, hint=hint)


def rollback(
    cfg,
    hosts: list,
    connect: ConnectFn,
    *,
    to: str | None = None,
    dry_run: bool = False,
    reporter: Reporter = NULL,
) -> DeployResult:
    """Each host back to ``to`` (default: the release live before), one host at a time."""
    _check(cfg)
    deploy_id = new_id("rollback")
    result = DeployResult("rollback", None, None, id=deploy_id)
    for spec in hosts:
        hr = HostResult(host=str(spec), action="rollback", dry_run=dry_run)
        result.hosts.append(hr)
        try:
            conn = connect(spec)
            try:
                s = stage_rollback(
                    conn, cfg, to, deploy_id, hr, "rollback", dry_run=dry_run, reporter=reporter
                )
                exc = None if dry_run else go_live(s, "rollback", deploy_id, reporter)
            finally:
                conn.close()
        except FtctlError as err:
            hr.error, exc = err.to_dict(), err
        if exc is not None:
            result.error = exc
            break
    return result


def per_host(cfg, hosts: list, connect: ConnectFn, fn) -> dict[str, object]:
    """``fn(session)`` on each host (read-only views: releases, status)."""
    out = {}
    for spec in hosts:
        conn = connect(spec)
        try:
            out[str(spec)] = fn(Session(conn, cfg))
        finally:
            conn.close()
    return out
