"""A real inference server on this machine, for the demo, the benchmarks and the tests.

:class:`LocalSSHD` runs OpenSSH's sshd on a loopback port with throwaway keys;
:class:`Supervisor` runs supervisord with one program (``python-services``: ``ftctl serve``), so
the deploy code drives exactly what it drives in production: SSH, a release directory, a
service manager; :class:`LocalServer` is the two together, laid out like the users' server.
Nothing here is a mock; everything is stopped by ``close()`` / ``with``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftctl.config import DeployConfig
from ftctl.errors import EnvironmentProblem
from ftctl.fsutil import atomic_write_text

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as resp,
        ):
            if resp.status == 200:
                return True
        time.sleep(0.2)
    return False


def http_json(url: str, payload: dict | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GET ``url`` (POST ``payload`` as JSON when given) and return the JSON answer; an HTTP
    error status raises ``urllib.error.HTTPError``."""
    data = None if payload is None else json.dumps(payload, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


class LocalSSHD:
    """sshd on 127.0.0.1:<free port>, host and client keys made fresh in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        user: str | None = None,
        options: dict[str, str] | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
            raise EnvironmentProblem(
                "OpenSSH server not installed (no /usr/sbin/sshd)",
                hint="apt-get install -y openssh-server (or run: bash .ci/setup)",
            )
        self.workdir = Path(workdir).resolve()  # daemons chdir: every path absolute
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.user = user or os.environ.get("USER") or "root"
        self.address = address  # where it listens (a network namespace's address for the WAN bench)
        self.port = free_port()
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.log = self.workdir / "sshd.log"
        self.options = dict(options or {})  # extra sshd_config options (-o KEY=VALUE)
        self.prefix: list[str] = []  # runs sshd under this command (e.g. unshare)
        self._proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def host_key_line(self) -> str:
        pub = (self.host_key.with_suffix(".pub")).read_text().split()
        return f"[{self.address}]:{self.port} {pub[0]} {pub[1]}\n"

    def start(self, *, trust_host_key: bool = True) -> LocalSSHD:
        for key, comment in ((self.host_key, "ftctl-host"), (self.client_key, "ftctl-client")):
            if not key.exists():
                _keygen(key, comment)
        authorized = self.workdir / "authorized_keys"
        atomic_write_text(authorized, self.client_key.with_suffix(".pub").read_text())
        atomic_write_text(self.known_hosts, self.host_key_line() if trust_host_key else "")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        cmd = [
            SSHD, "-D", "-p", str(self.port),
            "-o", f"ListenAddress={self.address}",
            "-h", str(self.host_key),
            "-o", f"AuthorizedKeysFile={authorized}",
            "-o", f"PidFile={self.workdir / 'sshd.pid'}",
            "-o", "StrictModes=no",
            "-o", "PasswordAuthentication=no",
            "-o", "UsePAM=no",
            "-E", str(self.log),
        ]  # fmt: skip
        for key, value in self.options.items():
            cmd += ["-o", f"{key}={value}"]
        self._proc = subprocess.Popen(
            [*self.prefix, *cmd], stdin=subprocess.DEVNULL, start_new_session=True
        )
        if not wait_port(self.port, 10, self.address):
            self.close()
            raise EnvironmentProblem(
                f"sshd did not start on {self.address}:{self.port}",
                hint=f"see {self.log}",
            )
        return self

    def close(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            if self._proc.poll() is None:
                self._proc.kill()
        self._proc = None

    def __enter__(self) -> LocalSSHD:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class Supervisor:
    """supervisord with one program, controlled through its own unix socket."""

    def __init__(self, workdir: Path, command: list[str], *, name: str = "python-services",
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.workdir = Path(workdir).resolve()  # daemons chdir: every path absolute
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.command = command
        self.env = env or {}
        self.conf = self.workdir / "supervisord.conf"
        self.sock = self.workdir / "supervisor.sock"
        self.prefix: list[str] = []  # runs supervisord under this command (e.g. ip netns exec)
        self.pidfile = self.workdir / "supervisord.pid"
        bindir = Path(sys.executable).parent
        self.supervisord = str(bindir / "supervisord")
        self.supervisorctl = str(bindir / "supervisorctl")
        if not Path(self.supervisord).exists():
            raise EnvironmentProblem(
                "supervisor is not installed in this environment",
                hint="pip install supervisor (it is in ftctl[dev]; or run: bash .ci/setup)",
            )

    def _write_conf(self) -> None:
        env = ",".join(f'{k}="{v}"' for k, v in sorted(self.env.items()))
        program = "\n".join(
            line
            for line in (
                f"[program:{self.name}]",
                f"command={shlex.join(self.command)}",
                "autostart=true",
                "autorestart=true",
                "startsecs=1",
                "stopsignal=TERM",
                "stopwaitsecs=10",
                f"stdout_logfile={self.workdir / (self.name + '.log')}",
                "redirect_stderr=true",
                f"environment={env}" if env else "",
            )
            if line
        )
        atomic_write_text(
            self.conf,
            f"""[unix_http_server]
file={self.sock}

[supervisord]
logfile={self.workdir / "supervisord.log"}
pidfile={self.pidfile}
nodaemon=false
silent=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.sock}

