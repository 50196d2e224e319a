"""The server program as the client ships it: ``ftctl/deploy/server/`` zipped in memory.

Why a zip and not one file: the server side is several modules (the lock, the go-live, its
recovery, the upload steps, and the dispatch table a new step plugs into), and they stay the
same files the client's tests import. One sha256 covers all of them, deflate makes the
~100 KB of source ~25 KB on the wire, and Python 3.6's ``zipfile`` + ``importlib`` load it from
memory, so nothing is written to the server's disk to be run later (a file there could be
replaced by whoever can write the service's directory, and root would run it).

Every run is ``PYTHON -c <boot.py> SHA256 COMMAND`` with the zip as the first frame on stdin
and the request as the second; ``boot.py`` refuses a zip whose sha256 differs.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import zipfile
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ftctl.deploy.server.shared import frame, frame_bytes

PACKAGE = "ftctl_server"  # the program's package name on the server (see boot.py)
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same sha256


@dataclass(frozen=True)
class Program:
    data: bytes  # the zip
    sha256: str
    boot: str  # boot.py's code, passed with -c

    def command(self, python: str, sub: str, *args: str) -> str:
        """The shell command that runs ``sub`` with the interpreter ``python``."""
        interpreter = " ".join(map(shlex.quote, shlex.split(python)))
        words = " ".join(map(shlex.quote, [self.sha256, sub, *args]))
        return f"exec {interpreter} -c {shlex.quote(self.boot)} {words}"

    def stdin(self, req: dict) -> bytes:
        """What the command reads: the program, then the request."""
        return frame_bytes(self.data) + frame(req)


@cache
def program() -> Program:
    root = resources.files("ftctl.deploy.server")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".py"):
                info = zipfile.ZipInfo(f"{PACKAGE}/{entry.name}", date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o600 << 16
                zf.writestr(info, entry.read_bytes())
    data = buf.getvalue()
    boot = "\n".join(
        line for line in root.joinpath("boot.py").read_text().splitlines() if line.strip()
        and not line.lstrip().startswith("#")
    )  # fmt: skip
    return Program(data, hashlib.sha256(data).hexdigest(), boot + "\n")
