"""A real deploy target: OpenSSH's sshd on loopback + supervisord running `ftctl serve` as
program `python-services` over <remote_dir>/final. Session-scoped servers; each test gets the
server reset to "a real final/ directory holding model A, service up" (the seed's state)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftctl.config import DeployConfig
from ftctl.demo.localserver import LocalSSHD, Supervisor, free_port, http_json, wait_http
from ftctl.manifest import model_digest
from ftctl.remote import connect, parse_host
from tests.helpers import make_tiny_model

__all__ = [
    "DeployTarget",
    "deploy_models",
    "deploy_target",
    "lock_free",
    "sshd_py36",
    "sshd_server",
    "target_services",
    "wait_until",
]


def wait_until(pred, timeout: float, what: str, step: float = 0.02):
    """``pred()``'s first truthy value within ``timeout`` seconds (else AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s: {what}")


def lock_free(remote_dir: Path) -> bool:
    """No process holds the deploy lock (flock on <remote_dir>/.deploy.lock) now."""
    import fcntl

    try:
        fd = os.open(Path(remote_dir) / ".deploy.lock", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@dataclass
class DeployTarget:
    sshd: LocalSSHD
    supervisor: Supervisor
    remote_dir: Path
    port: int
    cfg: DeployConfig

    @property
    def host(self) -> str:
        return self.sshd.host

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def health(self) -> dict:
        return http_json(self.health_url)

    def predict(self, text: str) -> dict:
        return http_json(f"http://127.0.0.1:{self.port}/predict", {"text": text})

    def specs(self):
        return [parse_host(self.host)]

    def connect(self, cfg: DeployConfig | None = None):
        cfg = cfg or self.cfg
        return lambda spec: connect(spec, cfg)

    def ssh_args(self, cfg: DeployConfig | None = None) -> list[str]:
        """The CLI flags that reach this target as ``cfg`` does (any ftctl command)."""
        c = cfg or self.cfg
        return [
            "--host", c.hosts[0], "--identity", str(c.identity), "--known-hosts",
            str(c.known_hosts), "--remote-dir", c.remote_dir, "--remote-python", c.remote_python,
        ]  # fmt: skip

    def cli_args(self, cfg: DeployConfig | None = None) -> list[str]:
        """``ssh_args`` and the go-live's commands (deploy, rollback)."""
        c = cfg or self.cfg
        args = self.ssh_args(c)
        args += ["--reload-cmd", c.reload_cmd] if c.reload_cmd else ["--restart-cmd", c.restart_cmd]
        if c.health_url:
            args += ["--health-url", c.health_url, "--health-timeout", f"{c.health_timeout:g}"]
        return args

    def client(self, model: Path, log: Path, *extra: str, cfg: DeployConfig | None = None,
               env: dict | None = None) -> subprocess.Popen:  # fmt: skip
        """`ftctl deploy` of ``model`` as its own process, its output in ``log``."""
        args = [sys.executable, "-m", "ftctl", "deploy", "--model", str(model),
                *self.cli_args(cfg), *extra]  # fmt: skip
        with open(log, "wb") as fh:
            return subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            )  # fmt: skip

    def with_(self, **changes) -> DeployConfig:
        return dataclasses.replace(self.cfg, **changes)

    def through(self, sshd: LocalSSHD) -> DeployTarget:
        """This target reached through another sshd of the same machine (``sshd_py36``: the
        same remote_dir and service, but its sessions' python3 is 3.6.15)."""
        cfg = self.with_(hosts=(sshd.host,), identity=sshd.client_key, known_hosts=sshd.known_hosts)
        return dataclasses.replace(self, sshd=sshd, cfg=cfg)

    def link_target(self) -> str:
        return str((self.remote_dir / "final").readlink())

    def releases(self) -> list[str]:
        d = self.remote_dir / "releases"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def log_lines(self) -> list[dict]:
        log = self.remote_dir / "deploys.log"
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def status_doc(self) -> dict:
        """The go-live's status file on the server ({} while there is none)."""
        try:
            return json.loads((self.remote_dir / ".ftctl" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_serving(self, digest: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health()["sha256"] == digest:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"service not serving {digest[:8]} after {timeout}s")


@pytest.fixture(scope="session")
def deploy_models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny real models (different seeds -> different digests) and a broken one."""
    root = tmp_path_factory.mktemp("deploy-models")
    models = {name: make_tiny_model(root / name / "final", seed=i) for i, name in enumerate("abc")}
    broken = root / "broken" / "final"
    shutil.copytree(models["c"], broken)
    (broken / "config.json").write_text('{"model_type": "bert", "id2label": ', encoding="utf-8")
    models["broken"] = broken
    return models


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    sshd = LocalSSHD(tmp_path_factory.mktemp("sshd")).start()
    yield sshd
    sshd.close()


PY36 = Path("/root/.pyenv/versions/3.6.15/bin/python3.6")  # pyenv's, on these machines
# where a root session finds `python3`: root's login shell puts pyenv's shims first on PATH
PYTHON3_PATHS = ("/usr/bin/python3", "/root/.pyenv/shims/python3")


@pytest.fixture(scope="session")
def sshd_py36(tmp_path_factory):
    """An sshd whose sessions' `python3` IS Python 3.6.15 (CentOS 7's and Ubuntu 18.04's
    generation): it runs in a private mount namespace where 3.6 is bound over every python3 a
    session could find. Same filesystem otherwise: it serves the same remote_dir."""
    sshd = LocalSSHD(tmp_path_factory.mktemp("sshd-py36"))
    binds = " ".join(PYTHON3_PATHS)
    sshd.prefix = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f'for t in {binds}; do mount --bind "$0" "$t" || exit 1; done; exec "$@"', str(PY36),
    ]  # fmt: skip
    sshd.start()
    try:
        got = ssh_run(sshd, "command -v python3; python3 -V 2>&1")
        assert got.split() == ["/root/.pyenv/shims/python3", "Python", "3.6.15"], got
        yield sshd
    finally:
        sshd.close()


def ssh_run(sshd: LocalSSHD, cmd: str) -> str:
    """The output of ``cmd`` run over OpenSSH as a session of ``sshd`` (its login shell)."""
    res = subprocess.run(
        ["ssh", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         f"{sshd.user}@{sshd.address}", cmd],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return res.stdout


@pytest.fixture(scope="session")
def target_services(tmp_path_factory, sshd_server, deploy_models):
    root = tmp_path_factory.mktemp("target")
    remote_dir = root / "srv" / "chinese-roberta-wwm-ext-classifier"
    _reset_remote(remote_dir, deploy_models["a"])
    port = free_port()
    ftctl = str(Path(sys.executable).parent / "ftctl")
    cmd = [ftctl, "serve", "--model-path", str(remote_dir / "final"), "--port", str(port)]
    # one torch thread: the CI machine has 2 cores shared with the test process and sshd
    sup = Supervisor(root / "supervisor", cmd, env={"OMP_NUM_THREADS": "1"}).start()
    if not wait_http(f"http://127.0.0.1:{port}/health", 60):
        sup.close()
        raise RuntimeError(f"ftctl serve did not come up; see {root / 'supervisor'}")
    yield sshd_server, sup, remote_dir, port
    sup.close()


def _reset_remote(remote_dir: Path, model: Path) -> None:
    if remote_dir.exists():
        shutil.rmtree(remote_dir)
    remote_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model, remote_dir / "final")  # the seed's state: a real directory


@pytest.fixture
def deploy_target(target_services, deploy_models) -> DeployTarget:
    """Fresh server state: a real final/ dir with model A, service serving it.

    Deploys reload (SIGHUP) by default: a restart re-imports torch (~10 s here); tests that
    need the restart path set ``restart_cmd`` and ``reload_cmd=None``."""
    sshd, sup, remote_dir, port = target_services
    deadline = time.monotonic() + 30  # the last test's go-live may still be on its last step
    while not lock_free(remote_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    _reset_remote(remote_dir, deploy_models["a"])
    if sup.ctl("signal", "HUP", sup.name).returncode != 0:  # not running (a test broke it)
        sup.ctl("restart", sup.name)
    cfg = DeployConfig(
        hosts=(sshd.host,),
        identity=sshd.client_key,
        known_hosts=sshd.known_hosts,
        remote_dir=str(remote_dir),
        restart_cmd=sup.restart_cmd,
        reload_cmd=sup.reload_cmd,
        health_url=f"http://127.0.0.1:{port}/health",
        health_timeout=30.0,
        connect_timeout=5.0,
        command_timeout=60.0,
        min_free_factor=2.0,
    )
    target = DeployTarget(sshd, sup, remote_dir, port, cfg)
    target.wait_serving(model_digest(deploy_models["a"]), timeout=60)
    return target
