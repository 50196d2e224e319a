"""Talking to one server: shell commands, the go-live program's subcommands, the lock.

A :class:`Session` wraps a Fabric ``Connection`` (or the demo's local stand-in). Short calls
send the go-live program on stdin (``python3 - probe JSON``: nothing is installed for a dry
run); the lock holder and the detached go-live need it as a file, installed once per version
under ``<remote_dir>/.ftctl/``.

The lock is held by a small process on the server (``golive.py hold``) tied to this SSH session:
a heartbeat thread keeps it; if this process dies (kill -9 included) or the link goes dead,
the holder sees EOF or a missed heartbeat and removes the lock. A link that stops answering is
detected here too: the session is closed and the step in progress fails with a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shlex
import socket
import subprocess
import threading
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from ftctl.errors import DeployError, FtctlError, LockHeld

if TYPE_CHECKING:
    from ftctl.config import DeployConfig

PROGRAM = resources.files("ftctl.deploy").joinpath("golive.py").read_bytes()
PROGRAM_SHA8 = hashlib.sha256(PROGRAM).hexdigest()[:8]
HEARTBEAT_S = 3.0  # the client's heartbeat to the lock holder


def q(s: str) -> str:
    return shlex.quote(s)


class LinkDead(DeployError):
    """The SSH link stopped answering."""


class Pipe:
    """A remote process with line-wise stdin/stdout (a paramiko channel or a local process)."""

    def __init__(self, conn: Any, cmd: str) -> None:
        self._buf = b""
        self._lines: queue.Queue[str | None] = queue.Queue()
        if getattr(conn, "ftctl_local", False):
            self._proc: subprocess.Popen | None = subprocess.Popen(
                cmd, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self._chan = None
            threading.Thread(target=self._pump_local, daemon=True).start()
        else:
            self._proc = None
            self._chan = conn.client.get_transport().open_session()
            self._chan.exec_command(cmd)
            threading.Thread(target=self._pump_chan, daemon=True).start()

    def _pump_local(self) -> None:
        assert self._proc and self._proc.stdout
        for raw in self._proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def _pump_chan(self) -> None:
        chan = self._chan
        try:
            while True:
                chunk = chan.recv(65536)
                if not chunk:
                    break
                self._buf += chunk
                while b"\n" in self._buf:
                    line, _, self._buf = self._buf.partition(b"\n")
                    self._lines.put(line.decode("utf-8", "replace"))
        except Exception:  # a dead transport ends the stream like EOF
            pass
        self._lines.put(None)

    def send(self, line: str) -> None:
        self.send_bytes((line + "\n").encode())

    def send_bytes(self, data: bytes) -> None:
        if self._proc is not None:
            assert self._proc.stdin
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        else:
            self._chan.sendall(data)

    def recv(self, timeout: float) -> dict | None:
        """The next JSON line (None at EOF); TimeoutError when nothing came in ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                self._lines.put(None)  # stay at EOF
                return None
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    return doc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._proc is not None:
                if self._proc.stdin:
                    self._proc.stdin.close()
                self._proc.wait(5)
            else:
                self._chan.close()


