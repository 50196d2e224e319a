# The server program's loader: `PYTHON -c "<this file>" SHA256 COMMAND [ARG]`, with the program
# (a zip of ftctl/deploy/server/, made in memory by the client) as the first frame on stdin.
# It reads exactly that frame, checks its sha256 against the one on the command line, and
# imports the program from memory: nothing on the server's disk is run, so nothing another
# user could have written there is. The rest of stdin belongs to the command.
# Python 2 must be able to parse this file, so that an old interpreter gets to the version
# check and says so (exit 90) instead of failing on syntax.
import sys

if sys.version_info < (3, 6):
    sys.stderr.write(
        "ftctl: %s is Python %s; the server program needs Python 3.6 or newer\n"
        % (sys.executable or "python", sys.version.split()[0])
    )
    sys.exit(90)

import hashlib
import importlib.abc
import importlib.util
import io
import os
import struct
import zipfile

PACKAGE = "ftctl_server"


def _read(n):
    out = bytearray()
    while len(out) < n:
        chunk = os.read(0, min(n - len(out), 1 << 20))
        if not chunk:
            sys.stderr.write("ftctl: the server program was cut short on stdin\n")
            sys.exit(91)
        out.extend(chunk)
    return bytes(out)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ftctl_server.* from the zip in memory."""

    def __init__(self, data):
        self.zip = zipfile.ZipFile(io.BytesIO(data))
        self.names = set(self.zip.namelist())

    def _where(self, name):
        base = name.replace(".", "/")
        if base + "/__init__.py" in self.names:
            return base + "/__init__.py", True
        if base + ".py" in self.names:
            return base + ".py", False
        return None, False

    def find_spec(self, name, path=None, target=None):
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        where, package = self._where(name)
        if where is None:
            return None
        return importlib.util.spec_from_loader(name, self, origin=where, is_package=package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        where = module.__spec__.origin
        code = compile(self.zip.read(where), "<ftctl-server>/" + where, "exec")
        exec(code, module.__dict__)


def _main():
    head = _read(8)
    if head[:4] != b"\xffFT1":
        sys.stderr.write("ftctl: no server program on stdin\n")
        sys.exit(91)
    data = _read(struct.unpack(">I", head[4:])[0])
    if hashlib.sha256(data).hexdigest() != sys.argv[1]:
        sys.stderr.write("ftctl: the server program does not match its sha256; not run\n")
        sys.exit(91)
    sys.meta_path.insert(0, _Finder(data))
    main = importlib.import_module(PACKAGE + ".main")
    sys.exit(main.entry(sys.argv[2:], data))


if __name__ == "__main__":
    _main()
