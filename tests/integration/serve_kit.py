"""Driving a real `ftctl serve` process: start it, talk raw HTTP to it, load it, stop it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

from ftctl.demo.localserver import free_port
from ftctl.quiet import QUIET_ENV

FTCTL = str(Path(sys.executable).parent / "ftctl")
ENV = {**os.environ, **QUIET_ENV, "OMP_NUM_THREADS": "1"}


def http(url: str, payload=None, *, data: bytes | None = None, timeout: float = 30):
    """(status, JSON body) of one request on a fresh connection."""
    if payload is not None:
        data = json.dumps(payload, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return m is not None and len(body) >= int(m.group(1))


def raw(port: int, request: bytes, *, timeout: float = 5, after=None) -> bytes:
    """Send bytes on a fresh TCP connection; read one whole response (or until the server
    closes, or ``timeout``). ``after(sock)`` runs between sending and reading."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        if after is not None:
            after(s)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while not _complete(data) and (chunk := s.recv(65536)):
                data += chunk
        return data


def raw_to_close(port: int, request: bytes, *, timeout: float = 10) -> tuple[bytes, bool]:
    """Send bytes, then read until the server closes: (all it sent, whether the connection
    was reset rather than closed). A reset while sending counts too."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        try:
            s.sendall(request)
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        return data, False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def json_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def point(link: Path, target: Path) -> None:
    """Swap ``link`` to ``target`` atomically (as deploy does)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


FAULTS = str(Path(__file__).with_name("serve_faults.py"))


class ServeProcess:
    """`ftctl serve` as a child process on a free port; its stderr (JSON lines) in a file, or
    ``stderr`` (a path such as /dev/full, or an fd) instead. ``fault``: run it through
    tests/integration/serve_faults.py with that fault put in."""

    def __init__(self, workdir: Path, model_dir: Path, *args: str, config: str | None = None,
                 env: dict[str, str] | None = None, stderr: str | int | None = None,
                 fault: str | None = None) -> None:  # fmt: skip
        self.workdir = workdir
        self.env = {**ENV, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = workdir / f"serve-{self.port}.log"
        self.stderr = stderr
        cmd = [FTCTL] if fault is None else [sys.executable, FAULTS, fault]
        if config is not None:
            cfg = workdir / f"ftctl-{self.port}.toml"
            cfg.write_text(config, encoding="utf-8")
            cmd += ["--config", str(cfg)]
        cmd += ["serve", "--model-path", str(model_dir), "--port", str(self.port), "--threads", "1"]
        self.cmd = cmd + list(args)
        self.proc: subprocess.Popen | None = None

    running: ClassVar[list[ServeProcess]] = []  # started and not stopped: kill_leftovers()

    def start(self, *, wait: bool = True) -> ServeProcess:
        ServeProcess.running.append(self)
        self._err = open(self.stderr_path, "ab")  # noqa: SIM115 (closed in stop)
        err = self._err
        if isinstance(self.stderr, str):
            err = self._other = open(self.stderr, "wb")  # noqa: SIM115 (closed in stop)
        elif isinstance(self.stderr, int):
            err = self.stderr
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._err, stderr=err, env=self.env
        )
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ftctl serve exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, ValueError):
                code, body = http(self.url + "/health", timeout=2)
                if code == 200:
                    return body
            time.sleep(0.1)
        raise AssertionError(f"ftctl serve not healthy after {timeout}s:\n{self.log()}")

    def health(self) -> dict:
        return http(self.url + "/health")[1]

    def predict(self, text: str) -> dict:
        code, body = http(self.url + "/predict", {"text": text})
        assert code == 200, body
        return body

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def events(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    @classmethod
    def kill_leftovers(cls, keep: list[ServeProcess]) -> None:
        """Kill what a failed test left running, but ``keep`` (a test that passes stops its
        own service; a module's shared one stops with its fixture)."""
        for sp in [sp for sp in cls.running if sp not in keep]:
            cls.running.remove(sp)
            if sp.proc is not None and sp.proc.poll() is None:
                sp.proc.kill()
                sp.proc.wait()

    def stop(self, timeout: float = 60) -> int | None:
        if self in ServeProcess.running:
            ServeProcess.running.remove(self)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        if isinstance(self.stderr, str):
            self._other.close()
        return self.proc.returncode

    def wait_event(self, name: str, timeout: float = 120) -> dict:
        """The first stderr event called ``name``, once it is there."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e.get("event") == name]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {name} event:\n{self.log()}"
            assert self.proc is None or self.proc.poll() is None, self.log()
            time.sleep(0.005)

    def wait_health(self, check, timeout: float = 60) -> dict:
        """/health once ``check(body)`` holds."""
        deadline = time.monotonic() + timeout
        while not check(body := self.health()):
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        return body


class RequestLoop:
    """``threads`` clients POSTing /predict on fresh connections until stopped; every failure
    (no answer, or an answer that is not 200) is kept with its reason."""

    def __init__(self, url: str, threads: int = 2, *, timeout: float = 60) -> None:
        self.url = url + "/predict"
        self.timeout = timeout
        self.ok = 0
        self.digests: set[str] = set()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                code, body = http(self.url, {"text": "查看在产批次"}, timeout=self.timeout)
            except Exception as exc:  # a reset, a refusal, a timeout: all failures
                code, body = 0, {"error": f"{type(exc).__name__}: {exc}"}
            with self._lock:
                if code == 200:
                    self.ok += 1
                    self.digests.add(body["sha256"])
                else:
                    self.failures.append(f"{code}: {body}")

    def __enter__(self) -> RequestLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
