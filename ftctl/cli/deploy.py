"""ftctl deploy / rollback / releases: ship a model over SSH, undo it, list what is there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftctl.cli import common, ssh
from ftctl.config import DeployConfig
from ftctl.deploy.server.shared import SETTLED, UNCHECKED
from ftctl.errors import ConfigError, FtctlError
from ftctl.terms import seed_term

RestartOpt = Annotated[str | None, typer.Option("--restart-cmd", help="Remote restart command.")]
ReloadOpt = Annotated[
    str | None,
    typer.Option("--reload-cmd", help="Used instead of the restart (e.g. send SIGHUP)."),
]
HealthUrlOpt = Annotated[
    str | None, typer.Option("--health-url", help="Polled from the server until healthy.")
]
HealthCmdOpt = Annotated[
    str | None, typer.Option("--health-cmd", help="Remote command that exits 0 when healthy.")
]
HealthTimeoutOpt = Annotated[
    float | None, typer.Option("--health-timeout", help="Seconds to wait for healthy.")
]
HealthSettleOpt = Annotated[
    float | None,
    typer.Option(
        "--health-settle",
        help="No health URL: seconds the unit of `systemctl restart X` must stay up unchanged.",
        show_default=common.default_text(DeployConfig, "health_settle"),
    ),
]
SmokeOpt = Annotated[
    list[str] | None,
    typer.Option("--smoke", help="TEXT=LABEL the live service must answer; repeatable."),
]
KeepOpt = Annotated[
    int | None, typer.Option("--keep-releases", help="Releases kept (live + previous always).")
]
TransferOpt = Annotated[
    str | None,
    typer.Option(
        "--transfer",
        help="auto (safetensors files as a tensor delta where one applies, the rest by rsync "
        "over OpenSSH where both ends have it, else SFTP) | rsync | sftp.",
        show_default=common.default_text(DeployConfig, "transfer"),
    ),
]
BwlimitOpt = Annotated[
    int | None,
    typer.Option("--bwlimit", help="Cap the upload rate (rsync, tensor delta), KiB/s (0: no cap)."),
]
RequireHealthOpt = Annotated[
    bool | None,
    typer.Option(
        "--require-health/--no-require-health",
        help="Refuse a deploy whose new model nothing checks (no health URL or command).",
        show_default=common.default_text(DeployConfig, "require_health"),
    ),
]
CanaryOpt = Annotated[
    int | None,
    typer.Option(
        "--canary",
        help="The first N hosts go live (health + smoke) and are watched for --canary-wait "
        "before the rest; a canary failure reverts them and stops.",
    ),
]
CanaryWaitOpt = Annotated[
    float | None,
    typer.Option(
        "--canary-wait",
        help="Seconds the canaries are watched (health polled every few seconds).",
        show_default=common.default_text(DeployConfig, "canary_wait"),
    ),
]
OnFailureOpt = Annotated[
    str | None,
    typer.Option(
        "--on-failure",
        help="revert: put back every host that may serve the new model (the fleet never stays "
        "mixed) | stop: leave them.",
        show_default=common.default_text(DeployConfig, "on_failure"),
    ),
]
ReconnectOpt = Annotated[
    float | None,
    typer.Option(
        "--reconnect-timeout",
        help="Seconds a revert tries to reach a host whose link dropped mid-go-live; "
        "unreached, it is named 'unknown' (exit 6).",
        show_default=common.default_text(DeployConfig, "reconnect_timeout"),
    ),
]


WEAK_HEALTH_NOTES = {
    UNCHECKED: " (nothing checked the new model: set health_url or health_cmd, "
    "--require-health makes this an error)",
    SETTLED: " (only the unit was watched: set health_url so a model that loads but answers "
    "wrong is caught)",
}


def _smoke(items: list[str] | None):
    if not items:
        return None
    out = []
    for item in items:
        text, sep, label = item.rpartition("=")
        if not sep or not text or not label:
            raise ConfigError(
                f"bad --smoke '{item}'", hint="write it as TEXT=LABEL (帮我打卡=CLOCK_IN)"
            )
        out.append((text, label))
    return tuple(out)


def _sigterm_is_ctrl_c() -> None:
    """A cancelled CI job sends SIGTERM: unwind like Ctrl-C (locks given back at once; a
    go-live already started finishes on the server)."""
    import signal

    def handler(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _host_line(h) -> str:
    verb = "served" if h.state == "reverted" else "now serves"
    what = f"{h.action}: {h.host} {verb} {h.release}"
    if h.reused or h.action != "deploy":
        extra = " (nothing uploaded)"
    else:
        per = ", ".join(f"{m} {x['bytes']} bytes in {x['files']}" for m, x in h.methods.items())
        extra = (
            f" ({h.method}: sent {h.uploaded_bytes} bytes of file data in {h.uploaded_files} "
            f"files{f' ({per})' if len(h.methods) > 1 else ''}, {h.linked_files} files "
            "hard-linked)"
        )
    return what + extra + f" in {h.seconds:.1f}s; health: {h.health or 'n/a'}"


def _fleet_lines(result) -> None:
    """The fleet's plan (--dry-run), the canary wait, and every host's state."""
    fleet = len(result.hosts) > 1 or any(h.canary for h in result.hosts)
    dry = any(h.dry_run for h in result.hosts)
    if dry and fleet:
        common.out.print("fleet:", markup=False)
        for line in result.plan:
            common.out.print(f"  - {line}", markup=False)
    if result.canary is not None:
        w = result.canary
        end = f"FAILED: {w.failure}" if w.failure else "passed"
        common.out.print(
            f"canary wait: {', '.join(w.hosts)} for {w.seconds:g}s, watching {w.watched} "
            f"({w.polls} checks): {end}",
            markup=False,
        )
    if not dry and (fleet or not result.ok):
        states = ", ".join(f"{h} {s}" for h, s in result.states.items())
        common.out.print(f"hosts: {states}", markup=False)


def _finish(ctx: typer.Context, result, as_json: bool) -> None:
    if as_json:
        common.emit_json(ctx, result.to_dict())
    else:
        for h in result.hosts:
            if h.dry_run and h.ok:
                common.out.print(f"plan for {h.host}:", markup=False)
                for line in h.plan:
                    common.out.print(f"  - {line}", markup=False)
            elif h.ok:
                common.out.print(_host_line(h), markup=False)
                if h.backup:
                    common.out.print(
                        f"  {seed_term('backup')}: original model kept as releases/{h.backup}",
                        markup=False,
                    )
                if h.pruned:
                    common.out.print(f"  removed old releases: {', '.join(h.pruned)}", markup=False)
                if h.state == "reverted":
                    common.out.print(
                        f"  reverted to {h.previous}: another host or a canary failed",
                        markup=False,
                    )
        _fleet_lines(result)
        if result.ok and not any(h.dry_run for h in result.hosts) and result.action == "deploy":
            health = result.health or "n/a"
            note = WEAK_HEALTH_NOTES.get(health, "")
            common.out.print(
                f"{result.action} {result.id}: ok on {len(result.hosts)} host(s); "
                f"health: {health}{note}",
                markup=False,
            )
    if result.error is not None:
        exc: FtctlError = result.error
        common.print_error(exc)
        raise typer.Exit(int(exc.exit_code))


def deploy_cmd(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Option(
            "--model-path", "--model", "-m", help="The model directory to ship (.../final)."
        ),
    ] = Path("models/incremental/final"),
    profile: ssh.ProfileOpt = None,
    host: ssh.HostOpt = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    remote_dir: ssh.RemoteDirOpt = None,
    restart_cmd: RestartOpt = None,
    reload_cmd: ReloadOpt = None,
    health_url: HealthUrlOpt = None,
    health_cmd: HealthCmdOpt = None,
    health_timeout: HealthTimeoutOpt = None,
    health_settle: HealthSettleOpt = None,
    smoke: SmokeOpt = None,
    keep_releases: KeepOpt = None,
    transfer: TransferOpt = None,
    bwlimit: BwlimitOpt = None,
    require_health: RequireHealthOpt = None,
    canary: CanaryOpt = None,
    canary_wait: CanaryWaitOpt = None,
    on_failure: OnFailureOpt = None,
    reconnect_timeout: ReconnectOpt = None,
    remote_python: ssh.RemotePythonOpt = None,
    accept_host_key: ssh.AcceptKeyOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    dry_run: common.DryRunOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Ship a model: send what changed, then go live in one transaction on the server.

    Upload (unchanged files hard-linked; model.safetensors as a tensor delta against a
    release this machine also holds, e.g. the base model it was fine-tuned from; the rest as
    an rsync delta against the live release, or by SFTP), verify sha256, then the server swaps
    the link, restarts or reloads, checks health and smoke cases, swaps back on failure (exit
    5; 6 if that fails too) and unlocks, even if this command dies. The first deploy keeps a
    real final/ directory as releases/TS-original/.

    Example: `ftctl deploy --model-path models/incremental/final --host root@47.100.235.168
    --health-url http://127.0.0.1:8000/health --smoke 帮我打卡=CLOCK_IN --require-health`

    Several hosts: uploaded in parallel, live one at a time. --canary N: the first N go live
    and are watched for --canary-wait seconds first. On a failure the rest stay untouched and
    every host that may serve the new model is put back (--on-failure revert), a host whose
    link dropped included (reached again within --reconnect-timeout, else exit 6).

    Example (three hosts, the first as canary, watched 2 minutes): `ftctl deploy --profile
    prod --host root@a --host root@b --host root@c --canary 1 --canary-wait 120`
    """
    from ftctl import deploy as core

    cfg, hosts = ssh.target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir,
        restart_cmd=restart_cmd, reload_cmd=reload_cmd, health_url=health_url,
        health_cmd=health_cmd, health_timeout=health_timeout, health_settle=health_settle,
        smoke=_smoke(smoke), keep_releases=keep_releases, transfer=transfer,
        bwlimit_kbps=bwlimit, require_health=require_health, canary=canary,
        canary_wait=canary_wait, on_failure=on_failure, reconnect_timeout=reconnect_timeout,
        remote_python=remote_python,
    )  # fmt: skip
    _sigterm_is_ctrl_c()
    result = core.deploy(
        model,
        cfg,
        hosts,
        ssh.connector(cfg, accept_host_key, accept_new_host_key),
        dry_run=dry_run,
        reporter=common.reporter(ctx),
    )
    _finish(ctx, result, json_out)


