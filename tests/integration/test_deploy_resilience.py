"""A deployer that dies, a link that goes dead, a server without rsync: against a real sshd,
a real supervisord and real client processes (killed with real signals).

Every test ends with the service answering with a good model and no lock left on the server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ftctl.demo.localserver import LocalSSHD
from ftctl.deploy import Session, deploy
from ftctl.deploy.session import LinkDead, Lock, lock_info
from ftctl.errors import LockHeld
from ftctl.fsutil import atomic_write_text
from ftctl.manifest import model_digest, write_manifest
from tests.integration.ssh_fixtures import lock_free, wait_until

pytestmark = pytest.mark.integration


def _no_lock(t) -> bool:
    return lock_free(t.remote_dir)


def _client(t, model: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """`ftctl deploy` as its own process (restart path: the go-live takes seconds)."""
    cfg = t.with_(reload_cmd=None, health_timeout=60.0)
    return t.client(model, tmp_path / "client.log", *extra, cfg=cfg)


def _kill(proc: subprocess.Popen, sig: int) -> None:
    proc.send_signal(sig)
    proc.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_client_killed_mid_upload_leaves_the_live_model_and_no_lock(
    deploy_target, deploy_models, tmp_path, sig
):
    t = deploy_target
    proc = _client(t, deploy_models["b"], tmp_path, "--bwlimit", "100")  # ~30 s of upload
    wait_until(lambda: list(t.remote_dir.glob(".incoming-*/.model.safetensors.*")), 60, "upload")
    _kill(proc, sig)
    wait_until(lambda: _no_lock(t), 15, "the lock released")
    assert proc.returncode != 0
    t.wait_serving(model_digest(deploy_models["a"]))
    assert not list(t.remote_dir.glob("releases/*-" + model_digest(deploy_models["b"])[:8]))

    def no_rsync() -> bool:  # the client's rsync died with it, the server's followed
        ps = subprocess.run(["pgrep", "-f", "rsync.*" + t.cfg.remote_dir], capture_output=True)
        return ps.stdout.strip() == b""

    wait_until(no_rsync, 30, "no rsync left", 0.5)
    res = deploy(deploy_models["b"], t.cfg, t.specs(), t.connect())
    assert res.ok, res.error
    t.wait_serving(model_digest(deploy_models["b"]))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
@pytest.mark.parametrize("moment", ["swap", "health"], ids=["after-swap", "after-restart"])
def test_client_killed_during_the_go_live_ends_healthy_and_unlocked(
    deploy_target, deploy_models, tmp_path, sig, moment
):
    t = deploy_target
    proc = _client(t, deploy_models["b"], tmp_path)
    reached = {"swap": {"swap", "restart", "health"}, "health": {"health"}}[moment]
    wait_until(
        lambda: t.status_doc().get("step") in reached, 120, f"the go-live at {moment}", 0.005
    )
    _kill(proc, sig)
    doc = wait_until(
        lambda: (s := t.status_doc()).get("state") not in (None, "running") and s, 90, "the end"
    )
    assert doc["state"] == "ok" and doc["health"] == "healthy"
    wait_until(lambda: _no_lock(t), 10, "the lock released as the go-live ends")
    t.wait_serving(model_digest(deploy_models["b"]))
    entry = t.log_lines()[-1]
    assert entry["ok"] and entry["id"] == doc["id"] and entry["release"] == doc["release"]


def test_a_held_lock_is_refused_with_its_owner_and_a_dead_holders_record_is_no_lock(
    deploy_target, deploy_models
):
    t = deploy_target
    session = Session(t.connect()(t.specs()[0]), t.cfg)
    try:
        lock = Lock(session, "deploy", lock_info("deploy", "test")).acquire()
        res = deploy(deploy_models["b"], t.cfg, t.specs(), t.connect())
        assert isinstance(res.error, LockHeld) and lock.info["owner"] in res.error.message
        assert f"since {lock.info['time']}" in res.error.message
        lock.release()
    finally:
        session.conn.close()
    assert _no_lock(t)
    # an owner record left by a holder that died (kill -9): the kernel released its flock,
    # so it is no lock at all; nothing is "broken", and no warning is needed
    dead = {"owner": "ci@old", "pid": 999999, "time": "2026-01-01T00:00:00+00:00"}
    atomic_write_text(t.remote_dir / ".deploy.lock.owner", json.dumps(dead))
    res = deploy(deploy_models["b"], t.cfg, t.specs(), t.connect())
    assert res.ok, res.error
    assert res.hosts[0].warnings == []
    assert _no_lock(t) and not (t.remote_dir / ".deploy.lock.owner").exists()


class Blackhole:
    """A TCP forwarder on loopback that can turn into a dead link (no FIN, no RST: bytes are
    simply no longer passed on), like a cable pulled between two routers."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.dead = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                while self.dead.is_set():  # swallow: the peer never hears of it
                    time.sleep(1)
                b.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        for s in [self.sock, *self.conns]:
            s.close()


