"""ftctl deploy / rollback / releases: ship a model over SSH, undo it, list what is there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftctl.cli import common
from ftctl.config import DeployConfig, check, override
from ftctl.errors import ConfigError, FtctlError

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="The [deploy.PROFILE] table of ftctl.toml.")
]
HostOpt = Annotated[
    list[str] | None,
    typer.Option("--host", help="user@host[:port]; repeat for several (one at a time)."),
]
IdentityOpt = Annotated[Path | None, typer.Option("--identity", "-i", help="SSH private key.")]
KnownHostsOpt = Annotated[
    Path | None,
    typer.Option("--known-hosts", help="known_hosts file.", show_default="~/.ssh/known_hosts"),
]
RemoteDirOpt = Annotated[
    str | None, typer.Option("--remote-dir", help="Server directory holding final and releases/.")
]
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
SmokeOpt = Annotated[
    list[str] | None,
    typer.Option("--smoke", help="TEXT=LABEL the live service must answer; repeatable."),
]
KeepOpt = Annotated[
    int | None, typer.Option("--keep-releases", help="Releases kept (live + previous always).")
]
AcceptKeyOpt = Annotated[
    str | None,
    typer.Option("--accept-host-key", help="Trust this host key fingerprint (SHA256:...)."),
]
AcceptNewOpt = Annotated[
    bool,
    typer.Option("--accept-new-host-key", help="Trust a host seen for the first time (TOFU)."),
]


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


def _target(ctx, profile, hosts, **flags) -> tuple[DeployConfig, list]:
    from ftctl.remote import parse_host

    cfg = common.config(ctx).deploy_profile(profile)
    cfg = override(cfg, hosts=tuple(hosts) if hosts else None, **flags)
    check(cfg)
    if not cfg.hosts:
        raise ConfigError(
            "no host to deploy to",
            hint="pass --host user@host[:port] or set hosts in [deploy.<profile>] of ftctl.toml",
        )
    return cfg, [parse_host(h, cfg.user, cfg.port) for h in cfg.hosts]


def _connector(cfg: DeployConfig, accept_host_key: str | None, accept_new: bool):
    from ftctl.remote import connect

    return lambda spec: connect(
        spec, cfg, accept_host_key=accept_host_key, accept_new_host_key=accept_new
    )


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
                what = f"{h.action}: {h.host} now serves {h.release}"
                extra = f" (uploaded {h.uploaded_bytes} bytes in {h.uploaded_files} files)"
                if h.reused or h.action == "rollback":
                    extra = " (nothing uploaded)"
                common.out.print(what + extra + f" in {h.seconds:.1f}s", markup=False)
                if h.backup:
                    common.out.print(f"  original model kept as releases/{h.backup}", markup=False)
                if h.pruned:
                    common.out.print(f"  removed old releases: {', '.join(h.pruned)}", markup=False)
    if result.error is not None:
        exc: FtctlError = result.error
        common.print_error(exc)
        raise typer.Exit(int(exc.exit_code))


def deploy_cmd(
    ctx: typer.Context,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="The model directory to ship (.../final).")
    ] = Path("models/incremental/final"),
    profile: ProfileOpt = None,
    host: HostOpt = None,
    identity: IdentityOpt = None,
    known_hosts: KnownHostsOpt = None,
    remote_dir: RemoteDirOpt = None,
    restart_cmd: RestartOpt = None,
    reload_cmd: ReloadOpt = None,
    health_url: HealthUrlOpt = None,
    health_cmd: HealthCmdOpt = None,
    health_timeout: HealthTimeoutOpt = None,
    smoke: SmokeOpt = None,
    keep_releases: KeepOpt = None,
    accept_host_key: AcceptKeyOpt = None,
    accept_new_host_key: AcceptNewOpt = False,
    dry_run: common.DryRunOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Ship a model: lock, upload, verify sha256, swap the link, restart, health, smoke.

    Any failure after the swap rolls back automatically (exit 5; exit 6 if that fails too).
    The first deploy keeps a real final/ directory as releases/TIMESTAMP-original/.

    Example: `ftctl deploy --model models/incremental/final --host root@47.100.235.168
    --health-url http://127.0.0.1:8000/health --smoke 帮我打卡=CLOCK_IN`
    """
    from ftctl import deploy as core

    common.state(ctx).json = json_out
    cfg, hosts = _target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir,
        restart_cmd=restart_cmd, reload_cmd=reload_cmd, health_url=health_url,
        health_cmd=health_cmd, health_timeout=health_timeout, smoke=_smoke(smoke),
        keep_releases=keep_releases,
    )  # fmt: skip
    result = core.deploy(
        model,
        cfg,
        hosts,
        _connector(cfg, accept_host_key, accept_new_host_key),
        dry_run=dry_run,
        reporter=common.reporter(ctx),
    )
    _finish(ctx, result, json_out)


def rollback_cmd(
    ctx: typer.Context,
    to: Annotated[
        str | None, typer.Option("--to", help="Release name (or its sha8); default: previous.")
    ] = None,
    profile: ProfileOpt = None,
    host: HostOpt = None,
    identity: IdentityOpt = None,
    known_hosts: KnownHostsOpt = None,
    remote_dir: RemoteDirOpt = None,
    restart_cmd: RestartOpt = None,
    reload_cmd: ReloadOpt = None,
    health_url: HealthUrlOpt = None,
    health_cmd: HealthCmdOpt = None,
    health_timeout: HealthTimeoutOpt = None,
    accept_host_key: AcceptKeyOpt = None,
    accept_new_host_key: AcceptNewOpt = False,
    dry_run: common.DryRunOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Point the service back at an earlier release (no upload), restart, check health.

    Example: `ftctl rollback --profile prod` or `ftctl rollback --to 20261129051300-1a2b3c4d`
    """
    from ftctl import deploy as core

    common.state(ctx).json = json_out
    cfg, hosts = _target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir,
        restart_cmd=restart_cmd, reload_cmd=reload_cmd, health_url=health_url,
        health_cmd=health_cmd, health_timeout=health_timeout,
    )  # fmt: skip
    result = core.rollback(
        cfg,
        hosts,
        _connector(cfg, accept_host_key, accept_new_host_key),
        to=to,
        dry_run=dry_run,
        reporter=common.reporter(ctx),
    )
    _finish(ctx, result, json_out)


def releases_cmd(
    ctx: typer.Context,
    profile: ProfileOpt = None,
    host: HostOpt = None,
    identity: IdentityOpt = None,
    known_hosts: KnownHostsOpt = None,
    remote_dir: RemoteDirOpt = None,
    accept_host_key: AcceptKeyOpt = None,
    accept_new_host_key: AcceptNewOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """List the releases on each server, the live one marked, with base, data and metrics.

    Example: `ftctl releases --host root@47.100.235.168 --json`
    """
    from ftctl import deploy as core

    common.state(ctx).json = json_out
    cfg, hosts = _target(
        ctx, profile, host, identity=identity, known_hosts=known_hosts, remote_dir=remote_dir
    )
    connect = _connector(cfg, accept_host_key, accept_new_host_key)
    listing = {}
    for spec in hosts:
        conn = connect(spec)
        try:
            listing[str(spec)] = core.list_releases(conn, cfg)
        finally:
            conn.close()
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
        common.out.print("  (* live, < previous)", markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("deploy")(deploy_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("releases")(releases_cmd)
