"""Bytes to the server: only what the plan says changed, into ``.incoming-<id>/``.

The server first makes the upload directory with hard links of every unchanged file (and of the
live file a delta is computed against). Then

* the **tensor deltas** (:mod:`ftctl.deploy.tdsend`): safetensors files the plan sends as
  their difference from a server copy; one that fails goes on with the others below; then
* **rsync** over OpenSSH (same known_hosts with strict checking, identity, port and timeouts as
  the Fabric connection; one ControlMaster connection that every rsync step goes through),
  sending only the listed files: a file with a basis in place goes as a delta, the others
  whole; or
* **SFTP** (the fallback): the changed files whole, pipelined with large requests and a large
  window.

Then the server hashes each received file once (fsyncing it), checks the linked ones' sizes
and renames the upload into ``releases/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftctl.deploy.local import LocalModel
from ftctl.deploy.plan import TENSOR_DELTA, Plan
from ftctl.deploy.session import Session, die_with_parent
from ftctl.deploy.tdsend import send_deltas
from ftctl.errors import DeployError, FtctlError
from ftctl.progress import NULL, Reporter

if TYPE_CHECKING:
    from ftctl.config import DeployConfig

SFTP_WINDOW = 64 << 20
SFTP_REQUEST = 255 << 10  # OpenSSH's sftp-server takes writes up to 255 KiB


@dataclass
class Hooks:
    """Test and bench hooks (fault injection); all optional."""

    on_upload_bytes: Callable[[Any, int], None] | None = None  # SFTP: after each chunk
    after_upload: Callable[[Any, str], None] | None = None  # (conn, incoming dir)


@dataclass
class Sent:
    method: str
    files: int = 0
    file_bytes: int = 0  # file data sent (rsync: literal data; tensor delta: the stream)
    wire_bytes: int = 0  # everything the transfer sent (rsync: "Total bytes sent")
    # per method used ("tensor-delta", "rsync", "sftp"): {"files", "bytes", "seconds"}
    by_method: dict[str, dict] = field(default_factory=dict)
    hashed: dict[str, list] = field(default_factory=dict)  # rel -> [sha256, identity] (apply)
    fallbacks: dict[str, str] = field(default_factory=dict)  # rel -> why its delta failed

    def add(self, part: Sent, seconds: float) -> None:
        self.files += part.files
        self.file_bytes += part.file_bytes
        self.wire_bytes += part.wire_bytes
        mine = self.by_method.setdefault(part.method, {"files": 0, "bytes": 0, "seconds": 0.0})
        mine["files"] += part.files
        mine["bytes"] += part.file_bytes
        mine["seconds"] = round(mine["seconds"] + seconds, 2)
        self.method = "+".join(self.by_method)


def ssh_args(session: Session) -> list[str]:
    """OpenSSH options matching the Fabric connection: port, identity, strict known_hosts.
    Options only: a command line adds ``--`` and then the target (never an option)."""
    from ftctl.remote import known_hosts_path

    cfg = session.cfg
    args = [
        "-p", str(session.conn.port),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path(cfg)}",
        "-o", f"ConnectTimeout={int(cfg.connect_timeout)}",
        "-o", "ServerAliveInterval=5",
        "-o", f"ServerAliveCountMax={max(1, int(cfg.link_timeout // 5))}",
        "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        "-o", "Compression=no",
    ]  # fmt: skip
    if cfg.identity:
        args += ["-i", str(Path(cfg.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
    return args


def master_argv(session: Session, control_path: str, target: str) -> list[str]:
    """The ControlMaster's command line: options, ``--``, the target."""
    return ["ssh", "-M", "-N", "-S", control_path, *ssh_args(session), "--", target]


