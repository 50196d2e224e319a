"""Promote: the release live and healthy on staging goes to production, unchanged.

The seed's rule 验证后再部署 (verify in a test environment, then deploy). ``ftctl promote
--from staging --to production`` takes exactly what staging serves:

1. look at every staging host (read-only): the live release, its content digest (from its
   manifest), the gate verdict that travelled with it (``eval_report.json``, written by
   ``ftctl eval --baseline`` / ``pipeline``), and a health check run on the server itself
   (``health_cmd``, or ``health_url``, whose ``sha256`` must be the live release's);
2. refuse (production untouched) when a host is unhealthy, mid-deploy or serves no ftctl
   release (:class:`PromoteRefused`, exit 5), when the hosts serve different digests (mixed),
   or when the gate verdict is missing, not PASS or for another model (:class:`GateFailed`,
   exit 4);
3. fetch that release's files from the first staging host (or take them from a local copy
   whose digest matches), verifying each file against the manifest;
4. deploy them to production with production's settings (delta upload, go-live, canary),
   under the same release name; each production host's deploys.log entry says which staging
   release and which gate report it came from (``promoted_from``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftctl.deploy.fleet import deploy, per_host
from ftctl.deploy.history import probe
from ftctl.deploy.host import health_now
from ftctl.deploy.local import check_relpath, load_local_model
from ftctl.deploy.results import DeployResult
from ftctl.deploy.session import Session, describe_lock, q
from ftctl.errors import DeployError, FtctlError, GateFailed, PromoteRefused
from ftctl.fsutil import sha256_file
from ftctl.manifest import EVAL_REPORT, MANIFEST, tree_digest
from ftctl.progress import NULL, Reporter

_MARK = "=====ftctl-promote"


@dataclass(frozen=True)
class Env:
    """One side of a promotion: a deploy profile, its hosts and how to reach them."""

    name: str
    cfg: Any  # DeployConfig
    hosts: list
    connect: Callable[[Any], Any]


@dataclass
class StagingView:
    """What one staging host serves, read without changing anything."""

    host: str
    live: str | None = None
    digest: str | None = None
    healthy: bool = False
    health: str = ""  # how it was checked, or why it is not healthy
    gate: dict | None = None  # the live release's eval_report.json
    files: dict[str, str] = field(default_factory=dict)  # the manifest's {relpath: sha256}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "files"}


@dataclass
class PromoteResult:
    source: str
    target: str
    dry_run: bool = False
    staging: list[StagingView] = field(default_factory=list)
    release: str | None = None
    digest: str | None = None
    gate: dict | None = None
    files_from: str | None = None  # "<host>" (fetched) or a local directory
    plan: list[str] = field(default_factory=list)
    deploy: DeployResult | None = None
    error: FtctlError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "from": {"profile": self.source, "hosts": [v.to_dict() for v in self.staging]},
            "to": self.target,
            "release": self.release,
            "sha256": self.digest,
            "gate": self.gate,
            "files_from": self.files_from,
            "plan": self.plan,
            "deploy": self.deploy.to_dict() if self.deploy else None,
            "error": self.error.to_dict() if self.error else None,
        }


# --------------------------------------------------------------------------- staging


def _read_release(session: Session, release: str) -> tuple[str, str]:
    """(manifest.json, eval_report.json) of one release, as text ('' when absent)."""
    d = f"{session.cfg.remote_dir}/releases/{release}"
    _rc, out, _err = session.run(
        f"cat {q(d + '/' + MANIFEST)} 2>/dev/null; echo; echo {_MARK}; "
        f"cat {q(d + '/' + EVAL_REPORT)} 2>/dev/null; true",
        what="read the live release's manifest",
    )
    manifest, _, report = out.partition(_MARK)
    return manifest.strip(), report.strip()


def look(session: Session) -> StagingView:
    """One staging host: its live release, digest, gate record and health (read-only)."""
    view = StagingView(host=session.host)
    st = probe(session)
    if st.lock:
        view.health = f"a deploy is in progress (lock held by {describe_lock(st.lock)})"
        return view
    if st.link != "link" or st.live is None:
        view.health = f"{session.cfg.link_name} is {st.link}: no ftctl release is live"
        return view
    view.live = st.live
    manifest, report = _read_release(session, st.live)
    try:
        view.files = {str(k): str(v) for k, v in json.loads(manifest)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        view.health = (
            f"releases/{st.live} has no readable {MANIFEST} (promote takes releases ftctl "
            "trained: the manifest lists what every file must hash to)"
        )
        return view
    view.digest = tree_digest(view.files)
    if report:
        try:
            view.gate = json.loads(report)
        except ValueError:
            view.gate = {"verdict": None, "error": f"{EVAL_REPORT} is not JSON"}
    view.healthy, view.health = health_now(session, view.digest)
    return view


def choose(views: list[StagingView], profile: str) -> StagingView:
    """The release every staging host serves, healthy; PromoteRefused otherwise."""
    sick = [v for v in views if not v.healthy]
    if sick:
        raise PromoteRefused(
            f"[deploy.{profile}] is not healthy, so nothing is promoted: "
            + "; ".join(f"{v.host}: {v.live or '-'}: {v.health}" for v in sick),
            hint=f"fix {profile} first (`ftctl status --profile {profile}`); promote takes only "
            "a release that is live and healthy on every host",
        )
    digests = {v.digest for v in views}
    if len(digests) > 1:
        raise PromoteRefused(
            f"[deploy.{profile}] is mixed: "
            + "; ".join(f"{v.host} serves {v.live} ({(v.digest or '')[:8]})" for v in views),
            hint=f"deploy one release to every {profile} host, check it, then promote",
        )
    return views[0]


def check_verdict(view: StagingView) -> dict:
    """The gate record of the chosen release: a PASS for this very model, or GateFailed."""
    gate = view.gate
    if gate is None:
        raise GateFailed(
            f"releases/{view.live} on {view.host} carries no gate verdict ({EVAL_REPORT})",
            hint="deploy to staging what `ftctl pipeline` gated, or run `ftctl eval --model-path "
            "DIR --baseline LIVE --report-dir DIR` before `ftctl deploy` (it writes the verdict "
            "into the model directory)",
        )
    detail = gate.get("gate") if isinstance(gate.get("gate"), dict) else {}
    if gate.get("verdict") != "PASS":
        reasons = "; ".join(map(str, detail.get("reasons") or []))[:500]
        raise GateFailed(
            f"releases/{view.live} on {view.host}: its gate verdict is {gate.get('verdict')}"
            + (f" ({reasons})" if reasons else ""),
            hint="only a release whose gate passed goes to production",
        )
    if detail.get("model_digest") != view.digest:
        raise GateFailed(
            f"releases/{view.live} on {view.host}: its gate verdict is for another model "
            f"({str(detail.get('model_digest'))[:8]}, the release is {(view.digest or '')[:8]})",
            hint="re-run the gate on this model (ftctl eval --baseline ... --report-dir ...)",
        )
    return gate


# --------------------------------------------------------------------------- the files


def _get(session: Session, sftp, remote: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sftp.open(remote, "rb") as src, open(local, "wb") as dst:
            if hasattr(src, "prefetch"):
                src.prefetch()
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except OSError as exc:
        raise DeployError(
            f"{session.host}: cannot fetch {remote}: {exc}",
            hint="the release on staging is incomplete; redeploy it to staging, or pass a local "
            "copy with --model-path",
        ) from None


def _place(src: Path, dst: Path) -> None:
    """A hard link to the local copy's file (no second copy of the weights), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def gather(session: Session, view: StagingView, dest: Path, local: Path | None) -> Path:
    """The release's files in ``dest``: its manifest.json and eval_report.json from staging,
    the content from ``local`` (a copy whose digest matches) or from staging; every file
    checked against the manifest. DeployError when one does not hash to it."""
    src = f"{session.cfg.remote_dir}/releases/{view.live}"
    sftp = session.conn.sftp()
    for name in (MANIFEST, EVAL_REPORT):
        _get(session, sftp, f"{src}/{name}", dest / name)
    for rel, sha in sorted(view.files.items()):
        check_relpath(rel, dest)
        if local is not None:
            _place(local / rel, dest / rel)
        else:
            _get(session, sftp, f"{src}/{rel}", dest / rel)
        if sha256_file(dest / rel) != sha:
            where = str(local / rel) if local is not None else f"{session.host}:{src}/{rel}"
            raise DeployError(
                f"{where} does not hash to the sha256 in the release's {MANIFEST}",
                hint="the release on staging (or your copy) is damaged; redeploy it to staging",
            )
    if load_local_model(dest).digest != view.digest:
        raise DeployError(f"{session.host}: releases/{view.live} changed while it was fetched")
    return dest