class Session:
    """One server: ``conn`` plus the deploy config that names its directory and timeouts."""

    def __init__(self, conn: Any, cfg: DeployConfig) -> None:
        self.conn = conn
        self.cfg = cfg
        self.host = conn.host
        self.state_dir = f"{cfg.remote_dir}/.ftctl"
        self.program = f"{self.state_dir}/golive-{PROGRAM_SHA8}.py"
        self.dead: str | None = None  # why the link counts as dead
        self.agent: Lock | None = None  # the lock holder, which also runs subcommands

    @property
    def local(self) -> bool:
        return bool(getattr(self.conn, "ftctl_local", False))

    # ------------------------------------------------------------------ commands

    def fail(self, what: str, exc: BaseException) -> DeployError:
        if self.dead:
            return LinkDead(
                f"{self.host}: {what} failed: {self.dead}",
                hint="check the network; the server releases the lock by itself, and the live "
                "model is untouched unless a step says otherwise (`ftctl status` tells)",
            )
        return DeployError(
            f"{self.host}: {what} failed: {type(exc).__name__}: {exc}",
            hint="check the connection; the live model is untouched unless a step says otherwise",
        )

    def run(self, cmd: str, *, check: bool = True, what: str = "", stdin: bytes | None = None):
        """(exit status, stdout, stderr) of one shell command on the server."""
        what = what or "remote command"
        try:
            rc, out, err = self._exec(cmd, stdin)
        except FtctlError:
            raise
        except Exception as exc:  # paramiko/invoke raise many kinds (timeouts, dropped sessions)
            raise self.fail(what, exc) from None
        if check and rc != 0:
            tail = (err or out).strip()[-500:]
            raise DeployError(
                f"{self.host}: {what} exited {rc}: {tail}",
                hint="fix the server side problem named above and rerun",
            )
        return rc, out, err

    def _exec(self, cmd: str, stdin: bytes | None) -> tuple[int, str, str]:
        timeout = self.cfg.command_timeout
        if self.local:
            res = subprocess.run(
                cmd, shell=True, input=stdin or b"", capture_output=True, timeout=timeout
            )
            return (
                res.returncode,
                res.stdout.decode(errors="replace"),
                res.stderr.decode(errors="replace"),
            )
        chan = self.conn.client.get_transport().open_session()
        try:
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while not (chan.exit_status_ready() and not chan.recv_ready()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no end after {timeout:.0f}s")
                if self.dead:
                    raise ConnectionError(self.dead)
                if chan.recv_ready():
                    out += chan.recv(1 << 16)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                else:
                    chan.status_event.wait(0.05)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            return (
                chan.recv_exit_status(),
                out.decode(errors="replace"),
                err.decode(errors="replace"),
            )
        finally:
            chan.close()

    def call(self, sub: str, req: dict, *, what: str, ok_codes: tuple[int, ...] = (0,)) -> dict:
        """Run a go-live subcommand, return its JSON answer: through the lock holder while one
        is held (no new process), else as ``python3 -`` with the program on stdin."""
        if self.agent is not None:
            ans = self.agent.call(sub, req, what)
            rc, text = ans["rc"], str(ans.get("error", ans))
        else:
            cmd = f"python3 - {sub} {q(json.dumps(req, ensure_ascii=False))}"
            rc, out, err = self.run(cmd, check=False, what=what, stdin=PROGRAM)
            lines = [x for x in out.splitlines() if x.startswith("{")]
            ans = {"rc": rc, **json.loads(lines[-1])} if lines else {"rc": rc}
            text = (err or out).strip()
        if rc not in ok_codes or len(ans) == 1:
            raise DeployError(
                f"{self.host}: {what} exited {rc}: {text[-500:]}",
                hint="the server needs python3 >= 3.8; fix the problem named above and rerun",
            )
        return ans

    def pipe(self, sub: str, req: dict, *, install: bool = False) -> Pipe:
        """The go-live program's ``sub`` as a process with line-wise stdin/stdout. With
        ``install``, the program is first read from stdin (exactly its size) and kept as a
        file if that version is not there yet: one round trip, not two."""
        cmd = f"exec python3 {q(self.program)} {sub} {q(json.dumps(req, ensure_ascii=False))}"
        if install:
            prog, d, n = q(self.program), q(self.state_dir), len(PROGRAM)
            cmd = (
                f"mkdir -p {d} && if test -f {prog}; then head -c {n} >/dev/null; else "
                f"head -c {n} > {prog}.tmp.$$ && mv {prog}.tmp.$$ {prog}; fi && {cmd}"
            )
        try:
            pipe = Pipe(self.conn, cmd)
            if install:
                pipe.send_bytes(PROGRAM)
            return pipe
        except Exception as exc:
            raise self.fail(sub, exc) from None

    def reopen(self) -> None:
        """A fresh SSH session after the old one died (one try)."""
        if self.local or self.dead:
            return
        transport = getattr(self.conn, "transport", None)
        if transport is not None and transport.is_active():
            return
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.conn.open()

    def kill_link(self, why: str) -> None:
        self.dead = why
        with contextlib.suppress(Exception):
            self.conn.client.get_transport().close()


class Lock:
    """``.deploy.lock`` held by ``golive.py hold`` for as long as this session lives."""

    def __init__(self, session: Session, action: str, lock_info: dict) -> None:
        self.session = session
        self.info = lock_info
        self.action = action
        self.broke: dict | None = None
        self._pipe: Pipe | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Lock:
        s = self.session
        link_timeout = s.cfg.link_timeout
        req = {"remote_dir": s.cfg.remote_dir, "lock": self.info, "heartbeat": 2 * link_timeout}
        self._pipe = s.pipe("hold", req, install=True)
        try:
            ans = self._pipe.recv(max(link_timeout, s.cfg.connect_timeout))
        except TimeoutError:
            raise DeployError(f"{s.host}: no answer from the lock holder") from None
        if ans is None or "locked" not in ans:
            self._pipe.close()
            self._pipe = None
            raise _lock_error(s, ans)
        self.broke = ans.get("broke")
        s.agent = self
        self._thread = threading.Thread(target=self._beat, name="ftctl-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        s = self.session
        while not self._stop.wait(HEARTBEAT_S):
            with self._mutex:
                if self._pipe is None or self._stop.is_set():
                    return
                try:
                    self._pipe.send("hb")
                    ans = self._pipe.recv(s.cfg.link_timeout)
                except TimeoutError:
                    ans = None
                    why = f"no answer from {s.host} for {s.cfg.link_timeout:.0f}s"
                except Exception as exc:
                    ans, why = None, f"the SSH session to {s.host} ended ({type(exc).__name__})"
                else:
                    why = f"the SSH session to {s.host} ended"
                if ans is None:
                    s.kill_link(why)
                    return

    def _stop_beat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.session.cfg.link_timeout + 5)

    def _answer(self, what: str, timeout: float | None = None) -> dict:
        """The next line that is not a tick; the link counts as dead after ``link_timeout``."""
        s = self.session
        while True:
            try:
                ans = self._pipe.recv(timeout or s.cfg.link_timeout)
            except TimeoutError:
                s.kill_link(f"no answer from {s.host} for {s.cfg.link_timeout:.0f}s")
                raise s.fail(what, TimeoutError()) from None
            if ans is None:
                raise s.fail(what, ConnectionError("the SSH session ended"))
            if "tick" not in ans and "hb" not in ans:
                return ans

    def call(self, sub: str, req: dict, what: str) -> dict:
        """A subcommand run by the holder on the server (it ticks while it works)."""
        with self._mutex:
            if self._pipe is None or self.session.dead:
                raise self.session.fail(what, ConnectionError("the lock is gone"))
            try:
                self._pipe.send(f"call {sub} {json.dumps(req, ensure_ascii=False)}")
            except Exception as exc:
                raise self.session.fail(what, exc) from None
            ans = self._answer(what)
        return {"rc": ans.get("rc", 1), **(ans.get("reply") or {})}

    def hand_over(self, job: dict) -> Pipe:
        """Start the detached go-live with ``job``; it owns the lock from now on. Returns the
        pipe on which the holder now streams the go-live's status."""
        self._stop_beat()
        s = self.session
        with self._mutex:
            if self._pipe is None or s.dead:
                raise s.fail("start the go-live", ConnectionError("lock lost"))
            try:
                self._pipe.send("golive " + json.dumps(job, ensure_ascii=False))
            except Exception as exc:
                raise s.fail("start the go-live", exc) from None
            ans = self._answer("start the go-live", max(30.0, s.cfg.link_timeout))
            pipe, self._pipe = self._pipe, None
        s.agent = None
        if "started" not in ans:
            pipe.close()
            raise DeployError(
                f"{s.host}: the go-live program did not start: {ans.get('error', ans)}",
                hint=f"see {s.state_dir}/golive.out on the server",
            )
        return pipe

    def release(self) -> None:
        """Give the lock back (EOF does it too, if this fails)."""
        self._stop_beat()
        self.session.agent = None
        with self._mutex:
            if self._pipe is None:
                return
            with contextlib.suppress(Exception):
                self._pipe.send("release")
                self._pipe.recv(5)
            self._pipe.close()
            self._pipe = None


def _lock_error(s: Session, ans: dict | None) -> DeployError:
    if ans is None or "held" not in ans:
        return DeployError(
            f"{s.host}: cannot take {s.cfg.remote_dir}/.deploy.lock: {ans}",
            hint=f"check that {s.conn.user} may write {s.cfg.remote_dir} and that python3 runs",
        )
    who = describe_lock(ans["held"], ans.get("age"))
    path = f"{s.cfg.remote_dir}/.deploy.lock"
    if ans.get("stale"):
        return LockHeld(
            f"{s.host}: STALE deploy lock held by {who}",
            hint=f"no deploy seems to run; remove it (ssh {s.conn.user}@{s.host} rm {path}) "
            "and rerun",
        )
    return LockHeld(
        f"{s.host}: another deploy holds the lock: {who}",
        hint=f"wait for it to finish (`ftctl status` shows it); if it died, remove {path}",
    )


def describe_lock(lock: dict, age: float | None = None) -> str:
    """'owner (pid N, deploy since T, Ns ago)'."""
    owner, pid = lock.get("owner", "?"), lock.get("pid", "?")
    age_s = f", {age:.0f}s ago" if isinstance(age, int | float) else ""
    holder = f" on the server as {lock['holder']}" if lock.get("holder") else ""
    return (
        f"{owner} (pid {lock.get('client_pid', pid)}, {lock.get('action', 'deploy')} since "
        f"{lock.get('time', '?')}{age_s}{holder})"
    )


def lock_owner() -> str:
    import getpass

    return f"{getpass.getuser()}@{socket.gethostname()}"


def lock_info(action: str, deploy_id: str) -> dict:
    from datetime import UTC, datetime

    return {
        "owner": lock_owner(),
        "client_pid": os.getpid(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": action,
        "id": deploy_id,
        "token": os.urandom(16).hex(),
    }