class Master:
    """One OpenSSH ControlMaster connection; rsync's ssh runs through it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.dir = tempfile.mkdtemp(prefix="ftctl-ssh-")
        self.path = os.path.join(self.dir, "cm")
        self.target = f"{session.conn.user}@{session.conn.host}"
        self.proc = subprocess.Popen(
            master_argv(session, self.path, self.target),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )

    def wait(self) -> None:
        deadline = time.monotonic() + self.session.cfg.connect_timeout + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode()[-500:]
                raise DeployError(
                    f"{self.session.host}: OpenSSH (for rsync) could not connect: {err.strip()}",
                    hint="ssh must accept the same identity and known_hosts as ftctl; or use "
                    "--transfer sftp",
                )
            if os.path.exists(self.path):
                return
            time.sleep(0.02)
        raise DeployError(f"{self.session.host}: OpenSSH (for rsync) did not connect in time")

    def client_argv(self) -> list[str]:
        """ssh through this master, options only (the target and command follow)."""
        return ["ssh", "-S", self.path, "-o", "ControlMaster=no", *ssh_args(self.session)]

    def ssh_e(self) -> str:
        import shlex

        return shlex.join(self.client_argv())

    def via(self) -> list[str]:
        """The command line that runs a command on the server through this master (append
        the command)."""
        self.wait()
        return [*self.client_argv(), "--", self.target]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_STAT_RE = {
    "wire": re.compile(r"Total bytes sent:\s*([\d,.]+)"),
    "literal": re.compile(r"Literal data:\s*([\d,.]+)"),
}
_PROGRESS_RE = re.compile(rb"^\s*([\d,]+)\s+\d+%")


def _num(text: str) -> int:
    return int(text.replace(",", "").replace(".", ""))


def rsync_send(
    session: Session,
    model: LocalModel,
    files: list[str],
    incoming: str,
    master: Master,
    reporter: Reporter,
    bar: bool,
) -> Sent:
    fd, listing_path = tempfile.mkstemp(prefix="ftctl-files-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(files) + "\n")
    cmd = rsync_argv(session.cfg, master.ssh_e(), listing_path, f"{model.path}/",
                     f"{master.target}:{incoming}/")  # fmt: skip
    total = sum(model.sizes[r] for r in files)
    output = bytearray()
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        try:
            with reporter.task("rsync", total=total, unit="B") if bar else _no_bar() as advance:
                _pump(proc, output, advance, session)
        except BaseException:  # Ctrl-C, SIGTERM: rsync stops with us
            proc.terminate()
            proc.wait(10)
            raise
        rc = proc.wait()
    finally:
        os.unlink(listing_path)
    text = output.decode("utf-8", "replace")
    if session.dead:
        raise session.fail("upload (rsync)", ConnectionError(session.dead))
    if rc != 0:
        raise DeployError(
            f"{session.host}: upload failed: rsync exited {rc}: {text.strip()[-500:]}",
            hint="the live model is untouched; rerun the deploy (leftovers are cleaned up)",
        )
    stats = {k: _num(m.group(1)) for k, r in _STAT_RE.items() if (m := r.search(text))}
    return Sent("rsync", len(files), stats.get("literal", 0), stats.get("wire", 0))


def rsync_argv(cfg, ssh_e: str, listing_path: str, src: str, dest: str) -> list[str]:
    """rsync's command line: options, ``--``, the source and the ``user@host:dir/`` target.
    (rsync hands the user to ssh as ``-l USER``; a host never starts with '-': HostSpec.)"""
    cmd = [
        "rsync", "--recursive", "--ignore-times", "--no-whole-file", "--stats",
        "--info=progress2", f"--files-from={listing_path}", "-e", ssh_e,
        f"--timeout={int(max(30, 2 * cfg.link_timeout))}",
    ]  # fmt: skip
    if cfg.bwlimit_kbps:
        cmd.append(f"--bwlimit={cfg.bwlimit_kbps}")
    return [*cmd, "--", src, dest]


@contextlib.contextmanager
def _no_bar():
    yield lambda n=1, **fields: None


def _pump(proc: subprocess.Popen, output: bytearray, advance, session: Session) -> None:
    """Read rsync's output (progress lines end in \\r), move the bar; stop on a dead link."""
    assert proc.stdout is not None
    done = 0
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if session.dead and proc.poll() is None:
                proc.terminate()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        pending = b""
        while chunk := proc.stdout.read1(65536):
            output += chunk
            pending += chunk
            *parts, pending = re.split(rb"[\r\n]", pending)
            for part in parts:
                m = _PROGRESS_RE.match(part)
                if m:
                    now = _num(m.group(1).decode())
                    if now > done:
                        advance(now - done)
                        done = now
            if len(output) > 1 << 20:  # keep the end (stats) only
                del output[: len(output) - (64 << 10)]
    finally:
        stop.set()


def sftp_send(
    session: Session,
    model: LocalModel,
    files: list[str],
    incoming: str,
    reporter: Reporter,
    hooks: Hooks,
    bar: bool,
) -> Sent:
    """Each file whole, through one SFTP channel with a large window and large requests."""
    conn = session.conn
    total = sum(model.sizes[r] for r in files)
    sent = 0
    try:
        sftp = _open_sftp(conn)
        try:
            with reporter.task("upload", total=total, unit="B") if bar else _no_bar() as advance:
                for rel in files:
                    with (
                        open(model.path / rel, "rb") as src,
                        sftp.open(f"{incoming}/{rel}", "wb") as dst,
                    ):
                        dst.set_pipelined(True)
                        if hasattr(dst, "MAX_REQUEST_SIZE"):
                            dst.MAX_REQUEST_SIZE = SFTP_REQUEST
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                            sent += len(chunk)
                            advance(len(chunk))
                            if hooks.on_upload_bytes:
                                hooks.on_upload_bytes(conn, sent)
        finally:
            sftp.close()
    except FtctlError:
        raise
    except Exception as exc:
        raise DeployError(
            f"{session.host}: upload failed after {sent} bytes: "
            f"{session.dead or f'{type(exc).__name__}: {exc}'}",
            hint="the live model is untouched; rerun the deploy (leftovers are cleaned up)",
        ) from None
    return Sent("sftp", len(files), sent, sent)


