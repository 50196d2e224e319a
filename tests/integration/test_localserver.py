"""ftctl.demo.localserver: the real sshd and supervisor behind the demo, benchmarks and tests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ftctl.demo.localserver import LocalSSHD, Supervisor, free_port, http_json, wait_http

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
                "--",
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


class _Echo(BaseHTTPRequestHandler):
    """GET: {"method": "GET"}; POST: the body it got, as JSON, with its content type; 404
    on /missing."""

    def _answer(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(404 if self.path == "/missing" else 200, {"method": "GET"})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(
            200, {"got": json.loads(raw), "raw": raw.decode(), "type": self.headers["Content-Type"]}
        )

    def log_message(self, *args):
        pass


def test_http_json_gets_and_posts_json():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert http_json(f"{url}/health") == {"method": "GET"}
        answer = http_json(f"{url}/predict", {"text": "帮我打卡"})
        assert answer["got"] == {"text": "帮我打卡"} and answer["type"] == "application/json"
        assert "帮我打卡" in answer["raw"]  # UTF-8 on the wire, not \u escapes
        with pytest.raises(urllib.error.HTTPError):
            http_json(f"{url}/missing")
    finally:
        server.shutdown()
        server.server_close()
