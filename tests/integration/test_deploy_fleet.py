"""Three servers: parallel upload, one-at-a-time go-live, canary and canary wait, revert on
failure, a host whose link drops mid-go-live.

Each is a real sshd on loopback with its own supervisord and `ftctl serve`. A fleet shares one
config (remote_dir, commands), so the sshd's of servers B and C run in their own mount
namespaces where their directory is mounted over A's path: each server's sessions see their own
releases, link, health script and supervisor at the same path, as on three machines. Server C
can be reached through a relay that the tests cut (the link drops) and stop (it stays down)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import DeployConfig
from ftctl.demo.localserver import LocalSSHD, Supervisor, free_port, wait_http
from ftctl.deploy import deploy
from ftctl.errors import ExitCode
from ftctl.manifest import model_digest
from ftctl.progress import NullReporter
from ftctl.remote import connect, parse_host
from tests.integration.ssh_fixtures import lock_free
from tests.integration.test_deploy_resilience import Blackhole

pytestmark = pytest.mark.integration

HEALTH = r"""
import json, os, sys, urllib.request
here = os.path.dirname(os.path.abspath(__file__))
port = int(open(os.path.join(here, "port")).read())
with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
    body = json.load(r)
target = os.readlink(os.path.join(here, "srv", "model", "final"))
new = not target.endswith("-original")
if os.path.exists(os.path.join(here, "reject-new")) and new:
    sys.exit("this server rejects every new model")
if os.path.exists(os.path.join(here, "hold-health")) and new:
    sys.exit("held: the test cuts the link now")
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
        for marker in ("reject-new", "hold-health"):
            (self.root / marker).unlink(missing_ok=True)

    def health(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.load(r)

    def link(self) -> str:
        return str((self.root / "srv" / "model" / "final").readlink())

    def serves_original(self) -> bool:
        return self.link().endswith("-original")

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


class Relay(Blackhole):
    """A TCP relay on loopback to an sshd: ``cut()`` closes every connection through it (the
    link drops), ``stop()`` refuses new ones too (the host stays unreachable)."""

    def cut(self) -> None:
        conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() (a close alone would not)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.cut()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, deploy_models):
    root = tmp_path_factory.mktemp("fleet")
    dirs = [root / f"host{name}" for name in "ABC"]
    for d in dirs:
        d.mkdir()
    a = Server(dirs[0], dirs[0], deploy_models["a"])
    servers = [a]
    try:
        for d in dirs[1:]:
            servers.append(Server(d, dirs[0], deploy_models["a"], key=a.sshd.client_key))
    except BaseException:
        for s in servers:
            s.close()
        raise
    yield servers
    for s in servers:
        s.close()


def _cfg(servers, relay: Relay | None = None, **changes) -> tuple[DeployConfig, list]:
    """The fleet's config and hosts; with ``relay``, the last server is reached through it."""
    a = servers[0]
    known = a.root.parent / "known_hosts"
    lines = [s.sshd.host_key_line() for s in servers]
    hosts = [parse_host(s.sshd.host) for s in servers]
    if relay is not None:
        last = servers[-1].sshd
        lines.append(f"[127.0.0.1]:{relay.port} " + last.host_key_line().split(" ", 1)[1])
        hosts[-1] = parse_host(f"{last.user}@127.0.0.1:{relay.port}")
    known.write_text("".join(lines))
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
    return dataclasses.replace(cfg, **changes), hosts


def _connect(servers, cfg):
    return lambda spec: connect(spec, cfg)


def _reset(servers, model) -> None:
    for s in servers:
        s.reset(model)
        s.sup.ctl("signal", "HUP", s.sup.name)
        s.wait_serving(model_digest(model))


def test_second_host_fails_its_health_check_and_the_first_is_reverted(fleet, deploy_models):
    _reset(fleet, deploy_models["a"])
    a, b = fleet[:2]
    (b.root / "reject-new").touch()
    cfg, hosts = _cfg(fleet[:2])
    res = deploy(deploy_models["b"], cfg, hosts, _connect(fleet, cfg))
    assert not res.ok and res.error.exit_code == 5, res.error
    ha, hb = res.hosts
    assert hb.rolled_back and ha.ok and ha.state == "reverted" and hb.state == "rolled_back"
    assert a.link().endswith("-original") and b.link().endswith("-original")
    a.wait_serving(model_digest(deploy_models["a"]))
    b.wait_serving(model_digest(deploy_models["a"]))
    assert [e["action"] for e in a.log()] == ["deploy", "revert"]
    assert [e["ok"] for e in a.log()] == [True, True]
    assert {e["id"] for e in a.log() + b.log()} == {res.id}  # one id across the fleet
    assert not b.log()[-1]["ok"] and b.log()[-1]["rolled_back"]