def _open_sftp(conn):
    if getattr(conn, "ftctl_local", False):
        return conn.sftp()
    import paramiko

    return paramiko.SFTPClient.from_transport(
        conn.client.get_transport(), window_size=SFTP_WINDOW, max_packet_size=1 << 15
    )


def send(
    session: Session,
    model: LocalModel,
    plan: Plan,
    incoming: str,
    *,
    master: Master | None,
    reporter: Reporter = NULL,
    hooks: Hooks | None = None,
    bar: bool = True,
    out: Sent | None = None,
) -> Sent:
    """Send the plan's changed files into ``incoming`` (already holding the linked ones): the
    tensor deltas, and meanwhile the other files by rsync or SFTP; then, the same way, any
    file whose tensor delta failed. What was sent is added to ``out`` as it goes (so that a
    caller knows it when this raises)."""
    hooks = hooks or Hooks()
    out = out if out is not None else Sent(plan.method)
    rest = [r for r in plan.to_send if plan.step(r).action != TENSOR_DELTA]

    def others(files: list[str], with_bar: bool) -> tuple[Sent, float]:
        t0 = time.monotonic()
        if plan.method == "rsync" and master is not None:
            part = _rsync(session, model, files, incoming, master, reporter, with_bar)
        else:
            part = sftp_send(session, model, files, incoming, reporter, hooks, with_bar)
        return part, time.monotonic() - t0

    if plan.tensor_deltas:
        with ThreadPoolExecutor(1) as pool:  # one progress bar at a time: the delta's
            beside = pool.submit(others, rest, False) if rest else None
            rest = _send_deltas(session, model, plan, incoming, master, reporter, bar, out)
            if beside is not None:
                out.add(*beside.result())
    if rest:
        out.add(*others(rest, bar))
    if hooks.after_upload:
        hooks.after_upload(session.conn, incoming)
    return out


def _rsync(session, model, files, incoming, master, reporter, bar) -> Sent:
    big = [r for r in files if model.sizes[r] >= 1 << 20]
    if big and session.agent is not None:  # the server hashes them as they arrive
        req = {"remote_dir": session.cfg.remote_dir, "incoming": incoming.rsplit("/", 1)[-1]}
        session.call("watch", {**req, "files": big}, what="watch the upload")
    master.wait()
    return rsync_send(session, model, files, incoming, master, reporter, bar)


def _send_deltas(session, model, plan, incoming, master, reporter, bar, out: Sent) -> list[str]:
    """The plan's tensor deltas, into ``out``; the files whose delta failed (warned)."""
    steps = plan.tensor_deltas
    total = sum(model.sizes[s.rel] for s in steps)
    t0 = time.monotonic()
    via = master.via() if master is not None else None
    with reporter.task("tensor delta", total=total, unit="B") if bar else _no_bar() as advance:
        ds = send_deltas(session, model, steps, incoming.rsplit("/", 1)[-1], via, advance)
    out.add(Sent(TENSOR_DELTA, ds.files, ds.bytes, ds.bytes), time.monotonic() - t0)
    out.by_method[TENSOR_DELTA].update(encode_cpu_s=round(ds.encode_cpu_s, 2), planes=ds.planes)
    out.hashed = ds.hashed
    other = "rsync" if plan.method == "rsync" and master is not None else "sftp"
    for rel, why in ds.failed.items():
        out.fallbacks[rel] = why
        reporter.warn(
            f"{session.host}: {rel}: the tensor delta failed ({why}); sending it by {other} "
            "instead (every file is checked by sha256 before go-live, as always)"
        )
    return list(ds.failed)


def verify(
    session: Session,
    model: LocalModel,
    plan: Plan,
    incoming: str,
    release: str,
    hashed: dict[str, list] | None = None,
) -> None:
    """The server hashes what it received (once: a tensor delta's apply did it while writing,
    ``hashed``, used if the file is the very one it wrote), then renames the upload into
    releases/. A file whose sha256 differs from the manifest's fails the deploy."""
    cfg: DeployConfig = session.cfg
    req = {
        "remote_dir": cfg.remote_dir,
        "incoming": incoming.rsplit("/", 1)[-1],
        "release": release,
        "expected": {r: [model.expected[r], model.sizes[r]] for r in model.expected},
        "received": plan.to_send,
        "hashed": hashed or {},
    }
    ans = session.call("verify", req, what="verify sha256", ok_codes=(0, 1))
    if ans.get("bad"):
        raise DeployError(
            f"{session.host}: uploaded files do not match their sha256: {', '.join(ans['bad'])}",
            hint="the upload was corrupted and discarded; the live model is untouched. "
            "Rerun; if it repeats, check the server's disk and network",
        )