{program}
""",
        )

    def ctl_cmd(self, *args: str) -> str:
        """The shell command that runs supervisorctl against this instance."""
        return shlex.join([self.supervisorctl, "-c", str(self.conf), *args])

    @property
    def restart_cmd(self) -> str:
        return self.ctl_cmd("restart", self.name)

    @property
    def reload_cmd(self) -> str:
        return self.ctl_cmd("signal", "HUP", self.name)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.supervisorctl, "-c", str(self.conf), *args], capture_output=True, text=True
        )

    def start(self) -> Supervisor:
        self._write_conf()
        subprocess.run(
            [*self.prefix, self.supervisord, "-c", str(self.conf)], check=True, capture_output=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.sock.exists():
            time.sleep(0.1)
        return self

    def close(self) -> None:
        if self.pidfile.exists():
            self.ctl("stop", "all")
            with contextlib.suppress(ValueError, ProcessLookupError, OSError):
                pid = int(self.pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _LocalFile:
    """A local file with the SFTP file calls deploy uses."""

    def __init__(self, path: str, mode: str) -> None:
        self._fh = open(path, mode)  # noqa: SIM115 - closed by __exit__/close

    def set_pipelined(self, pipelined: bool = True) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _LocalFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LocalSFTP:
    """The calls of paramiko's SFTPClient that deploy uses, on the local filesystem."""

    def open(self, path: str, mode: str = "rb") -> _LocalFile:
        return _LocalFile(path, mode)

    def close(self) -> None:
        pass


def local_connection():
    """A Fabric-Connection-shaped target for this machine (no SSH): the same deploy code runs
    its shell commands through invoke and copies files instead of sending them."""
    from invoke import Context

    class LocalConnection(Context):
        host, user, port = "localhost", os.environ.get("USER", "root"), 0
        is_connected = True
        ftctl_local = True  # deploy runs its commands and pipes as local processes
        _sftp = None

        def sftp(self) -> _LocalSFTP:
            return _LocalSFTP()

        def open(self) -> None:
            pass

        def close(self) -> None:
            pass

    return LocalConnection()


class LocalServer:
    """A demo server: a real sshd, supervisor and ``ftctl serve``, on loopback.

    Laid out like the users' server before ftctl: ``remote_dir/final`` is a real directory
    holding the live (base) model, served by the ``python-services`` program. A go-live
    reloads the service (SIGHUP: ``ftctl serve`` swaps models without failing a request).
    """

    def __init__(self, root: Path, live_model: Path, *, ssh: bool) -> None:
        self.root = root
        self.remote_dir = root / "www" / "python-services" / "models" / "classifier"
        self.remote_dir.mkdir(parents=True)
        shutil.copytree(live_model, self.remote_dir / "final")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ftctl_cmd = [sys.executable, "-m", "ftctl", "serve"]
        self.supervisor = Supervisor(
            root / "supervisor",
            [*ftctl_cmd, "--model-path", str(self.remote_dir / "final"), "--port", str(self.port)],
            env={"OMP_NUM_THREADS": "1"},  # several services share this machine's cores
        )
        self.sshd = LocalSSHD(root / "ssh") if ssh else None

    def launch(self) -> LocalServer:
        """Start sshd and the service; :meth:`wait` for it (several start side by side)."""
        if self.sshd is not None:
            self.sshd.start()
        self.supervisor.start()
        return self

    def wait(self) -> LocalServer:
        if not wait_http(f"{self.url}/health", 90):
            raise EnvironmentProblem(
                f"the local inference service did not come up on {self.url}",
                hint=f"see {self.supervisor.workdir}/python-services.log",
            )
        return self

    def start(self) -> LocalServer:
        return self.launch().wait()

    def deploy_config(self, smoke: Sequence[tuple[str, str]]) -> DeployConfig:
        sshd = self.sshd
        return DeployConfig(
            hosts=(sshd.host if sshd else "local",),
            identity=sshd.client_key if sshd else None,
            known_hosts=sshd.known_hosts if sshd else None,
            remote_dir=str(self.remote_dir),
            restart_cmd=self.supervisor.restart_cmd,
            reload_cmd=self.supervisor.reload_cmd,
            health_url=f"{self.url}/health",
            health_timeout=90.0,
            smoke=tuple(smoke),
            keep_releases=5,
        )

    def target(self, smoke: Sequence[tuple[str, str]] = ()):
        """(DeployConfig, hosts, connect) for the deploy code: over SSH, or local."""
        from ftctl.remote import connect, parse_host

        cfg = self.deploy_config(smoke)
        if self.sshd is None:
            return cfg, ["local"], lambda spec: local_connection()
        return (
            cfg,
            [parse_host(h, cfg.user, cfg.port) for h in cfg.hosts],
            (lambda spec: connect(spec, cfg)),
        )

    def close(self) -> None:
        self.supervisor.close()
        if self.sshd is not None:
            self.sshd.close()