def test_canary_then_the_rest_and_releases_shows_each_live(fleet, deploy_models):
    _reset(fleet, deploy_models["a"])
    cfg, hosts = _cfg(fleet[:2])
    cfg = dataclasses.replace(cfg, canary=1, canary_wait=2.0)
    res = deploy(deploy_models["b"], cfg, hosts, _connect(fleet, cfg))
    assert res.ok, res.error
    assert [h.canary for h in res.hosts] == [True, False]
    assert all(h.method == "rsync" and h.uploaded_bytes > 0 for h in res.hosts)
    for s in fleet[:2]:
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
    a, b = fleet[:2]
    (b.root / "reject-new").touch()
    cfg, hosts = _cfg(fleet[:2])
    cfg = dataclasses.replace(cfg, on_failure="stop")
    res = deploy(deploy_models["c"], cfg, hosts, _connect(fleet, cfg))
    assert not res.ok and res.hosts[1].rolled_back and res.hosts[0].state == "switched"
    a.wait_serving(model_digest(deploy_models["c"]))
    b.wait_serving(model_digest(deploy_models["a"]))
    for s in fleet[:2]:
        assert lock_free(s.root / "srv" / "model")


# --------------------------------------------------------------------------- three hosts


class Hooked(NullReporter):
    """A reporter that runs ``fn`` once, at the first message for which ``when`` is true."""

    def __init__(self, when, fn) -> None:
        super().__init__()
        self.when, self.fn, self.fired = when, fn, False
        self.seen: list[str] = []

    def _see(self, message: str) -> None:
        self.seen.append(message)
        if not self.fired and self.when(self.seen):
            self.fired = True
            self.fn()

    def stage(self, name: str) -> None:
        self._see(name)

    def info(self, message: str) -> None:
        self._see(message)

    def warn(self, message: str) -> None:
        super().warn(message)
        self._see(message)


def _not_gone_live(server: Server, deploy_id: str) -> dict:
    """The one deploys.log line of a host that never went live."""
    (entry,) = server.log()
    assert entry["id"] == deploy_id and not entry["ok"] and entry["release"] is None
    assert entry["error"].startswith("not gone live: ")
    return entry


def test_a_canary_that_fails_during_the_canary_wait_is_reverted_and_the_rest_untouched(
    fleet, deploy_models
):
    _reset(fleet, deploy_models["a"])
    a, b, c = fleet
    cfg, hosts = _cfg(fleet, canary=1, canary_wait=30.0)
    # the canary's service starts failing health after its go-live passed, as the wait begins
    rep = Hooked(lambda seen: seen[-1].startswith("canary wait:"), (a.root / "reject-new").touch)
    res = deploy(deploy_models["b"], cfg, hosts, _connect(fleet, cfg), reporter=rep)
    assert rep.fired
    assert not res.ok and res.error.exit_code == ExitCode.DEPLOY, res.error
    assert "canary failed during the 30s canary wait" in res.error.message
    assert res.states == {str(hosts[0]): "reverted", str(hosts[1]): "untouched",
                          str(hosts[2]): "untouched"}  # fmt: skip
    assert res.canary.failure.startswith(str(hosts[0])) and res.canary.polls >= 1
    assert "rejects every new model" in res.canary.failure
    for s in fleet:
        assert s.serves_original()
        s.wait_serving(model_digest(deploy_models["a"]))
        assert lock_free(s.root / "srv" / "model")
    assert [(e["action"], e["ok"]) for e in a.log()] == [("deploy", True), ("revert", True)]
    assert {e["id"] for e in a.log()} == {res.id}
    for s in (b, c):
        assert "canary failed" in _not_gone_live(s, res.id)["error"]


