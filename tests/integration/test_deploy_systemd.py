"""A deploy to the seed's server shape under a REAL systemd (252, PID 1 in a container): the
seed's path, the seed's restart command (`systemctl restart python-services`), no health URL,
and a Type=simple unit with Restart=always. systemd calls such a unit "active" as soon as it
has forked, and it stays "active" while it crash-loops; only MainPID/NRestarts show the loop.

The image (debootstrap'd bookworm + systemd + openssh-server + rsync, on the tests' root base)
is built once per machine and kept by tag; its container runs on the host network with sshd
on a free loopback port (the package's own ssh.service is masked) and is removed at the end.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import docker
from ftctl.cli.main import app
from ftctl.config import SEED_REMOTE_DIR
from ftctl.demo.localserver import free_port, wait_port
from tests.integration.docker_fixtures import ensure_root_base

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.slow]
runner = CliRunner()

IMAGE = "deploy-systemd-test:bookworm"
APP = "/www/wwwroot/python-services/app.py"  # the user's service, beside its models
# units that must not run here: the container shares the host's network (ssh.service would
# take port 22), and logind/gettys have nothing to do in a container
MASKED = ("ssh.service", "ssh.socket", "systemd-logind.service", "getty@.service",
          "console-getty.service", "systemd-networkd.service")  # fmt: skip

SERVICE_UNIT = """[Unit]
Description=intent classifier (the seed's python-services: Type=simple, Restart=always)
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart=/usr/bin/python3 {app}
Restart=always
RestartSec=0.5
"""

SSHD_UNIT = """[Unit]
Description=sshd for the deploy tests (loopback port {port})

[Service]
ExecStart=/usr/sbin/sshd -D -e -p {port} -o ListenAddress=127.0.0.1 \
    -h /etc/ftctl-test/host_key -o AuthorizedKeysFile=/etc/ftctl-test/authorized_keys \
    -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o UsePAM=no \
    -o StrictModes=no -o PermitRootLogin=prohibit-password
RuntimeDirectory=sshd
"""

APP_PY = f'''"""A stand-in for the user's service: loads the model the link points at, or dies."""
import json
import time

time.sleep(0.3)  # loading the model
with open("{SEED_REMOTE_DIR}/final/config.json") as fh:
    json.load(fh)  # a model it cannot load: a traceback, exit 1, and systemd starts it again
while True:
    time.sleep(3600)
'''


def build_image(client) -> None:
    """The tests' root base + systemd, openssh-server and rsync; unwanted units masked."""
    masks = " && ".join(f"ln -sf /dev/null /etc/systemd/system/{u}" for u in MASKED)
    script = (
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends systemd systemd-sysv openssh-server rsync >/dev/null && "
        f"rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_* && {masks}"
    )
    container = client.containers.run(
        ensure_root_base(client), ["sh", "-c", script], network_mode="host", detach=True,
        user="0", name=f"deploy-systemd-build-{os.getpid()}",
    )  # fmt: skip
    try:
        code = container.wait()["StatusCode"]
        if code != 0:
            raise RuntimeError(f"building {IMAGE} failed ({code}):\n{container.logs()[-3000:]}")
        repo, tag = IMAGE.split(":")
        container.commit(
            repo, tag, changes=['CMD ["/lib/systemd/systemd"]', "ENV container=docker"]
        )
    finally:
        container.remove(force=True)


@pytest.fixture(scope="session")
def systemd_image(docker_engine) -> str:
    try:
        docker_engine.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        build_image(docker_engine)
    return IMAGE


@dataclass
class SystemdHost:
    container: object
    port: int
    key: Path
    known_hosts: Path

    def sh(self, cmd: str) -> str:
        code, out = self.container.exec_run(["sh", "-c", cmd])
        text = out.decode(errors="replace")
        assert code == 0, f"{cmd}: {text}"
        return text

    def show(self) -> dict:
        out = self.sh("systemctl show -p MainPID,NRestarts,ActiveState python-services")
        return dict(line.split("=", 1) for line in out.split())

    def args(self) -> list[str]:
        """Only what names the host: the seed's remote_dir and restart command are defaults."""
        return ["--host", f"root@127.0.0.1:{self.port}", "--identity", str(self.key),
                "--known-hosts", str(self.known_hosts), "--health-settle", "5"]  # fmt: skip


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _model_files(model: Path, dest: str) -> dict[str, tuple[bytes, int]]:
    return {f"{dest}/{p.relative_to(model)}": (p.read_bytes(), 0o644)
            for p in model.rglob("*") if p.is_file()}  # fmt: skip


@pytest.fixture(scope="session")
def systemd_host(docker_engine, systemd_image, tmp_path_factory, deploy_models):
    work = tmp_path_factory.mktemp("deploy-systemd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)],
                       check=True)  # fmt: skip
    port = free_port()
    known = work / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {(work / 'host_key.pub').read_text()}")
    container = docker_engine.containers.run(
        systemd_image, "/lib/systemd/systemd", detach=True, name=f"deploy-systemd-{os.getpid()}",
        network_mode="host", stop_signal="SIGRTMIN+3", tmpfs={"/run": "", "/run/lock": ""},
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"}},
    )  # fmt: skip
    host = SystemdHost(container, port, work / "client_key", known)
    try:
        deadline = time.monotonic() + 60
        while "running" not in host.container.exec_run("systemctl is-system-running")[1].decode():
            assert time.monotonic() < deadline, container.logs()[-2000:]
            time.sleep(0.5)
        files = {
            "/etc/ftctl-test/host_key": ((work / "host_key").read_bytes(), 0o600),
            "/etc/ftctl-test/authorized_keys": ((work / "client_key.pub").read_bytes(), 0o600),
            "/etc/systemd/system/ftctl-test-sshd.service": (
                SSHD_UNIT.format(port=port).encode(), 0o644),
            "/etc/systemd/system/python-services.service": (
                SERVICE_UNIT.format(app=APP).encode(), 0o644),
            APP: (APP_PY.encode(), 0o644),
            **_model_files(deploy_models["a"], f"{SEED_REMOTE_DIR}/final"),
        }  # fmt: skip
        container.put_archive("/", _tar(files))
        host.sh("systemctl daemon-reload && systemctl start ftctl-test-sshd python-services")
        assert wait_port(port, 30), host.sh("journalctl -u ftctl-test-sshd --no-pager | tail")
        yield host
    finally:
        container.remove(force=True)


def test_a_crash_looping_type_simple_unit_fails_the_deploy_under_a_real_systemd(
    systemd_host, deploy_models
):
    h = systemd_host
    r = runner.invoke(app, ["deploy", "--model", str(deploy_models["b"]), *h.args()])
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert "health: settled (no health URL)" in last and "set health_url" in last
    r = runner.invoke(app, ["deploy", "--model", str(deploy_models["c"]), *h.args(), "--json"])
    assert r.exit_code == 0, r.output
    good = json.loads(r.stdout)
    assert good["health"] == "settled (no health URL)"
    assert good["hosts"][0]["checks"]["settle"]["ActiveState"] == "active"
    r = runner.invoke(app, ["deploy", "--model", str(deploy_models["broken"]), *h.args(), "--json"])
    assert r.exit_code == 5, r.output  # not "done": the bad model does not stay live
    bad = json.loads(r.stdout)
    assert bad["hosts"][0]["rolled_back"] and "did not stay up" in bad["error"]["message"]
    assert "MainPID" in bad["error"]["message"]  # the crash loop: a new process each time
    live = h.sh(f"readlink {SEED_REMOTE_DIR}/final").strip()
    assert live == f"releases/{good['hosts'][0]['release']}"  # the previous release is back
    settled = h.show()
    time.sleep(2)
    assert h.show() == settled and settled["ActiveState"] == "active"  # and it is over
