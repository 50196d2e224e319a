"""ftctl.localserver: the real sshd and supervisor behind the demo, the benchmarks and tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftctl.localserver import LocalSSHD, Supervisor, free_port, wait_http

pytestmark = pytest.mark.integration


def test_sshd_from_a_relative_workdir_accepts_the_client_key_and_strict_host_check(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with LocalSSHD(tmp_path.relative_to(tmp_path) / "rel" / "ssh") as sshd:
        assert sshd.workdir.is_absolute()
        out = subprocess.run(
            [
                "ssh",
                "-i",
                str(sshd.client_key),
                "-p",
                str(sshd.port),
                "-o",
                f"UserKnownHostsFile={sshd.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                f"{sshd.user}@127.0.0.1",
                "echo ready",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ready"


def test_supervisor_restarts_its_program(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with Supervisor(tmp_path / "sup", cmd) as sup:
        assert wait_http(f"http://127.0.0.1:{port}/", 20)
        assert sup.ctl("restart", sup.name).returncode == 0
        assert wait_http(f"http://127.0.0.1:{port}/", 20)
    assert not wait_http(f"http://127.0.0.1:{port}/", 2)  # stopped with the supervisor