def _local_copy(path: Path | None, view: StagingView) -> Path | None:
    if path is None:
        return None
    digest = load_local_model(path).digest
    if digest != view.digest:
        raise PromoteRefused(
            f"--model-path {path} is {digest[:8]}, staging serves {view.live} "
            f"({(view.digest or '')[:8]})",
            hint="pass a copy of the release staging serves, or leave --model-path out to fetch "
            "it from staging",
        )
    return path


# --------------------------------------------------------------------------- promote


def _on(env: Env, hosts: list, fn) -> list:
    """``fn(session)`` on each of ``hosts`` of ``env``, in order."""
    return list(per_host(env.cfg, hosts, env.connect, fn).values())


def origin(source: Env, view: StagingView, gate: dict, dest: Path) -> dict:
    """The ``promoted_from`` record of production's deploys.log entry."""
    detail = gate.get("gate") or {}
    return {
        "profile": source.name,
        "hosts": [str(h) for h in source.hosts],
        "release": view.live,
        "sha256": view.digest,
        "gate": {
            "verdict": gate.get("verdict"),
            "report": detail.get("report"),
            "report_sha256": detail.get("report_sha256"),
            "eval_report_sha256": sha256_file(dest / EVAL_REPORT),
        },
    }


def promote(
    source: Env,
    target: Env,
    *,
    local_copy: Path | None = None,
    dry_run: bool = False,
    reporter: Reporter = NULL,
) -> PromoteResult:
    """Take the release live and healthy on every ``source`` host to ``target`` (see the module
    docstring). A refusal raises; a failed production deploy is in ``result.error``."""
    result = PromoteResult(source.name, target.name, dry_run=dry_run)
    reporter.stage(f"promote: look at [deploy.{source.name}] ({len(source.hosts)} host(s))")
    result.staging = _on(source, source.hosts, look)
    view = choose(result.staging, source.name)
    result.release, result.digest = view.live, view.digest
    result.gate = check_verdict(view)
    local = _local_copy(local_copy, view)
    result.files_from = str(local) if local is not None else result.staging[0].host
    result.plan = _plan(source, target, view, local)
    if dry_run:
        return result
    with tempfile.TemporaryDirectory(prefix="ftctl-promote-") as tmp:
        reporter.stage(f"promote: {view.live} from {result.files_from}, checked file by file")
        dest = Path(tmp) / "final"
        _on(source, source.hosts[:1], lambda session: gather(session, view, dest, local))
        note = {"promoted_from": origin(source, view, result.gate, dest)}
        reporter.stage(f"promote: deploy {view.live} to [deploy.{target.name}]")
        result.deploy = deploy(
            dest, target.cfg, target.hosts, target.connect, release=view.live, note=note,
            reporter=reporter,
        )  # fmt: skip
    result.error = result.deploy.error
    return result


def _plan(source: Env, target: Env, view: StagingView, local: Path | None) -> list[str]:
    cfg = target.cfg
    where = f"the local copy {local}" if local else f"{view.host}:releases/{view.live}"
    return [
        f"take {view.live} ({(view.digest or '')[:8]}): live and healthy on every "
        f"[deploy.{source.name}] host, gate PASS",
        f"files from {where}, each checked against the release's {MANIFEST}",
        f"deploy to [deploy.{target.name}] ({', '.join(map(str, target.hosts))}) as {view.live}: "
        f"transfer {cfg.transfer}, go-live by {cfg.reload_cmd or cfg.restart_cmd}, health "
        f"{cfg.health_url or cfg.health_cmd or 'unchecked'}"
        + (f", canary {cfg.canary}" if cfg.canary else ""),
        f"deploys.log on [deploy.{target.name}] records promoted_from: {source.name} "
        f"{view.live} and its gate report",
    ]
