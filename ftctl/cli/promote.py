"""ftctl promote: the release live and healthy on staging goes to production, unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ftctl.cli import common, ssh


def _env(ctx: typer.Context, profile: str, accept_new: bool, **flags):
    from ftctl.deploy.promote import Env

    cfg, hosts = ssh.target(ctx, profile, None, **flags)
    return Env(profile, cfg, hosts, ssh.connector(cfg, None, accept_new))


def _print(res) -> None:
    out = common.out
    for v in res.staging:
        mark = ("healthy", "green") if v.healthy else ("not healthy", "red")
        out.print(Text.assemble(f"{res.source} {v.host}: {v.live or '-'} ", mark,
                                f" ({v.health})"))  # fmt: skip
    if res.gate:
        detail = res.gate.get("gate") or {}
        out.print(
            Text.assemble(
                "gate: ", (str(res.gate.get("verdict")), "bold green"),
                f" (report {detail.get('report')}, sha256 {str(detail.get('report_sha256'))[:12]})",
            )
        )  # fmt: skip
    if res.dry_run:
        out.print("plan (nothing changes):")
        for line in res.plan:
            out.print(f"  - {line}", markup=False)
        return
    for h in res.deploy.hosts if res.deploy else []:
        if h.ok:
            sent = "nothing sent" if h.reused else f"{h.method}: sent {h.uploaded_bytes} bytes"
            out.print(
                f"{res.target} {h.host}: now serves {h.release} ({sent}, {h.linked_files} files "
                f"hard-linked) in {h.seconds:.1f}s; health: {h.health or 'n/a'}",
                markup=False,
            )
    if res.ok:
        out.print(
            f"promoted {res.release} ({(res.digest or '')[:8]}) from {res.source} to "
            f"{res.target}; deploys.log records where it came from",
            markup=False,
        )


def promote_cmd(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Option("--from", help="The profile whose live release is taken.")
    ] = "staging",
    target: Annotated[str, typer.Option("--to", help="The profile it goes to.")] = "production",
    model_path: Annotated[
        Path | None,
        typer.Option(
            "--model-path",
            help="A local copy of the staging release (its digest must match); default: fetch "
            "it from the first staging host.",
        ),
    ] = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    dry_run: common.DryRunOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Take exactly the release live and healthy on every staging host to production.

    Refuses, leaving production untouched, when a staging host is unhealthy, mid-deploy or
    serves another release than the others (exit 5), or when the release's gate verdict
    (eval_report.json, written by `ftctl pipeline` / `ftctl eval --baseline --report-dir`) is
    missing or not PASS (exit 4). Then fetches the release (each file checked against its
    manifest) and deploys it with production's settings (delta upload, go-live, canary)
    under the same name; production's deploys.log records `promoted_from`.

    Example: `ftctl promote --from staging --to production` (CI: after `ftctl pipeline
    --profile staging`, behind a manual approval)
    """
    from ftctl.deploy.promote import promote

    ssh_flags = {"identity": identity, "known_hosts": known_hosts}  # both sides, when given
    res = promote(
        _env(ctx, source, accept_new_host_key, **ssh_flags),
        _env(ctx, target, accept_new_host_key, **ssh_flags),
        local_copy=model_path,
        dry_run=dry_run,
        reporter=common.reporter(ctx),
    )
    if json_out:
        common.emit_json(ctx, res.to_dict())
    else:
        _print(res)
    if res.error is not None:
        raise res.error


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("promote")(promote_cmd)
