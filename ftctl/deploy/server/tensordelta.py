"""Tensor delta, the server's half: rebuild a safetensors file from the live one (the basis)
and a delta stream that carries only what changed. Standard library only, Python 3.6+.

The client (``ftctl/deploy/tensordelta.py``) writes the stream; this file reads it. The format
is defined here, once: the client imports the constants below.

Stream (integers little-endian)::

    MAGIC                      8 bytes, b"FTTD" + format version (1) + b"\\r\\n\\x00"
    <I head length> head       JSON: {"basis_size": N, "new_size": M}
    record*                    each one appends ``length`` bytes to the new file, in order
    b"E" <Q new_size> sha256   end: the new file's size and 32-byte sha256 digest

    b"L" <Q length> payload             literal bytes (the header, anything not a tensor)
    b"C" <Q offset> <Q length> <I crc>  copy basis[offset:offset+length] (an identical tensor)
    b"X" <Q offset> <Q length> <B k> <I crc> payload*k
                                        XOR delta of a changed block of a tensor whose elements
                                        are k bytes: byte plane j holds byte j of every element
                                        of (new XOR basis[offset:offset+length])
    payload = <B codec> <Q stored length> bytes    codec 0: stored, 1: zlib

``crc`` is the CRC-32 of the basis range the record reads: a basis that changed since the
client chose it (bit rot, an edit, a truncated copy) fails on the first record that reads it,
naming the range. The sha256 of everything written is checked against the end record (and
returned, so the caller's verify needs no second pass). An ``L``/``X`` record holds at most
``MAX_RECORD`` bytes, so the memory used is a few times that, whatever the tensor sizes; a
``C`` record is copied 1 MiB at a time. The stream is self-delimiting: ``apply`` stops after
the end record and reads nothing beyond it.

Command line (what the deploy's dispatch calls; also handy by hand)::

    python3 tensordelta.py apply BASIS OUT < DELTA   # prints {"sha256": ..., "size": ...}
    python3 tensordelta.py header FILE               # prints header_info(FILE) as JSON
"""

import contextlib
import hashlib
import json
import os
import queue
import signal
import struct
import sys
import threading
import zlib

MAGIC = b"FTTD\x01\r\n\x00"
HEAD_MAX = 1 << 20  # bytes of the stream's JSON head
MAX_RECORD = 64 << 20  # bytes an L or X record may produce (the client uses 4 MiB blocks)
HEADER_MAX = 100 << 20  # a safetensors header larger than this is refused (as safetensors does)
COPY_CHUNK = 1 << 20
WRITEBACK = 64 << 20  # bytes written after which they go to disk in the background
STORED, ZLIB = 0, 1
CODECS = (STORED, ZLIB)

LITERAL = struct.Struct("<Q")  # length
COPY = struct.Struct("<QQI")  # basis offset, length, crc32 of the basis range
XOR = struct.Struct("<QQBI")  # basis offset, length, element size k, crc32 of the basis range
PAYLOAD = struct.Struct("<BQ")  # codec, stored length
END = struct.Struct("<Q32s")  # new size, sha256 digest
HEAD_LEN = struct.Struct("<I")


class DeltaError(Exception):
    """The delta cannot be applied: a bad or truncated stream, or a basis that differs."""


def max_stored(raw_len):
    """The most bytes a zlib payload of ``raw_len`` bytes may take (deflate's worst case)."""
    return raw_len + raw_len // 64 + 64


# ------------------------------------------------------------------------ safetensors header


