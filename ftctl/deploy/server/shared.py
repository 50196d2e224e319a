"""What both ends of a deploy agree on: file names, release names, sampled blocks, framing.

The one module of the server program the client imports (it must run on Python 3.6 too).

Messages between the client and the server program are frames: ``MAGIC`` (4 bytes that never
occur in UTF-8 text), the payload's length (4 bytes, big-endian) and the payload (JSON in
UTF-8, or the program itself). Any size goes; text before a frame (a login script that prints
something) is handed to the reader as noise instead of being taken for a message.
"""

import hashlib
import json
import re
import struct
import time

LOCK = ".deploy.lock"  # flock()ed by the process that deploys; never removed
OWNER = ".deploy.lock.owner"  # who holds (or last held) the lock: the message a loser prints
LOG = "deploys.log"  # one JSON line per deploy, rollback, revert, recovery (0640)
STATE_DIR = ".ftctl"  # root-only (0700): status file, journal, file indexes, go-live output
STATUS = "status.json"  # the last go-live's progress and outcome
JOURNAL = "journal.json"  # what a go-live (or a backup) is doing, fsynced before it does it
GOLIVE_OUT = "golive.out"  # the detached go-live's stdout and stderr
FINAL_STATES = ("ok", "rolled_back", "rollback_failed", "failed")
HEALTHY = "healthy"  # the health URL or command passed (on the new model)
SETTLED = "settled (no health URL)"  # only the unit was watched (systemctl show) for a while
UNCHECKED = "unchecked"  # nothing looked at it: the command's exit status only
OUTPUT_MAX = 2000  # characters of a command's output kept in deploys.log / the status file

MIN_PYTHON = (3, 6)
EXIT_TOO_OLD = 90  # the loader's exit status on a Python older than MIN_PYTHON
EXIT_BAD_PROGRAM = 91  # ... when the program it was sent is cut short or fails its sha256

RELEASE_RE = re.compile(r"^\d{14}-(?P<tag>[0-9a-f]{8}|original)$")
SAMPLE_BLOCK = 1 << 16  # bytes of one sampled block (plan: delta or whole)

MAGIC = b"\xffFT1"
_LEN = struct.Struct(">I")
HEADER_SIZE = len(MAGIC) + _LEN.size


def utc_stamp():
    """The time part of a release name (UTC, to the second)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def now_iso():
    """Now, as deploys.log, the status file and the lock owner record it (UTC, to the second):
    the server program's clock and the client's, for what it writes beside them."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def release_tag(name):
    """The sha8 of a release name; None for a ``*-original`` backup or another name."""
    m = RELEASE_RE.match(name or "")
    return m.group("tag") if m and m.group("tag") != "original" else None


def release_key(name):
    """Release order: by time; a <ts>-original backup sorts before a release of the same second."""
    return (name[:14], 0 if name.endswith("-original") else 1, name)


def sample_offsets(size, count):
    """``count`` block offsets spread evenly over a file of ``size`` bytes."""
    if size <= SAMPLE_BLOCK or count <= 1:
        return [0]
    step = (size - SAMPLE_BLOCK) / (count - 1)
    return [int(i * step) for i in range(count)]


def sample_hashes(path, size, count):
    """sha1 of the blocks at :func:`sample_offsets` of a file (both ends hash the same offsets of
    their file: equal hashes mean equal bytes at the same place); Nones if it cannot be read."""
    out = []
    try:
        with open(path, "rb") as fh:
            for off in sample_offsets(size, count):
                fh.seek(off)
                out.append(hashlib.sha1(fh.read(SAMPLE_BLOCK)).hexdigest())
    except OSError:
        return [None] * count
    return out


def frame_length(header):
    """The payload length a frame's ``HEADER_SIZE`` bytes announce."""
    return _LEN.unpack(bytes(header[len(MAGIC) : HEADER_SIZE]))[0]


def frame_bytes(payload):
    """One frame holding ``payload`` (bytes)."""
    return MAGIC + _LEN.pack(len(payload)) + payload


def frame(obj):
    """One frame holding ``obj`` as JSON."""
    return frame_bytes(json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8"))


class Frames:
    """Cuts a byte stream into frames: ``feed`` bytes as they come, then take the payloads."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        """Add bytes; returns (complete payloads, noise: bytes that were not in a frame)."""
        self.buf.extend(data)
        payloads, noise = [], bytearray()
        while True:
            start = self.buf.find(MAGIC)
            if start < 0:  # keep what could be the start of a MAGIC split across reads
                keep = _partial_magic(self.buf)
                noise.extend(self.buf[: len(self.buf) - keep])
                del self.buf[: len(self.buf) - keep]
                break
            noise.extend(self.buf[:start])
            del self.buf[:start]
            if len(self.buf) < HEADER_SIZE:
                break
            size = frame_length(self.buf)
            if len(self.buf) < HEADER_SIZE + size:
                break
            payloads.append(bytes(self.buf[HEADER_SIZE : HEADER_SIZE + size]))
            del self.buf[: HEADER_SIZE + size]
        return payloads, bytes(noise)


def _partial_magic(buf):
    """How many bytes at the end of ``buf`` are a proper prefix of MAGIC."""
    for n in range(min(len(MAGIC) - 1, len(buf)), 0, -1):
        if bytes(buf[-n:]) == MAGIC[:n]:
            return n
    return 0


def decode(payload):
    """A frame's JSON payload as a dict (anything else: wrapped as ``{"raw": ...}``)."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except ValueError:
        return {"raw": payload[:200].decode("utf-8", "replace")}
    return doc if isinstance(doc, dict) else {"raw": doc}
