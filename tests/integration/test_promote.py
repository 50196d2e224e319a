"""ftctl promote between two real servers (each its own sshd, supervisord and `ftctl serve`):
it refuses an unhealthy staging and a failed gate (production untouched), and promotes a
healthy release with the same name and digest, recording where it came from."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import EvalConfig
from ftctl.demo.localserver import LocalServer, http_json, wait_http
from ftctl.deploy import deploy
from ftctl.deploy.promote import Env, promote
from ftctl.errors import ExitCode, GateFailed, PromoteRefused
from ftctl.manifest import model_digest, write_manifest
from ftctl.remote import connect, parse_host

pytestmark = [pytest.mark.integration, pytest.mark.slow]
runner = CliRunner()


def gated(src: Path, dest: Path, repo: Path, *, verdict: str = "PASS") -> Path:
    """A copy of ``src`` with the gate's record in it, from a real eval (against itself: an
    identical model passes); ``verdict="FAIL"`` records a failed gate instead."""
    from ftctl.eval.evaluate import run_eval
    from ftctl.eval.report import write_report, write_verdict

    shutil.copytree(src, dest)
    write_manifest(dest, {"kind": "test"})  # what ftctl train writes beside the weights
    settings = EvalConfig(test_data=repo / "data" / "test_cases.jsonl", samples=40, device="cpu")
    report = run_eval(dest, settings, baseline_dir=dest)
    if verdict == "FAIL":
        report["gate"] |= {"verdict": "FAIL", "reasons": ["CLOCK_IN recall -30.0 points"]}
    write_report(report, dest.parent / "reports")
    write_verdict(report, dest.parent / "reports", dest)
    return dest


@dataclasses.dataclass
class Side:
    server: LocalServer

    @property
    def cfg(self):  # reload (SIGHUP) instead of a restart: torch is not imported again
        cfg = self.server.deploy_config(())
        return dataclasses.replace(cfg, reload_cmd=self.server.supervisor.reload_cmd,
                                   health_timeout=60.0)  # fmt: skip

    def env(self, name: str) -> Env:
        cfg = self.cfg
        hosts = [parse_host(h, cfg.user, cfg.port) for h in cfg.hosts]
        return Env(name, cfg, hosts, lambda spec: connect(spec, cfg))

    @property
    def remote(self) -> Path:
        return self.server.remote_dir

    def log(self) -> list[dict]:
        path = self.remote / "deploys.log"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def state(self) -> tuple:
        final = self.remote / "final"
        return (final.is_symlink() and str(final.readlink()), len(self.log()))


@pytest.fixture(scope="module")
def sides(tmp_path_factory, deploy_models):
    root = tmp_path_factory.mktemp("promote")
    servers = []
    try:
        for name in ("staging", "production"):
            servers.append(LocalServer(root / name, deploy_models["a"], ssh=True).start())
        yield Side(servers[0]), Side(servers[1])
    finally:
        for s in servers:
            s.close()


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, deploy_models, repo_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gated")
    return {
        "pass": gated(deploy_models["b"], root / "pass" / "final", repo_root),
        "fail": gated(deploy_models["c"], root / "fail" / "final", repo_root, verdict="FAIL"),
    }


def to_staging(staging: Side, model: Path) -> str:
    cfg = staging.cfg
    res = deploy(model, cfg, staging.env("staging").hosts, lambda spec: connect(spec, cfg))
    assert res.ok, res.error
    return res.hosts[0].release


def toml(tmp_path: Path, staging: Side, production: Side) -> Path:
    def table(name: str, cfg) -> str:
        return (
            f"[deploy.{name}]\nhosts = {json.dumps(list(cfg.hosts))}\n"
            f'identity = "{cfg.identity}"\nknown_hosts = "{cfg.known_hosts}"\n'
            f'remote_dir = "{cfg.remote_dir}"\nrestart_cmd = {json.dumps(cfg.restart_cmd)}\n'
            f"reload_cmd = {json.dumps(cfg.reload_cmd)}\n"
            f'health_url = "{cfg.health_url}"\nhealth_timeout = 60.0\n'
        )

    path = tmp_path / "ftctl.toml"
    path.write_text(table("staging", staging.cfg) + table("production", production.cfg))
    return path


def test_promote_refuses_a_failed_gate_and_production_is_untouched(sides, candidates, tmp_path):
    staging, production = sides
    release = to_staging(staging, candidates["fail"])
    before = production.state()
    with pytest.raises(GateFailed, match=f"releases/{release} .*its gate verdict is FAIL"):
        promote(staging.env("staging"), production.env("production"))
    result = runner.invoke(app, ["--config", str(toml(tmp_path, *sides)), "promote", "--json"])
    assert result.exit_code == ExitCode.GATE
    assert json.loads(result.stdout)["error"] == "GateFailed"
    assert production.state() == before


def test_promote_refuses_an_unhealthy_staging(sides, candidates, tmp_path):
    staging, production = sides
    to_staging(staging, candidates["pass"])
    before = production.state()
    sup = staging.server.supervisor
    assert sup.ctl("stop", sup.name).returncode == 0
    try:
        with pytest.raises(PromoteRefused, match="is not healthy, so nothing is promoted"):
            promote(staging.env("staging"), production.env("production"))
        cli = runner.invoke(app, ["--config", str(toml(tmp_path, *sides)), "promote"])
        assert cli.exit_code == ExitCode.DEPLOY and "not healthy" in cli.output
    finally:
        sup.ctl("start", sup.name)
        assert wait_http(f"{staging.server.url}/health", 60)
    assert production.state() == before


def test_promote_takes_the_healthy_staging_release_to_production_unchanged(
    sides, candidates, tmp_path
):
    staging, production = sides
    release = to_staging(staging, candidates["pass"])
    digest = model_digest(candidates["pass"])
    config = toml(tmp_path, *sides)
    dry = runner.invoke(app, ["--config", str(config), "promote", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["release"] == release and production.log() == []

    result = runner.invoke(app, ["--config", str(config), "promote", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["release"], doc["sha256"], doc["gate"]["verdict"]) == (release, digest, "PASS")
    # the same release name and content digest on production, live and served
    assert str((production.remote / "final").readlink()) == f"releases/{release}"
    assert model_digest(production.remote / "releases" / release) == digest
    assert http_json(f"{production.server.url}/health")["sha256"] == digest
    # the gate's record travelled too, byte for byte
    for name in ("eval_report.json", "manifest.json"):
        assert (production.remote / "releases" / release / name).read_bytes() == (
            staging.remote / "releases" / release / name
        ).read_bytes()
    entry = production.log()[-1]
    assert entry["ok"] and entry["release"] == release and entry["sha256"] == digest
    origin = entry["promoted_from"]
    assert (origin["profile"], origin["release"], origin["sha256"]) == ("staging", release, digest)
    report = json.loads((candidates["pass"] / "eval_report.json").read_text())["gate"]
    assert origin["gate"]["report_sha256"] == report["report_sha256"]
    assert origin["gate"]["report"] == report["report"]

    listing = runner.invoke(app, ["--config", str(config), "releases", "--profile", "production",
                                  "--json"])  # fmt: skip
    (rows,) = json.loads(listing.stdout)["hosts"].values()
    (live,) = [r for r in rows if r["live"]]
    assert live["name"] == release and live["eval_report"]["verdict"] == "PASS"

    with pytest.raises(PromoteRefused, match=r"--model-path .* staging serves"):
        promote(staging.env("staging"), production.env("production"),
                local_copy=candidates["fail"])  # fmt: skip
    again = promote(staging.env("staging"), production.env("production"),
                    local_copy=candidates["pass"])  # fmt: skip
    assert again.ok and again.deploy.hosts[0].reused  # idempotent: nothing sent
    assert again.files_from == str(candidates["pass"])
