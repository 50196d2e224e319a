"""The canary wait: the first ``canary`` hosts went live (health + smoke, as every host does);
now watch them for ``canary_wait`` seconds before the rest go live.

Every ``POLL_S`` seconds each canary's health is checked once, from the server itself (as the
go-live checks it): ``health_cmd`` must exit 0, or ``health_url`` must answer 200 and, when it
reports a ``sha256`` (``ftctl serve`` does), name the new model. The first check that fails is
the canary failure. With neither configured nothing can be polled: the wait says so (a warning
and ``canary.watched`` in ``--json``) instead of passing in silence.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ftctl.deploy.host import Staged, health_now
from ftctl.deploy.results import CanaryWatch
from ftctl.deploy.session import Session
from ftctl.progress import NULL, Reporter

POLL_S = 3.0  # seconds between two rounds of checks
CHECK_TIMEOUT_S = 30.0  # one check (an SSH command) that takes longer has failed


def watch_text(cfg) -> str:
    """What the canary wait polls (or why it cannot poll anything)."""
    if cfg.health_cmd:
        return f"health_cmd `{cfg.health_cmd}` run on each canary every {POLL_S:g}s"
    if cfg.health_url:
        return f"{cfg.health_url} polled on each canary every {POLL_S:g}s"
    return (
        "nothing: no health_url or health_cmd to poll, so the wait cannot see a canary fail "
        "(the canaries were checked only by their go-live); set health_url"
    )


def check_once(session: Session, digest: str | None) -> str | None:
    """One health check of a canary (:func:`~ftctl.deploy.host.health_now`): None when
    healthy, else why not."""
    healthy, detail = health_now(session, digest)
    return None if healthy else detail


def watch(
    canaries: list[Staged],
    cfg,
    reporter: Reporter = NULL,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> CanaryWatch:
    """Watch the canaries (already live) for ``cfg.canary_wait`` seconds; stop at the first
    failed check (``failure`` says which host and why)."""
    w = CanaryWatch([s.hr.host for s in canaries], cfg.canary_wait, watch_text(cfg))
    if not canaries:
        w.watched = "nothing: no canary switched (the new release was live there already)"
        return w
    if cfg.canary_wait <= 0:
        return w
    if not (cfg.health_cmd or cfg.health_url):
        reporter.warn(f"canary wait ({cfg.canary_wait:g}s): watching {w.watched}")
        sleep(cfg.canary_wait)
        return w
    reporter.stage(f"canary wait: {', '.join(w.hosts)} for {cfg.canary_wait:g}s ({w.watched})")
    short = dataclasses.replace(cfg, command_timeout=CHECK_TIMEOUT_S)
    sessions = [(s, Session(s.session.conn, short)) for s in canaries]
    deadline = clock() + cfg.canary_wait
    while True:
        for s, session in sessions:
            why = check_once(session, s.digest)
            w.polls += 1
            if why is not None:
                w.failure = f"{s.hr.host}: {why}"
                reporter.warn(f"canary failed: {w.failure}")
                return w
        left = deadline - clock()
        if left <= 0:
            reporter.info(f"canary wait: {w.polls} checks passed")
            return w
        sleep(min(POLL_S, left))
