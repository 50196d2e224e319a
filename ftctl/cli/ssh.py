"""What every command that reaches the server over SSH shares: the connection options, the
deploy profile they select, and the connector (deploy, rollback, releases, status, harvest,
pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftctl.cli import common
from ftctl.config import DeployConfig, with_flags
from ftctl.errors import ConfigError
from ftctl.remote import DEFAULT_KNOWN_HOSTS

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="The [deploy.PROFILE] table of ftctl.toml.")
]
HostOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        help="user@host[:port]; repeat for several (upload in parallel, go live one at a time).",
    ),
]
IdentityOpt = Annotated[Path | None, typer.Option("--identity", "-i", help="SSH private key.")]
KnownHostsOpt = Annotated[
    Path | None,
    typer.Option("--known-hosts", help="known_hosts file.", show_default=DEFAULT_KNOWN_HOSTS),
]
RemoteDirOpt = Annotated[
    str | None, typer.Option("--remote-dir", help="Server directory holding final and releases/.")
]
RemotePythonOpt = Annotated[
    str | None,
    typer.Option(
        "--remote-python",
        help="The server's Python (3.6 or newer) that runs ftctl's server program.",
        show_default=common.default_text(DeployConfig, "remote_python"),
    ),
]
AcceptKeyOpt = Annotated[
    str | None,
    typer.Option("--accept-host-key", help="Trust this host key fingerprint (SHA256:...)."),
]
AcceptNewOpt = Annotated[
    bool,
    typer.Option("--accept-new-host-key", help="Trust a host seen for the first time (TOFU)."),
]


def target(ctx, profile, hosts, **flags) -> tuple[DeployConfig, list]:
    from ftctl.remote import parse_host

    cfg = common.config(ctx).deploy_profile(profile)
    for h in hosts or ():
        parse_host(h, cfg.user, cfg.port, where="--host")
    cfg = with_flags(cfg, hosts=tuple(hosts) if hosts else None, **flags)
    if not cfg.hosts:
        raise ConfigError(
            "no host to deploy to",
            hint="pass --host user@host[:port] or set hosts in [deploy.<profile>] of ftctl.toml",
        )
    return cfg, [parse_host(h, cfg.user, cfg.port) for h in cfg.hosts]


def connector(cfg: DeployConfig, accept_host_key: str | None, accept_new: bool):
    from ftctl.remote import connect

    return lambda spec: connect(
        spec, cfg, accept_host_key=accept_host_key, accept_new_host_key=accept_new
    )
