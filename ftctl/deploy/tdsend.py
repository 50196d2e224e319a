"""The tensor delta's transfer: each planned safetensors file is encoded
(:mod:`ftctl.deploy.tensordelta`) straight into the server program's ``tdelta`` command, which
rebuilds it in the upload directory from a release's copy, hashing it as it writes
(``ftctl/deploy/server/upload.py``).

All the files go as one stream into one process on the server: through OpenSSH's ControlMaster
when there is one (OpenSSH's ciphers run in C; paramiko's are Python and share our GIL with the
encoder), else through the SSH session. ``bwlimit_kbps`` caps the stream as it caps rsync.

**The link decides the compression.** zlib on the changed blocks' byte planes saves bytes at
the price of CPU on both ends; that pays on a link slower than the CPUs, not on a faster one.
So the stream measures how fast ssh takes it: bytes over the seconds spent waiting for ssh to
accept them (and for ``bwlimit``), over the last ``WINDOW`` bytes. While that is under
``FAST_LINK`` bytes/s (or not yet measured), blocks are compressed (zlib level 1); at or above
it, the link is not what limits the upload and blocks go stored, as the CPU-cheapest way.

A file the server cannot rebuild (its copy of the basis differs from what it indexed: a CRC-32
mismatch; a disk error; our own copy of the basis changed while encoding) is returned as failed,
with the reason, and so are the files after it in the stream: the caller sends them by rsync or
SFTP instead, and verifies every file by sha256 as always. A link that died is an error.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ftctl.deploy import tensordelta as td
from ftctl.deploy.local import LocalModel
from ftctl.deploy.plan import FileStep
from ftctl.deploy.session import Pipe, Session
from ftctl.errors import DeployError
from ftctl.fsutil import sha256_file

CHUNK = 256 << 10  # bytes handed to ssh at once
WINDOW = 8 << 20  # bytes of stream over which the link is measured
FAST_LINK = 40e6  # bytes/s (320 Mbit/s): a link at least this fast gets the planes stored


@dataclass
class DeltaSent:
    """What the tensor delta stream did."""

    files: int = 0  # rebuilt on the server
    bytes: int = 0  # the stream, as written into ssh
    hashed: dict[str, list] = field(default_factory=dict)  # rel -> [sha256, file identity]
    failed: dict[str, str] = field(default_factory=dict)  # rel -> why (goes by rsync/SFTP)
    encode_cpu_s: float = 0.0  # the encoder's CPU seconds (this process, all threads)
    planes: dict[str, int] = field(default_factory=dict)  # byte planes sent "stored" / "zlib"


class Sink:
    """What :func:`~ftctl.deploy.tensordelta.encode` writes into: buffered into chunks,
    counted, held to ``kbps`` KiB/s when that is not 0, and timed: :meth:`level` is the zlib
    level the link's measured speed asks for (see the module docstring)."""

    def __init__(self, write: Callable[[bytes], None], kbps: int = 0) -> None:
        self._write = write
        self._rate = kbps * 1024
        self._buf = bytearray()
        self._t0 = time.monotonic()
        self._window: deque[tuple[int, float]] = deque()  # (bytes, seconds waited) per chunk
        self._window_bytes = 0
        self._window_wait = 0.0
        self.bytes = 0

    def link_rate(self) -> float | None:
        """Bytes/s ssh took over the last WINDOW bytes (None: not that many bytes yet)."""
        if self._window_bytes < WINDOW:
            return None
        return self._window_bytes / max(self._window_wait, 1e-6)

    def level(self) -> int:
        rate = self.link_rate()
        return 0 if rate is not None and rate >= FAST_LINK else td.LEVEL

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if not self._buf:
            return
        t0 = time.monotonic()
        if self._rate:
            ahead = (self.bytes + len(self._buf)) / self._rate - (t0 - self._t0)
            if ahead > 0:
                time.sleep(ahead)
        self._write(bytes(self._buf))
        self._measure(len(self._buf), time.monotonic() - t0)
        self.bytes += len(self._buf)
        self._buf.clear()

    def _measure(self, n: int, waited: float) -> None:
        self._window.append((n, waited))
        self._window_bytes += n
        self._window_wait += waited
        while self._window_bytes - self._window[0][0] >= WINDOW:
            old, old_wait = self._window.popleft()
            self._window_bytes -= old
            self._window_wait -= old_wait