def read_header(fh, size):
    """(header length, parsed header) of an open safetensors file of ``size`` bytes."""
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise DeltaError("not a safetensors file: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", prefix)
    if n > HEADER_MAX or 8 + n > size:
        raise DeltaError(f"not a safetensors file: a header of {n} bytes in a {size}-byte file")
    raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise DeltaError(f"not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DeltaError("not a safetensors file: its header is not a JSON object")
    return n, header, raw


def header_info(path):
    """What a client needs to decide on a tensor delta against ``path`` without reading it:
    ``{"size", "header_len", "header_sha256", "header"}`` (the parsed JSON header), or
    ``{"error": why}`` when it is not a readable safetensors file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n, header, raw = read_header(fh, size)
    except (OSError, DeltaError) as exc:
        return {"error": f"{path}: {exc}"}
    return {
        "size": size,
        "header_len": n,
        "header_sha256": hashlib.sha256(raw).hexdigest(),
        "header": header,
    }


# ------------------------------------------------------------------------ reading the stream


class Reader:
    """Exact reads from a file object (a pipe may return less than asked)."""

    def __init__(self, stream):
        self.stream = stream
        self.offset = 0

    def exact(self, n, what):
        parts = []
        left = n
        while left:
            chunk = self.stream.read(left)
            if not chunk:
                raise DeltaError(
                    f"truncated delta stream: {what} needs {n} bytes at stream offset "
                    f"{self.offset}, got {n - left}"
                )
            parts.append(chunk)
            left -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += n
        return data

    def unpack(self, fmt, what):
        return fmt.unpack(self.exact(fmt.size, what))


def read_payload(rd, raw_len, what):
    """One payload: ``raw_len`` bytes once decoded."""
    codec, stored = rd.unpack(PAYLOAD, what)
    if codec == STORED:
        if stored != raw_len:
            raise DeltaError(f"{what}: stored payload of {stored} bytes, expected {raw_len}")
        return rd.exact(stored, what)
    if codec != ZLIB:
        raise DeltaError(f"{what}: unknown codec {codec}")
    if stored > max_stored(raw_len):
        raise DeltaError(f"{what}: a compressed payload of {stored} bytes for {raw_len}")
    dec = zlib.decompressobj()
    try:
        data = dec.decompress(rd.exact(stored, what), raw_len + 1)
    except zlib.error as exc:
        raise DeltaError(f"{what}: corrupt compressed payload ({exc})") from None
    if len(data) != raw_len or not dec.eof or dec.unused_data:
        raise DeltaError(f"{what}: payload decodes to {len(data)} bytes, expected {raw_len}")
    return data


def xor_planes(planes, basis, k):
    """``basis`` XOR the bytes that the ``k`` byte planes interleave into."""
    n = len(basis)
    if k == 1:
        delta = planes[0]
    else:
        delta = bytearray(n)
        for j in range(k):
            delta[j::k] = planes[j]
    x = int.from_bytes(delta, "little") ^ int.from_bytes(basis, "little")
    return x.to_bytes(n, "little")


class Basis:
    """The basis file, read by range, each range checked against the client's CRC-32."""

    def __init__(self, fh, path, expected_size):
        self.path = path
        self.fh = fh
        self.size = os.fstat(fh.fileno()).st_size
        if self.size != expected_size:
            raise DeltaError(
                f"basis {path} is {self.size} bytes, the delta was made against "
                f"{expected_size}: not the file the client chose"
            )

    def ranges(self, offset, length, crc, chunk):
        """Yield basis[offset:offset+length] in pieces of ``chunk``; check the CRC at the end."""
        if offset + length > self.size:
            raise DeltaError(f"basis range {offset}+{length} lies beyond its {self.size} bytes")
        self.fh.seek(offset)
        seen = 0
        left = length
        while left:
            data = self.fh.read(min(chunk, left))
            if not data:
                raise DeltaError(f"basis {self.path} shrank while read (at {offset})")
            seen = zlib.crc32(data, seen)
            left -= len(data)
            yield data
        if seen & 0xFFFFFFFF != crc:
            raise DeltaError(
                f"basis {self.path}: bytes {offset}..{offset + length} differ from the client's "
                "copy (CRC-32 mismatch): the server's file changed since it was indexed"
            )

    def read(self, offset, length, crc):
        return b"".join(self.ranges(offset, length, crc, length or 1))


class Flusher(threading.Thread):
    """``fdatasync`` of a file being written, in the background each time it is kicked, so the
    final fsync has little left to write (rsync's watcher does the same for its uploads)."""

    def __init__(self, fd):
        threading.Thread.__init__(self, daemon=True)
        self.fd = fd
        self.wake = threading.Event()
        self.done = False
        self.start()

    def run(self):
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.done:
                return
            with contextlib.suppress(OSError):  # the final fsync reports what matters
                os.fdatasync(self.fd)

    def kick(self):
        self.wake.set()

    def stop(self):
        self.done = True
        self.wake.set()
        self.join()


class Writer:
    """The new file: a temp file beside ``out_path``, hashed while written, renamed at the end.

    The writing and hashing run on a thread of their own, a few blocks behind the records
    (``QUEUED``): with OpenSSL's sha256 and the file's write both outside the GIL, they overlap
    the reading, inflating and XOR of the next records."""

    QUEUED = 4  # blocks (at most MAX_RECORD bytes each, 4 MiB from ftctl) waiting to be written

    def __init__(self, out_path, new_size):
        self.out_path = out_path
        self.new_size = new_size
        self.tmp = f"{out_path}.tdelta-{os.getpid()}-{os.urandom(4).hex()}.part"
        self.sha = hashlib.sha256()
        self.size = 0  # bytes handed to write()
        self.error = None  # what the disk thread met (a full disk)
        self.queue = queue.Queue(self.QUEUED)
        self.thread = threading.Thread(target=self._disk, daemon=True)
        self.flusher = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self.fh = os.fdopen(os.open(self.tmp, flags, 0o666), "wb")
        try:  # a signal while the threads start (SIGTERM: SystemExit) must not leave the file
            self.flusher = Flusher(self.fh.fileno())
            self.thread.start()
        except BaseException:
            self.discard()
            raise

    def room(self, length, what):
        if self.size + length > self.new_size:
            raise DeltaError(f"{what} writes past the announced size of {self.new_size} bytes")

    def write(self, data):
        if self.error is not None:
            raise self.error
        self.queue.put(data)
        self.size += len(data)

    def _disk(self):
        flushed = written = 0
        while True:
            data = self.queue.get()
            if data is None:
                return
            if self.error is not None:
                continue  # drain, so that write() never blocks on a dead thread
            try:
                self.fh.write(data)
                self.sha.update(data)
                written += len(data)
                if written - flushed >= WRITEBACK:
                    self.fh.flush()
                    self.flusher.kick()
                    flushed = written
            except OSError as exc:
                self.error = exc

    def finish(self):
        """Wait until everything is written; the sha256 digest of it."""
        if self.thread.ident is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.sha.digest()

    def commit(self):
        self.finish()
        self.fh.flush()
        self.flusher.stop()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.out_path)
        fd = os.open(os.path.dirname(os.path.abspath(self.out_path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self):
        with contextlib.suppress(OSError):
            self.finish()
        if self.flusher is not None:
            self.flusher.stop()
        with contextlib.suppress(OSError):  # a full disk fails the flush; the file still closes
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def read_head(rd):
    magic = rd.exact(len(MAGIC), "magic")
    if magic != MAGIC:
        raise DeltaError(f"not a tensor delta (format {MAGIC!r} expected, got {magic!r})")
    (n,) = rd.unpack(HEAD_LEN, "head length")
    if n > HEAD_MAX:
        raise DeltaError(f"delta head of {n} bytes")
    try:
        head = json.loads(rd.exact(n, "head").decode("utf-8"))
        return int(head["basis_size"]), int(head["new_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DeltaError(f"bad delta head ({exc})") from None


def apply_record(tag, rd, basis, out):
    """Read one record's fields and payloads, write its bytes."""
    where = f"record at stream offset {rd.offset - 1}"
    if tag == b"C":
        offset, length, crc = rd.unpack(COPY, where)
        out.room(length, where)
        for data in basis.ranges(offset, length, crc, COPY_CHUNK):
            out.write(data)
        return
    if tag == b"L":
        (length,) = rd.unpack(LITERAL, where)
        if length > MAX_RECORD:
            raise DeltaError(f"{where}: a literal of {length} bytes")
        out.room(length, where)
        out.write(read_payload(rd, length, where))
        return
    if tag != b"X":
        raise DeltaError(f"{where}: unknown record type {tag!r}")
    offset, length, k, crc = rd.unpack(XOR, where)
    if not k or length % k or length > MAX_RECORD:
        raise DeltaError(f"{where}: an XOR block of {length} bytes in {k}-byte elements")
    out.room(length, where)
    planes = [read_payload(rd, length // k, f"{where}, plane {j}") for j in range(k)]
    out.write(xor_planes(planes, basis.read(offset, length, crc), k))


def apply_records(rd, basis, out, progress):
    """Apply records up to the end record; its (size, sha256 digest)."""
    while True:
        tag = rd.exact(1, "record type")
        if tag == b"E":
            return rd.unpack(END, "end record")
        apply_record(tag, rd, basis, out)
        if progress is not None:
            progress(out.size)


def apply(delta_stream, basis_path, out_path, progress=None):
    """Rebuild the new file at ``out_path`` from ``basis_path`` and the delta read from
    ``delta_stream`` (a binary file object: stdin, a socket file, an open file). Returns the
    sha256 (hex) of the file written, which the end record confirmed; it is fsynced before
    ``out_path`` appears. Any problem raises :class:`DeltaError` and leaves no file at
    ``out_path`` (nor a temp file). ``progress(bytes_written)`` is called after each record."""
    rd = Reader(delta_stream)
    basis_size, new_size = read_head(rd)
    with open(basis_path, "rb") as fh:
        basis = Basis(fh, basis_path, basis_size)
        out = Writer(out_path, new_size)
        try:
            size, digest = apply_records(rd, basis, out, progress)
            if size != new_size or out.size != new_size:
                raise DeltaError(f"delta wrote {out.size} bytes, announced {new_size} and {size}")
            if out.finish() != digest:
                raise DeltaError(
                    f"the rebuilt file's sha256 {out.sha.hexdigest()} is not the client's "
                    f"{digest.hex()}: the basis {basis_path} differs from the client's copy "
                    "where its CRC-32 cannot see it, or the stream was damaged"
                )
            out.commit()
        except BaseException:
            out.discard()
            raise
    return out.sha.hexdigest()


# ------------------------------------------------------------------------ command line


def exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through apply, which removes its temp file


def main(argv):
    if len(argv) == 3 and argv[0] == "apply":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, exit_on_signal)
        try:
            sha = apply(sys.stdin.buffer, argv[1], argv[2])
        except (DeltaError, OSError) as exc:
            sys.stderr.write(f"tensordelta: error: {exc}\n")
            return 1
        sys.stdout.write(json.dumps({"sha256": sha, "size": os.path.getsize(argv[2])}) + "\n")
        return 0
    if len(argv) == 2 and argv[0] == "header":
        info = header_info(argv[1])
        sys.stdout.write(json.dumps(info) + "\n")
        return 1 if "error" in info else 0
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
