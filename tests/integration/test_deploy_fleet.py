"""Two servers: parallel upload, one-at-a-time go-live, canary, revert on failure.

Both are real sshd's on loopback with their own supervisord and `ftctl serve`. A fleet shares
one config (remote_dir, commands), so server B's sshd runs in its own mount namespace where B's
directory is mounted over A's path: each server's sessions see their own releases, link,
health script and supervisor at the same path, as on two machines."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import DeployConfig
from ftctl.deploy import deploy
from ftctl.localserver import LocalSSHD, Supervisor, free_port, wait_http
from ftctl.manifest import model_digest
from ftctl.remote import connect, parse_host
from tests.integration.ssh_fixtures import lock_free

pytestmark = pytest.mark.integration

HEALTH = r"""
import json, os, sys, urllib.request
here = os.path.dirname(os.path.abspath(__file__))
port = int(open(os.path.join(here, "port")).read())
with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
    body = json.load(r)
target = os.readlink(os.path.join(here, "srv", "model", "final"))
if os.path.exists(os.path.join(here, "reject-new")) and not target.endswith("-original"):
    sys.exit("this server rejects every new model")
tag = target.rsplit("-", 1)[-1]
sys.exit(0 if tag == "original" or body["sha256"][:8] == tag else 1)
"""


class Server:
    def __init__(self, root: Path, seen_at: Path, model: Path, key: Path | None = None) -> None:
        self.root = root  # its real directory
        self.seen_at = seen_at  # where its own sessions see it (A's path)
        self.port = free_port()
        self.reset(model)
        (root / "port").write_text(str(self.port))
        (root / "health.py").write_text(HEALTH)
        ftctl = str(Path(sys.executable).parent / "ftctl")
        final = root / "srv" / "model" / "final"
        cmd = [ftctl, "serve", "--model-path", str(final), "--port", str(self.port)]
        self.sup = Supervisor(root / "sup", cmd, env={"OMP_NUM_THREADS": "1"}).start()
        self.sshd = LocalSSHD(root.parent / f"sshd-{root.name}")
        if key is not None:  # one deploy key for the fleet, as in one [deploy.<profile>]
            for suffix in ("", ".pub"):
                shutil.copy(f"{key}{suffix}", f"{self.sshd.client_key}{suffix}")
        if root != seen_at:
            self.sshd.prefix = [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" "$1" && shift && exec "$@"', str(root), str(seen_at),
            ]  # fmt: skip
        try:
            self.sshd.start()
            assert wait_http(f"http://127.0.0.1:{self.port}/health", 120), "no service"
        except BaseException:
            self.close()
            raise

    def reset(self, model: Path) -> None:
        srv = self.root / "srv" / "model"
        if srv.exists():
            shutil.rmtree(srv)
        srv.mkdir(parents=True)
        shutil.copytree(model, srv / "final")
        (self.root / "reject-new").unlink(missing_ok=True)

    def health(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.load(r)

    def link(self) -> str:
        return str((self.root / "srv" / "model" / "final").readlink())

    def log(self) -> list[dict]:
        path = self.root / "srv" / "model" / "deploys.log"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def wait_serving(self, digest: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health()["sha256"] == digest:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.root.name} not serving {digest[:8]}")

    def close(self) -> None:
        self.sup.close()
        self.sshd.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, deploy_models):
    root = tmp_path_factory.mktemp("fleet")
    a_dir, b_dir = root / "hostA", root / "hostB"
    a_dir.mkdir()
    b_dir.mkdir()
    a = Server(a_dir, a_dir, deploy_models["a"])
    try:
        servers = [a, Server(b_dir, a_dir, deploy_models["a"], key=a.sshd.client_key)]
    except BaseException:
        a.close()
        raise
    yield servers
    for s in servers:
        s.close()


def _cfg(servers) -> tuple[DeployConfig, list]:
    a = servers[0]
    known = a.root.parent / "known_hosts"
    known.write_text("".join(s.sshd.host_key_line() for s in servers))
    cfg = DeployConfig(
        identity=a.sshd.client_key,
        known_hosts=known,
        remote_dir=str(a.seen_at / "srv" / "model"),
        restart_cmd=a.sup.restart_cmd,  # each server's own supervisor, at the same path
        reload_cmd=a.sup.reload_cmd,
        health_cmd=f"{sys.executable} {a.seen_at / 'health.py'}",
        health_timeout=30.0,
        link_timeout=10.0,
    )
    return cfg, [parse_host(s.sshd.host) for s in servers]


def _connect(servers, cfg):
    return lambda spec: connect(spec, cfg)


def _reset(servers, model) -> None:
    for s in servers:
        s.reset(model)
        s.sup.ctl("signal", "HUP", s.sup.name)
        s.wait_serving(model_digest(model))


def test_second_host_fails_its_health_check_and_the_first_is_reverted(fleet, deploy_models):
    _reset(fleet, deploy_models["a"])
    a, b = fleet
    (b.root / "reject-new").touch()
    cfg, hosts = _cfg(fleet)
    res = deploy(deploy_models["b"], cfg, hosts, _connect(fleet, cfg))
    assert not res.ok and res.error.exit_code == 5, res.error
    ha, hb = res.hosts
    assert hb.rolled_back and ha.ok and ha.reverted
    assert a.link().endswith("-original") and b.link().endswith("-original")
    a.wait_serving(model_digest(deploy_models["a"]))
    b.wait_serving(model_digest(deploy_models["a"]))
    assert [e["action"] for e in a.log()] == ["deploy", "revert"]
    assert [e["ok"] for e in a.log()] == [True, True]
    assert {e["id"] for e in a.log() + b.log()} == {res.id}  # one id across the fleet
    assert not b.log()[-1]["ok"] and b.log()[-1]["rolled_back"]


def test_canary_then_the_rest_and_releases_shows_each_live(fleet, deploy_models):
    _reset(fleet, deploy_models["a"])
    cfg, hosts = _cfg(fleet)
    cfg = DeployConfig(**{**cfg.__dict__, "canary": 1})
    res = deploy(deploy_models["b"], cfg, hosts, _connect(fleet, cfg))
    assert res.ok, res.error
    assert [h.canary for h in res.hosts] == [True, False]
    assert all(h.method == "rsync" and h.uploaded_bytes > 0 for h in res.hosts)
    for s in fleet:
        s.wait_serving(model_digest(deploy_models["b"]))
    args = ["releases", "--known-hosts", str(cfg.known_hosts), "--remote-dir", cfg.remote_dir,
            "--identity", str(cfg.identity)]  # fmt: skip
    for h in hosts:
        args += ["--host", str(h)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "live per host:" in r.output
    assert r.output.count(res.hosts[0].release[:14]) >= 2  # both hosts, same content


def test_on_failure_stop_leaves_the_switched_host_on_the_new_model(fleet, deploy_models):
    _reset(fleet, deploy_models["a"])
    a, b = fleet
    (b.root / "reject-new").touch()
    cfg, hosts = _cfg(fleet)
    cfg = DeployConfig(**{**cfg.__dict__, "on_failure": "stop"})
    res = deploy(deploy_models["c"], cfg, hosts, _connect(fleet, cfg))
    assert not res.ok and res.hosts[1].rolled_back and not res.hosts[0].reverted
    a.wait_serving(model_digest(deploy_models["c"]))
    b.wait_serving(model_digest(deploy_models["a"]))
    for s in fleet:
        assert lock_free(s.root / "srv" / "model")
