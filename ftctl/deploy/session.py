"""Talking to one server: shell commands, the server program's subcommands, the lock.

A :class:`Session` wraps a Fabric ``Connection`` (or the demo's local stand-in). The server
program (:mod:`ftctl.deploy.program`) is sent on stdin every time it runs and checked by its
sha256 there: short calls run it once (``probe``, ``status``), the lock holder runs it for a
whole deploy. Messages both ways are frames (any size); every line the program writes to
stderr reaches the user (the session's reporter, and the error when it fails).

The lock is ``flock()`` on ``.deploy.lock``, taken on the server by ``hold`` and held by that
process for as long as this SSH session lives: a heartbeat thread keeps it; if this process
dies (kill -9 included) or the link goes dead, the holder sees EOF or a missed heartbeat and
ends, and the kernel releases the lock. At the go-live the holder hands the same open file to
the detached go-live, which holds it until it has finished.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import shlex
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

from ftctl.deploy.program import program
from ftctl.deploy.server.shared import (
    EXIT_BAD_PROGRAM,
    EXIT_TOO_OLD,
    Frames,
    decode,
    frame,
    now_iso,
)
from ftctl.errors import DeployError, EnvironmentProblem, FtctlError, LockHeld
from ftctl.progress import NULL, Reporter

if TYPE_CHECKING:
    from ftctl.config import DeployConfig

HEARTBEAT_S = 3.0  # the client's heartbeat to the lock holder


def q(s: str) -> str:
    return shlex.quote(s)


class LinkDead(DeployError):
    """The SSH link stopped answering."""


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Children (ssh, rsync) get SIGTERM when this process dies, kill -9 included."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Pipe:
    """A remote process that speaks frames on stdin/stdout (a paramiko channel; or, with
    ``argv``, a local process such as OpenSSH's ``ssh`` running ``cmd`` on the server; or the
    demo's local ``cmd``). Its stderr, line by line, goes to ``on_stderr`` and is kept."""

    def __init__(self, conn: Any, cmd: str, on_stderr=None, argv: list[str] | None = None) -> None:
        self._frames = Frames()
        self._msgs: queue.Queue[dict | None] = queue.Queue()
        self.stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._on_stderr = on_stderr or (lambda line: None)
        self._proc: subprocess.Popen | None = None
        self._chan = None
        if argv is not None:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                preexec_fn=die_with_parent,
            )  # fmt: skip
            out, err = self._proc.stdout.read1, self._proc.stderr.read1  # type: ignore[union-attr]
        elif getattr(conn, "ftctl_local", False):
            self._proc = subprocess.Popen(
                cmd, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = self._proc.stdout.read1, self._proc.stderr.read1  # type: ignore[union-attr]
        else:
            self._chan = conn.client.get_transport().open_session()
            self._chan.exec_command(cmd)
            out, err = self._chan.recv, self._chan.recv_stderr
        self._err_thread = threading.Thread(target=self._pump_err, args=(err,), daemon=True)
        self._err_thread.start()
        threading.Thread(target=self._pump_out, args=(out,), daemon=True).start()

    def _pump_out(self, read) -> None:
        try:
            while chunk := read(1 << 16):
                payloads, noise = self._frames.feed(chunk)
                for line in noise.decode("utf-8", "replace").splitlines():
                    self._line(line)
                for p in payloads:
                    self._msgs.put(decode(p))
        except Exception:  # a dead transport ends the stream like EOF
            pass
        self._msgs.put(None)

    def _pump_err(self, read) -> None:
        pending = b""
        with contextlib.suppress(Exception):
            while chunk := read(1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._line(line.decode("utf-8", "replace"))
        if pending:
            self._line(pending.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        if line.strip():
            self.stderr.append(line.rstrip())
            self._on_stderr(line.rstrip())

    def send(self, obj: dict) -> None:
        self.send_bytes(frame(obj))

    def send_bytes(self, data: bytes) -> None:
        if self._proc is not None:
            assert self._proc.stdin
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        else:
            self._chan.sendall(data)

    def end_input(self) -> None:
        """EOF on the process's stdin (it goes on answering)."""
        with contextlib.suppress(Exception):
            if self._proc is not None:
                if self._proc.stdin:
                    self._proc.stdin.close()
            else:
                self._chan.shutdown_write()

    def recv(self, timeout: float) -> dict | None:
        """The next message (None at EOF); TimeoutError when nothing came in ``timeout``."""
        try:
            msg = self._msgs.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if msg is None:
            self._msgs.put(None)  # stay at EOF
        return msg

    def ended(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """(exit status, stderr) of a process that has ended (None: not known in time)."""
        self._err_thread.join(timeout)
        if self._proc is not None:
            try:
                rc = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
        else:
            rc = self._chan.exit_status if self._chan.status_event.wait(timeout) else None
        return rc, "\n".join(self.stderr)

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

    def __init__(self, conn: Any, cfg: DeployConfig, reporter: Reporter = NULL) -> None:
        self.conn = conn
        self.cfg = cfg
        self.host = conn.host
        self.reporter = reporter
        self.state_dir = f"{cfg.remote_dir}/.ftctl"
        self.dead: str | None = None  # why the link counts as dead
        self.agent: Lock | None = None  # the lock holder, which also runs subcommands
        self.python: dict | None = None  # {"path", "version"} of remote_python, once known

    @property
    def local(self) -> bool:
        return bool(getattr(self.conn, "ftctl_local", False))

    def server_said(self, line: str) -> None:
        """A line the server program wrote to stderr: the user sees it."""
        self.reporter.warn(f"{self.host}: server: {line}")

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
        rc, out, err = self.run_bytes(cmd, what=what, stdin=stdin)
        out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
        if check and rc != 0:
            tail = (err_s or out_s).strip()[-500:]
            raise DeployError(
                f"{self.host}: {what or 'remote command'} exited {rc}: {tail}",
                hint="fix the server side problem named above and rerun",
            )
        return rc, out_s, err_s

    def run_bytes(self, cmd: str, *, what: str = "", stdin: bytes | None = None):
        try:
            return self._exec(cmd, stdin)
        except FtctlError:
            raise
        except Exception as exc:  # paramiko/invoke raise many kinds (timeouts, dropped sessions)
            raise self.fail(what or "remote command", exc) from None

    def _exec(self, cmd: str, stdin: bytes | None) -> tuple[int, bytes, bytes]:
        timeout = self.cfg.command_timeout
        if self.local:
            res = subprocess.run(
                cmd, shell=True, input=stdin or b"", capture_output=True, timeout=timeout
            )
            return res.returncode, res.stdout, res.stderr
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
            return chan.recv_exit_status(), bytes(out), bytes(err)
        finally:
            chan.close()

    def program_command(self, sub: str, *args: str) -> str:
        return program().command(self.cfg.remote_python, sub, *args)

    def call(self, sub: str, req: dict, *, what: str, ok_codes: tuple[int, ...] = (0,)) -> dict:
        """Run a server program subcommand, return its answer: through the lock holder while
        one is held (no new process), else once, on its own."""
        if self.agent is not None:
            ans = self.agent.call(sub, req, what)
            if ans["rc"] not in ok_codes:
                raise DeployError(
                    f"{self.host}: {what} failed on the server: {ans.get('error', ans)}",
                    hint="fix the problem named above and rerun",
                )
            return ans
        rc, out, err = self.run_bytes(
            self.program_command(sub), what=what, stdin=program().stdin(req)
        )
        payloads, noise = Frames().feed(out)
        lines = (noise + err).decode("utf-8", "replace").splitlines()
        for line in lines:
            if line.strip():
                self.server_said(line.rstrip())
        if rc not in ok_codes or not payloads:
            raise program_error(self, what, rc, "\n".join(lines))
        return {"rc": rc, **decode(payloads[-1])}

    def pipe(self, sub: str, req: dict, via: list[str] | None = None) -> Pipe:
        """The server program's ``sub`` as a process that speaks frames, request sent; over
        this session's SSH connection, or run by the local command line ``via`` (OpenSSH
        through its ControlMaster: ``via + [command]``)."""
        cmd = self.program_command(sub)
        try:
            argv = None if via is None else [*via, cmd]
            pipe = Pipe(self.conn, cmd, self.server_said, argv)
            pipe.send_bytes(program().stdin(req))
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


def program_error(s: Session, what: str, rc: int | None, stderr: str) -> FtctlError:
    """The error for a server program that gave no answer, from its exit status and stderr:
    a missing or too old ``remote_python`` is named as such (exit 7)."""
    py = s.cfg.remote_python
    tail = stderr.strip()[-800:] or "(nothing on stderr)"
    fix = (
        "install Python 3.6 or newer on the server, or point remote_python (in "
        "[deploy.<profile>] of ftctl.toml, or --remote-python) at one, e.g. /usr/bin/python3.8"
    )
    if rc in (126, 127):
        return EnvironmentProblem(
            f"{s.host}: remote_python = {py!r} cannot be run on the server (exit {rc}): {tail}",
            hint=fix,
        )
    if rc == EXIT_TOO_OLD:
        return EnvironmentProblem(f"{s.host}: remote_python = {py!r}: {tail}", hint=fix)
    if rc == EXIT_BAD_PROGRAM:
        return DeployError(
            f"{s.host}: {what}: the server program arrived damaged and was not run: {tail}",
            hint="rerun; if it repeats, something on the way alters the SSH session's data",
        )
    return DeployError(
        f"{s.host}: {what} failed: the server program (remote_python = {py!r}) exited {rc} "
        f"without an answer: {tail}",
        hint="the lines above are the server's own words: fix what they name and rerun",
    )


class Lock:
    """``.deploy.lock`` held by the server program's ``hold`` for as long as this session
    lives (see the module docstring)."""

    def __init__(self, session: Session, action: str, lock_info: dict) -> None:
        self.session = session
        self.info = lock_info
        self.action = action
        self.recovered: dict | None = None  # what the holder finished of a job that died
        self._pipe: Pipe | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Lock:
        s = self.session
        link_timeout = s.cfg.link_timeout
        req = {"remote_dir": s.cfg.remote_dir, "lock": self.info, "heartbeat": 2 * link_timeout}
        self._pipe = s.pipe("hold", req)
        try:  # ticks while it finishes a job that died (a restart and health checks)
            ans = self._answer("take the lock", max(link_timeout, s.cfg.connect_timeout))
        except DeployError:
            rc, err = self._pipe.ended(1.0)
            self._pipe.close()
            self._pipe = None
            if rc is not None and rc != 0:
                raise program_error(s, "take the lock", rc, err) from None
            raise
        if ans is None or "locked" not in ans:
            rc, err = self._pipe.ended()
            self._pipe.close()
            self._pipe = None
            raise _lock_error(s, ans, rc, err)
        self.recovered = ans.get("recovered")
        s.python = ans.get("python")
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
                    self._pipe.send({"op": "hb"})
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

    def _answer(self, what: str, timeout: float | None = None) -> dict | None:
        """The next message that is not a tick (None at EOF); the link counts as dead when
        nothing comes for ``link_timeout``."""
        s = self.session
        assert self._pipe is not None
        while True:
            try:
                ans = self._pipe.recv(timeout or s.cfg.link_timeout)
            except TimeoutError:
                s.kill_link(f"no answer from {s.host} for {s.cfg.link_timeout:.0f}s")
                raise s.fail(what, TimeoutError()) from None
            if ans is None or ("tick" not in ans and "hb" not in ans):
                return ans

    def call(self, sub: str, req: dict, what: str) -> dict:
        """A subcommand run by the holder on the server (it ticks while it works)."""
        with self._mutex:
            if self._pipe is None or self.session.dead:
                raise self.session.fail(what, ConnectionError("the lock is gone"))
            try:
                self._pipe.send({"op": "call", "sub": sub, "req": req})
            except Exception as exc:
                raise self.session.fail(what, exc) from None
            ans = self._answer(what)
        if ans is None:
            raise self.session.fail(what, ConnectionError("the SSH session ended"))
        return {"rc": ans.get("rc", 1), **(ans.get("reply") or {})}

    def hand_over(self, job: dict) -> Pipe:
        """Start the detached go-live with ``job``; it holds the lock from now on. Returns the
        pipe on which the holder now streams the go-live's status."""
        self._stop_beat()
        s = self.session
        with self._mutex:
            if self._pipe is None or s.dead:
                raise s.fail("start the go-live", ConnectionError("lock lost"))
            try:
                self._pipe.send({"op": "golive", "job": job})
            except Exception as exc:
                raise s.fail("start the go-live", exc) from None
            ans = self._answer("start the go-live", max(30.0, s.cfg.link_timeout))
            pipe, self._pipe = self._pipe, None
        s.agent = None
        if ans is None or "started" not in ans:
            pipe.close()
            raise DeployError(
                f"{s.host}: the go-live program did not start: "
                f"{(ans or {}).get('error', 'the session ended')}",
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
                self._pipe.send({"op": "release"})
                self._pipe.recv(5)
            self._pipe.close()
            self._pipe = None


def _lock_error(s: Session, ans: dict | None, rc: int | None, stderr: str) -> FtctlError:
    if ans is None:
        return program_error(s, "take the lock", rc, stderr)
    if "held" not in ans:
        return DeployError(
            f"{s.host}: {ans.get('error', ans)}",
            hint=f"check that {s.conn.user} may write {s.cfg.remote_dir}",
        )
    return LockHeld(
        f"{s.host}: another deploy holds the lock: held by {describe_lock(ans['held'])}",
        hint="wait for it to finish (`ftctl status` shows it); the lock goes by itself when "
        "the process holding it ends",
    )


def describe_lock(lock: dict) -> str:
    """'root@ci-3 since T (deploy ID; on the server: golive pid N)'."""
    owner = lock.get("owner", "?")
    what = " ".join(str(x) for x in (lock.get("action"), lock.get("id")) if x)
    holder = lock.get("holder")
    where = f"{holder} pid {lock.get('pid', '?')}" if holder else f"pid {lock.get('pid', '?')}"
    stale = "; its owner record may be stale" if lock.get("stale_record") else ""
    return (
        f"{owner} since {lock.get('time', '?')} ({what or 'deploy'}, client pid "
        f"{lock.get('client_pid', '?')}; on the server: {where}{stale})"
    )


def lock_owner() -> str:
    import getpass

    return f"{getpass.getuser()}@{socket.gethostname()}"


def lock_info(action: str, deploy_id: str) -> dict:
    return {
        "owner": lock_owner(),
        "client_pid": os.getpid(),
        "time": now_iso(),
        "action": action,
        "id": deploy_id,
    }
