"""Deploy, roll back, revert across hosts.

Upload to every host in parallel (each host's live model untouched), then go live one host at a
time, the ``canary`` hosts first; a failure stops the rest and, by default (``on_failure =
"revert"``), puts the hosts already switched back on their previous release, so the fleet never
stays mixed. One deploy id for all of it, in each host's deploys.log.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftctl.deploy.golive import utc_stamp
from ftctl.deploy.host import (
    ConnectFn,
    Staged,
    dry_run_host,
    publish,
    stage,
    stage_rollback,
)
from ftctl.deploy.local import load_local_model
from ftctl.deploy.results import DeployResult, HostResult
from ftctl.deploy.session import Session
from ftctl.deploy.transfer import Hooks
from ftctl.errors import FtctlError, RollbackFailed
from ftctl.progress import NULL, Reporter


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
    canary, on_failure = cfg.canary, cfg.on_failure
    model = load_local_model(model_dir, reporter)
    deploy_id = new_id(model.sha8)
    result = DeployResult("deploy", str(model.path), model.digest, id=deploy_id)
    result.hosts = [
        HostResult(host=str(spec), action="deploy", dry_run=dry_run, canary=i < canary)
        for i, spec in enumerate(hosts)
    ]
    if dry_run:
        for spec, hr in zip(hosts, result.hosts, strict=True):
            try:
                conn = connect(spec)
                try:
                    dry_run_host(conn, cfg, model, hr)
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
    _go_live_all(staged, result, deploy_id, reporter, on_failure)
    return result


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


def _go_live_all(staged, result: DeployResult, deploy_id: str, reporter, on_failure: str) -> None:
    switched: list[Staged] = []
    try:
        for i, s in enumerate(staged):
            try:
                publish(s, "deploy", deploy_id, reporter)
                if s.release is not None and s.release != s.previous:
                    switched.append(s)
            except FtctlError as exc:
                s.hr.error, result.error = exc.to_dict(), exc
                for rest in staged[i + 1 :]:
                    rest.close()
                if on_failure == "revert" and switched:
                    _revert(switched, deploy_id, reporter, result)
                return
    finally:
        for s in staged:
            s.close()


def _revert(switched: list[Staged], deploy_id: str, reporter, result: DeployResult) -> None:
    """Put the hosts already switched back on the release that was live before."""
    for s in reversed(switched):
        reporter.warn(f"{s.session.host}: reverting to {s.previous} (another host failed)")
        hr = HostResult(host=s.hr.host, action="revert")
        try:
            s.session.reopen()
            back = stage_rollback(
                s.session.conn, s.session.cfg, s.previous, deploy_id, hr, "revert"
            )
            publish(back, "revert", deploy_id, reporter)
            s.hr.reverted = True
        except FtctlError as exc:
            result.error = RollbackFailed(
                f"{result.error.message if result.error else ''}; and reverting {s.session.host} "
                f"to {s.previous} failed: {exc.message}",
                hint="the fleet is mixed: look at the servers now (`ftctl status`)",
            )
            s.hr.error = exc.to_dict()


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
                s = stage_rollback(conn, cfg, to, deploy_id, hr, "rollback", dry_run=dry_run)
                if not dry_run:
                    publish(s, "rollback", deploy_id, reporter)
            finally:
                conn.close()
        except FtctlError as exc:
            hr.error, result.error = exc.to_dict(), exc
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