def test_a_dead_link_fails_within_a_minute_and_leaves_no_lock(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    hole = Blackhole(t.sshd.port)
    known = tmp_path / "known_hosts"
    key = t.sshd.host_key_line().split(" ", 1)[1]
    atomic_write_text(known, f"[127.0.0.1]:{hole.port} {key}")
    cfg = t.with_(known_hosts=known, bwlimit_kbps=100, link_timeout=6.0)
    spec = [t.specs()[0].__class__(t.specs()[0].user, "127.0.0.1", hole.port)]
    threading.Timer(3.0, hole.dead.set).start()  # mid-upload (the upload takes ~30 s)
    try:
        t0 = time.monotonic()
        res = deploy(deploy_models["b"], cfg, spec, t.connect(cfg))
        took = time.monotonic() - t0
        assert isinstance(res.error, LinkDead), res.error
        assert took < 60 and "no answer" in res.error.message
        wait_until(lambda: _no_lock(t), 2 * cfg.link_timeout + 10, "the server releases the lock")
    finally:
        hole.close()
    t.wait_serving(model_digest(deploy_models["a"]))


@pytest.fixture
def sshd_without_rsync(tmp_path, deploy_target):
    """A second sshd on the same server whose sessions' PATH has every tool but rsync."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(d).iterdir():
            if tool.name != "rsync" and not (bindir / tool.name).exists():
                (bindir / tool.name).symlink_to(tool)
    sshd = LocalSSHD(tmp_path / "sshd", options={"SetEnv": f"PATH={bindir}"}).start()
    yield sshd
    sshd.close()


def test_fallback_without_rsync_on_the_server_links_unchanged_and_sends_whole(
    deploy_target, deploy_models, sshd_without_rsync, tmp_path
):
    t, sshd = deploy_target, sshd_without_rsync
    first = deploy(deploy_models["b"], t.cfg, t.specs(), t.connect())
    assert first.ok and first.hosts[0].method == "rsync"
    model = tmp_path / "b2" / "final"
    shutil.copytree(deploy_models["b"], model)
    os.unlink(model / "manifest.json") if (model / "manifest.json").exists() else None
    cfg_json = json.loads((model / "config.json").read_text())
    cfg_json["ftctl_note"] = "changed"
    atomic_write_text(model / "config.json", json.dumps(cfg_json))
    write_manifest(model, {"kind": "test"})
    cfg = t.with_(identity=sshd.client_key, known_hosts=sshd.known_hosts)
    from ftctl.remote import parse_host

    res = deploy(model, cfg, [parse_host(sshd.host)], t.connect(cfg))
    assert res.ok, res.error
    h = res.hosts[0]
    assert h.method == "sftp" and any("no rsync on the server" in x for x in h.plan)
    assert h.uploaded_files == 2  # config.json and manifest.json; the weights were linked
    weights = model.stat().st_size and (t.remote_dir / "releases" / h.release / "model.safetensors")
    old = t.remote_dir / "releases" / first.hosts[0].release / "model.safetensors"
    assert weights.stat().st_ino == old.stat().st_ino  # a hard link, not a copy
    t.wait_serving(model_digest(model))