def test_a_healthy_canary_is_watched_then_all_three_switched_through_the_cli(fleet, deploy_models):
    _reset(fleet, deploy_models["a"])
    cfg, hosts = _cfg(fleet)
    args = ["deploy", "--model", str(deploy_models["b"]), "--identity", str(cfg.identity),
            "--known-hosts", str(cfg.known_hosts), "--remote-dir", cfg.remote_dir,
            "--restart-cmd", cfg.restart_cmd, "--reload-cmd", cfg.reload_cmd,
            "--health-cmd", cfg.health_cmd, "--health-timeout", "30",
            "--canary", "1", "--canary-wait", "4"]  # fmt: skip
    for h in hosts:
        args += ["--host", str(h)]
    plan = CliRunner().invoke(app, [*args, "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert f"canary: {hosts[0]} go live first" in plan.output
    assert "canary wait: 4s, watching health_cmd" in plan.output
    assert f"then, one at a time: {hosts[1]}, {hosts[2]}" in plan.output
    assert not any((s.root / "srv/model/final").is_symlink() for s in fleet)  # nothing changed
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and set(doc["states"].values()) == {"switched"}
    assert doc["canary"]["hosts"] == [str(hosts[0])] and doc["canary"]["failure"] is None
    assert doc["canary"]["polls"] >= 2  # polled during the wait, not only at its start
    for s in fleet:
        s.wait_serving(model_digest(deploy_models["b"]))
        assert [e["action"] for e in s.log()] == ["deploy"] and s.log()[0]["ok"]


@pytest.mark.parametrize("ending", ["back", "rejected", "gone", "gone-stop"])
def test_a_host_whose_link_drops_mid_go_live_is_unknown(fleet, deploy_models, ending):
    """C's link drops while its go-live checks health (after the swap); the go-live goes on on
    the server. Reached again, C's own outcome counts: it went live ("back": the deploy goes
    on and succeeds) or it rolled back ("rejected": a failure, the others are reverted). Not
    reached within reconnect_timeout, C is unknown: revert puts the others back and names C,
    exit 6 ("gone"); stop leaves the switched hosts and names C, exit 5 ("gone-stop")."""
    _reset(fleet, deploy_models["a"])
    a, b, c = fleet
    relay = Relay(c.sshd.port)
    on_failure = "stop" if ending == "gone-stop" else "revert"
    gone = ending.startswith("gone")
    cfg, hosts = _cfg(fleet, relay, on_failure=on_failure, reconnect_timeout=6.0 if gone else 60.0)
    (c.root / "hold-health").touch()  # C's go-live waits in its health check ...

    def drop() -> None:  # ... until its link is cut
        (relay.stop if gone else relay.cut)()
        if ending == "rejected":
            (c.root / "reject-new").touch()
        (c.root / "hold-health").unlink()

    def c_checks_health(seen: list[str]) -> bool:
        go = [i for i, m in enumerate(seen) if m.startswith("127.0.0.1: go live on the server")]
        return len(go) == 3 and seen[-1].endswith(": health")

    rep = Hooked(c_checks_health, drop)
    try:
        res = deploy(deploy_models["b"], cfg, hosts, _connect(fleet, cfg), reporter=rep)
    finally:
        relay.stop()
    assert rep.fired
    assert any("the link dropped during its go-live" in w for w in rep.warnings)
    states = [h.state for h in res.hosts]
    doc = _wait_done(c)  # the server finished its go-live without us
    if ending == "back":
        assert res.ok, res.error
        assert states == ["switched", "switched", "switched"]
        assert [(e["action"], e["ok"]) for e in c.log()] == [("deploy", True)]
        for s in fleet:
            s.wait_serving(model_digest(deploy_models["b"]))
        return
    assert not res.ok
    if ending == "rejected":
        assert doc["state"] == "rolled_back"
        assert states == ["reverted", "reverted", "rolled_back"]
        assert res.error.exit_code == ExitCode.DEPLOY, res.error
        assert "seen after the link dropped" in res.hosts[2].error["message"]
        for s in fleet:
            assert s.serves_original()
            s.wait_serving(model_digest(deploy_models["a"]))
        return
    assert "lost the go-live's progress" in res.hosts[2].error["message"]
    assert doc["state"] == "ok"
    c.wait_serving(model_digest(deploy_models["b"]))  # its go-live went through, unseen
    if ending == "gone":
        assert states == ["reverted", "reverted", "unknown"]
        assert res.error.exit_code == ExitCode.ROLLBACK_FAILED, res.error
        assert f"{hosts[2]} unknown" in res.error.message and "not reached within 6s" in (
            res.error.message
        )
        assert a.serves_original() and b.serves_original()
    else:
        assert states == ["switched", "switched", "unknown"]
        assert res.error.exit_code == ExitCode.DEPLOY and f"{hosts[2]} unknown" in (
            res.error.message
        )
        assert "ftctl status" in res.error.hint
        a.wait_serving(model_digest(deploy_models["b"]))


def _wait_done(server: Server, timeout: float = 90) -> dict:
    path = server.root / "srv" / "model" / ".ftctl" / "status.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if doc.get("state") not in (None, "running"):
                return doc
        time.sleep(0.2)
    raise AssertionError(f"{server.root.name}: the go-live did not end")


def test_the_canary_wait_polls_the_health_url_from_the_server(deploy_target, deploy_models):
    """One host, `ftctl serve` behind a health URL: the canary wait checks it over SSH, on the
    server, until the wait is over."""
    t = deploy_target
    cfg = t.with_(canary=1, canary_wait=4.0)
    res = deploy(deploy_models["b"], cfg, t.specs(), t.connect(cfg))
    assert res.ok, res.error
    assert res.canary.watched.startswith(f"{t.health_url} polled")
    assert res.canary.polls >= 2 and res.canary.failure is None
    assert res.states == {res.hosts[0].host: "switched"}
    t.wait_serving(model_digest(deploy_models["b"]))