def rollback_cmd(
    ctx: typer.Context,
    to: Annotated[
        str | None, typer.Option("--to", help="Release name (or its sha8); default: previous.")
    ] = None,
    profile: ssh.ProfileOpt = None,
    host: ssh.HostOpt = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    remote_dir: ssh.RemoteDirOpt = None,
    restart_cmd: RestartOpt = None,
    reload_cmd: ReloadOpt = None,
    health_url: HealthUrlOpt = None,
    health_cmd: HealthCmdOpt = None,
    health_timeout: HealthTimeoutOpt = None,
    health_settle: HealthSettleOpt = None,
    remote_python: ssh.RemotePythonOpt = None,
    accept_host_key: ssh.AcceptKeyOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    dry_run: common.DryRunOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Point the service back at the release that was live before (from deploys.log), or at
    --to RELEASE; the server swaps, restarts, checks health, swaps back on failure.

    Example: `ftctl rollback --profile prod` or `ftctl rollback --to 20261129051300-1a2b3c4d`
    """
    from ftctl import deploy as core

    cfg, hosts = ssh.target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir,
        restart_cmd=restart_cmd, reload_cmd=reload_cmd, health_url=health_url,
        health_cmd=health_cmd, health_timeout=health_timeout, health_settle=health_settle,
        remote_python=remote_python,
    )  # fmt: skip
    _sigterm_is_ctrl_c()
    result = core.rollback(
        cfg,
        hosts,
        ssh.connector(cfg, accept_host_key, accept_new_host_key),
        to=to,
        dry_run=dry_run,
        reporter=common.reporter(ctx),
    )
    _finish(ctx, result, json_out)


def releases_cmd(
    ctx: typer.Context,
    profile: ssh.ProfileOpt = None,
    host: ssh.HostOpt = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    remote_dir: ssh.RemoteDirOpt = None,
    remote_python: ssh.RemotePythonOpt = None,
    accept_host_key: ssh.AcceptKeyOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """List the releases on each server, the live one marked, with base, data and metrics.

    Example: `ftctl releases --host root@47.100.235.168 --json`
    """
    from ftctl import deploy as core

    cfg, hosts = ssh.target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir,
        remote_python=remote_python,
    )  # fmt: skip
    connect = ssh.connector(cfg, accept_host_key, accept_new_host_key)
    listing = core.per_host(cfg, hosts, connect, core.releases)
    if json_out:
        common.emit_json(ctx, {"ok": True, "hosts": listing})
        return
    for host_name, rows in listing.items():
        common.out.print(f"{host_name}  {cfg.remote_dir}", markup=False)
        if not rows:
            common.out.print("  (no releases)", markup=False)
        for r in rows:
            mark = "*" if r["live"] else ("<" if r["previous"] else " ")
            man = r.get("manifest") or {}
            ev = r.get("eval_report") or {}
            bits = [f"base={str(man['base_model'])[:12]}"] if man.get("base_model") else []
            if man.get("data"):
                bits.append(f"data={','.join(map(str, man['data']))[:60]}")
            bits += [f"{k}={v}" for k, v in ev.items() if isinstance(v, int | float | str)][:3]
            line = f" {mark} {r['name']}  {r['time'] or ''}  {'  '.join(bits)}"
            common.out.print(line.rstrip(), markup=False)
        common.out.print("  (* live, < previous: live before it, from deploys.log)", markup=False)
    if len(listing) > 1:
        common.out.print("live per host:", markup=False)
        for host_name, rows in listing.items():
            live = next((r["name"] for r in rows if r["live"]), "(none)")
            common.out.print(f"  {host_name}  {live}", markup=False)


def status_cmd(
    ctx: typer.Context,
    profile: ssh.ProfileOpt = None,
    host: ssh.HostOpt = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    remote_dir: ssh.RemoteDirOpt = None,
    remote_python: ssh.RemotePythonOpt = None,
    accept_host_key: ssh.AcceptKeyOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """How the last deploy, rollback or revert ended on each server (from any machine).

    Reads the go-live's status file, the lock and the newest lines of deploys.log; useful
    when the deploying machine died or lost its link while the server went on. A go-live that
    died on the server (kill -9, OOM, reboot) is finished here: the last checked release is
    put back and restarted, and the output says so.

    Example: `ftctl status --profile prod` or `ftctl status --host root@47.100.235.168 --json`
    """
    from ftctl import deploy as core

    cfg, hosts = ssh.target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir,
        remote_python=remote_python,
    )  # fmt: skip
    listing = core.per_host(cfg, hosts, ssh.connector(cfg, accept_host_key, accept_new_host_key),
                            core.status)  # fmt: skip
    if json_out:
        common.emit_json(ctx, {"ok": True, "hosts": listing})
        return
    for host_name, st in listing.items():
        _print_status(cfg, host_name, st)


def _print_status(cfg: DeployConfig, host_name: str, st: dict) -> None:
    from ftctl.deploy.plan import python_text
    from ftctl.deploy.session import describe_lock

    say = lambda text: common.out.print(text, markup=False)  # noqa: E731
    doc = st.get("status") or {}
    say(f"{host_name}  {cfg.remote_dir}")
    say(f"  live: {st.get('live') or st.get('link')}")
    say(f"  python: {python_text(cfg, st.get('python'))}")
    rec = st.get("recovered")
    if rec:
        say(f"  recovered: a job that died under the lock was finished now: {rec.get('did')}")
    if doc:
        say(
            f"  last: {doc.get('action')} {doc.get('id')} -> {doc.get('release')}: "
            f"{doc.get('state')} (step {doc.get('step')}, health {doc.get('health')})"
            + (f": {doc['error']}" if doc.get("error") else "")
        )
    if st.get("lock"):
        say(f"  lock: held by {describe_lock(st['lock'])}")
    for e in st.get("log", [])[-3:]:
        say(
            f"  log: {e.get('time')} {e.get('action')} {e.get('release')} "
            f"ok={e.get('ok')} health={e.get('health')}"
            + (" (finished by a later command)" if e.get("recovered") else "")
        )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("deploy")(deploy_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("releases")(releases_cmd)
    app.command("status")(status_cmd)