def send_deltas(
    session: Session,
    model: LocalModel,
    steps: list[FileStep],
    incoming: str,
    via: list[str] | None,
    advance: Callable[[int], None],
) -> DeltaSent:
    """Stream ``steps`` (the plan's tensor deltas) into ``incoming`` (its name under
    remote_dir); ``via``: the OpenSSH command line that reaches the server (None: the SSH
    session). ``advance(n)``: n more bytes of the new files done."""
    cfg = session.cfg
    req = {
        "remote_dir": cfg.remote_dir,
        "incoming": incoming,
        "files": [{"rel": s.rel, "basis": s.source} for s in steps],
    }
    out = DeltaSent()
    pipe = session.pipe("tdelta", req, via)
    sink = Sink(pipe.send_bytes, cfg.bwlimit_kbps)
    ours = None  # why we stopped writing early, when the cause is on this side
    try:
        for s in steps:
            # no hashing here: the server checks each basis range read (CRC-32) and the rebuilt
            # file against the manifest's sha256 (the end record)
            stats = td.encode(
                model.path / s.rel, s.local_basis or "", sink, level=sink.level,
                new_sha256=model.expected[s.rel], progress=advance,
            )  # fmt: skip
            out.encode_cpu_s += stats.cpu_seconds
            for k, v in stats.planes.items():
                out.planes[k] = out.planes.get(k, 0) + v
    except OSError:  # the server stopped reading: its answer says why
        pass
    except DeployError as exc:  # a file here changed while it was encoded
        ours = exc.message
    except BaseException:
        pipe.close()
        raise
    out.bytes = sink.bytes
    pipe.end_input()
    ans = _answer(session, pipe)
    rc, stderr = pipe.ended()
    pipe.close()
    done = (ans or {}).get("files") or {}
    for s in steps:
        if s.rel in done:
            out.hashed[s.rel] = [done[s.rel]["sha256"], done[s.rel]["identity"]]
            out.files += 1
        elif not out.failed:
            out.failed[s.rel] = _why(ans, ours, rc, stderr) + _basis_changed(s)
        else:
            out.failed[s.rel] = f"not sent: the stream stopped at {next(iter(out.failed))}"
    return out


def _answer(session: Session, pipe: Pipe) -> dict | None:
    """The server's answer once it has rebuilt (and fsynced) the files; None if it ended
    without one. A dead link, or no answer in ``command_timeout``, is an error."""
    deadline = time.monotonic() + session.cfg.command_timeout
    while True:
        if session.dead:
            pipe.close()
            raise session.fail("upload (tensor delta)", ConnectionError(session.dead))
        try:
            return pipe.recv(1.0)
        except TimeoutError:
            if time.monotonic() > deadline:
                pipe.close()
                raise DeployError(
                    f"{session.host}: the tensor delta got no answer from the server in "
                    f"{session.cfg.command_timeout:.0f}s",
                    hint="the live model is untouched; rerun, or use --transfer rsync",
                ) from None


def _basis_changed(s: FileStep) -> str:
    """Whose copy changed, when a delta failed: ours is hashed again (the server's message
    cannot tell)."""
    try:
        changed = sha256_file(s.local_basis or "") != s.basis_sha
    except OSError:
        changed = True
    return f"; this machine's copy {s.local_basis} changed since the plan" if changed else ""


def _why(ans: dict | None, ours: str | None, rc: int | None, stderr: str) -> str:
    if ours:
        return ours  # the server only saw the stream end early
    if ans and ans.get("error"):
        return f"the server: {ans['error']}"
    tail = stderr.strip()[-300:] or "nothing on stderr"
    return f"the server's tdelta exited {rc} without an answer: {tail}"
