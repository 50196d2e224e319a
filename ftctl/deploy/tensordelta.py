"""Tensor delta, the client's half: encode a safetensors file as its difference from a basis
(the same file of a release already on the server, of which the client holds a copy).

Per tensor, block by block (``BLOCK`` bytes): a block equal to the basis's is a reference
(``C``, the server copies it from its basis); a changed one is the XOR of new and basis, split
into byte planes (byte j of every element in plane j: the high bytes of such an XOR are nearly
all zero) and each plane zlib-compressed, or stored when compression would not pay (``X``).
The header and any bytes outside tensors go as they are (``L``). The wire format and the
server's ``apply`` are in :mod:`ftctl.deploy.server.tensordelta` (standard library only).

The interface the deploy uses:

- :func:`usable` — may ``new_path`` be sent as a delta against a server file whose
  ``header_info`` (asked of the server, no download) is given? ``None`` or the reason why not.
- :func:`find_local_basis` — the local copy of a server file to encode against, found through
  the model's manifest (the base model it was fine-tuned from) or given candidates, verified by
  sha256.
- :func:`encode` — write the delta to a binary file object (the server's stdin, a file, or
  :class:`CountingSink` for the exact size without sending); returns :class:`EncodeStats`.
- :func:`choose` — tensor delta for one file, or why not (then it goes by rsync, then SFTP).

Blocks are encoded by a thread pool (numpy and zlib release the GIL) and written in order as
soon as they are ready, a bounded number ahead, so a slow link holds the encoder back instead of
filling memory.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

from ftctl.deploy.server import tensordelta as wire
from ftctl.errors import DeployError
from ftctl.fsutil import sha256_file

BLOCK = 4 << 20  # bytes of a tensor per X/C record (the server holds a few of these at once)
LEVEL = 1  # zlib level: bench/README.md "Tensor delta" (level 6: 2% fewer bytes, 3x the CPU)
SAMPLE = 64 << 10  # bytes of a plane compressed first to decide whether the plane compresses
STORE_ABOVE = 0.97  # a sample that compresses to more than this share is stored as it is
WEIGHTS = "model.safetensors"

# bytes per element of every safetensors dtype (safetensors' Dtype enum)
ELEMENT_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # data offsets, relative to the end of the header (safetensors' data_offsets)
    end: int


@dataclass(frozen=True)
class Layout:
    """A safetensors file's tensors: where each lies, what it holds."""

    data_start: int  # 8 + header length
    tensors: dict[str, Tensor]

    def ordered(self) -> list[Tensor]:
        return sorted(self.tensors.values(), key=lambda t: (t.begin, t.end))


class NotUsable(ValueError):
    """A header that a tensor delta cannot work with (the message says why)."""


def parse_layout(header: Mapping[str, Any], header_len: int, size: int | None = None) -> Layout:
    """The :class:`Layout` of a parsed safetensors header; :class:`NotUsable` if it is not one
    a delta can use (unknown dtype, offsets that do not match the shape, beyond the file)."""
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(n) for n in meta["shape"])
            begin, end = (int(n) for n in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise NotUsable(f"tensor {name!r}: no dtype, shape or data_offsets") from None
        if dtype not in ELEMENT_SIZE:
            raise NotUsable(f"tensor {name!r}: dtype {dtype} (not one the delta knows)")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * ELEMENT_SIZE[dtype]:
            raise NotUsable(f"tensor {name!r}: data_offsets {begin}..{end} do not fit {shape}")
        if size is not None and 8 + header_len + end > size:
            raise NotUsable(f"tensor {name!r} ends beyond the file")
        tensors[name] = Tensor(name, dtype, shape, begin, end)
    layout = Layout(8 + header_len, tensors)
    ordered = layout.ordered()
    for a, b in pairwise(ordered):
        if b.begin < a.end:
            raise NotUsable(f"tensors {a.name!r} and {b.name!r} overlap")
    return layout


def read_layout(path: str | os.PathLike) -> Layout:
    """The layout of a local safetensors file (:class:`NotUsable` when it is not one)."""
    info = wire.header_info(os.fspath(path))
    if "error" in info:
        raise NotUsable(info["error"])
    return parse_layout(info["header"], info["header_len"], info["size"])


def _fmt(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def layout_difference(new: Layout, basis: Layout) -> str | None:
    """Why ``new`` cannot be encoded against ``basis`` (names, shapes, dtypes), or None."""
    only_new = sorted(set(new.tensors) - set(basis.tensors))
    if only_new:
        return f"{len(only_new)} tensor(s) not in the basis: {_fmt(only_new)}"
    only_basis = sorted(set(basis.tensors) - set(new.tensors))
    if only_basis:
        return f"{len(only_basis)} tensor(s) of the basis not in the new file: {_fmt(only_basis)}"
    for name, t in new.tensors.items():
        b = basis.tensors[name]
        if t.dtype != b.dtype:
            return f"tensor {name!r}: dtype {t.dtype} here, {b.dtype} in the basis"
        if t.shape != b.shape:
            return f"tensor {name!r}: shape {list(t.shape)} here, {list(b.shape)} in the basis"
    return None


def usable(new_path: str | os.PathLike, basis_header: Mapping[str, Any]) -> str | None:
    """None when ``new_path`` can go as a tensor delta against the server file described by
    ``basis_header`` (what :func:`ftctl.deploy.server.tensordelta.header_info` returned there:
    same tensor names, shapes and dtypes); otherwise the reason, for the plan's line."""
    if "error" in basis_header:
        return f"the server's file: {basis_header['error']}"
    try:
        new = read_layout(new_path)
    except NotUsable as exc:
        return f"{new_path}: {exc}"
    try:
        basis = parse_layout(
            basis_header["header"], basis_header["header_len"], basis_header.get("size")
        )
    except (NotUsable, KeyError, TypeError) as exc:
        return f"the server's file: {exc}"
    return layout_difference(new, basis)


# ------------------------------------------------------------------------ finding the basis


@dataclass(frozen=True)
class LocalBasis:
    """A local file whose bytes are those of a file on the server (same sha256)."""

    path: Path
    sha256: str
    how: str  # where it was found: "base model (manifest)" or "candidate"


class Digests:
    """sha256 of local files, each computed once; :meth:`start` begins one in a thread ahead
    of need (the deploy hashes the manifest's base model while it connects and probes)."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[threading.Thread, dict]] = {}

    def start(self, path: str | os.PathLike) -> None:
        key = os.fspath(path)
        if key in self._jobs:
            return
        box: dict = {}

        def work() -> None:
            try:
                box["sha"] = sha256_file(key)
            except OSError as exc:
                box["error"] = exc

        thread = threading.Thread(target=work, name="ftctl-sha256", daemon=True)
        self._jobs[key] = (thread, box)
        thread.start()

    def __call__(self, path: str | os.PathLike) -> str:
        """The file's sha256 (OSError if it cannot be read)."""
        self.start(path)
        thread, box = self._jobs[os.fspath(path)]
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["sha"]


def base_weights(model_dir: str | os.PathLike, rel: str = WEIGHTS) -> Path | None:
    """``rel`` of the base model ``model_dir``'s manifest names (what :func:`find_local_basis`
    tries first), or None."""
    base = _manifest_base(Path(model_dir))
    return base[0] / rel if base is not None else None


def find_local_basis(
    model_dir: str | os.PathLike,
    server_files: Mapping[str, int],
    candidates: Iterable[str | os.PathLike] = (),
    rel: str = WEIGHTS,
    digest: Callable[[Path], str] = sha256_file,
) -> LocalBasis | None:
    """The local copy of one of ``server_files`` ({sha256: size} of the server's copies of
    ``rel``: the live release's first, then any other release's) to encode ``rel`` of
    ``model_dir`` against. Looked for, in order: the base model the manifest names
    (``base_model.path``/``rel``, the model this one was fine-tuned from: usually the live
    one), then ``candidates`` (e.g. a cache of what was deployed). A file qualifies only when
    its size is one of the server's and its sha256, computed now (by ``digest``: a
    :class:`Digests` may have begun it already), is that file's."""
    found = []
    base = _manifest_base(Path(model_dir))
    if base is not None:
        path, recorded = base
        # the manifest's sha256 is that of the base's weights (manifest.model_sha256)
        if rel != WEIGHTS or recorded is None or recorded in server_files:
            found.append((path / rel, "base model (manifest)"))
    found += [(Path(c), "candidate") for c in candidates]
    sizes = set(server_files.values())
    for path, how in found:
        try:
            if path.stat().st_size not in sizes:
                continue
            sha = digest(path)
        except OSError:
            continue
        if sha in server_files:
            return LocalBasis(path, sha, how)
    return None


def _manifest_base(model_dir: Path) -> tuple[Path, str | None] | None:
    """(directory, recorded sha256 of its weights) of the base model ``model_dir``'s manifest
    names (a relative path is taken from the current directory, as train was given it)."""
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = manifest.get("base_model") if isinstance(manifest, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        return None
    sha = base.get("sha256")
    return Path(base["path"]), sha if isinstance(sha, str) else None


# ------------------------------------------------------------------------ encoding


class CountingSink:
    """A binary sink that only counts: :func:`encode` into it gives the exact delta size."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)


@dataclass
class EncodeStats:
    """What one :func:`encode` made and what it cost."""

    new_size: int = 0
    delta_bytes: int = 0  # the stream, everything included
    copied_bytes: int = 0  # new bytes referenced from the basis (C records)
    xor_bytes: int = 0  # new bytes sent as XOR planes (X records), before compression
    literal_bytes: int = 0  # header and other bytes (L records)
    planes: dict[str, int] = field(default_factory=lambda: {"stored": 0, "zlib": 0})  # of X
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process, all threads

    @property
    def ratio(self) -> float:
        return self.delta_bytes / self.new_size if self.new_size else 0.0

    @property
    def mb_per_s(self) -> float:
        """Model bytes encoded per second of wall time."""
        return self.new_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(ratio=round(self.ratio, 4), mb_per_s=round(self.mb_per_s, 1))
        return out


@dataclass(frozen=True)
class Piece:
    """One record to make: ``L`` (new[start:start+length]) or a tensor block (``T``)."""

    kind: str
    start: int  # absolute offset in the new file
    basis: int  # absolute offset in the basis (T only)
    length: int
    k: int = 1  # element size (T only)


def pieces(new: Layout, basis: Layout, size: int, block: int = BLOCK) -> Iterator[Piece]:
    """The records of the new file, in its byte order."""
    cursor = 0

    def literal(a: int, b: int) -> Iterator[Piece]:
        for s in range(a, b, block):
            yield Piece("L", s, 0, min(block, b - s))

    for t in new.ordered():
        start, end = new.data_start + t.begin, new.data_start + t.end
        yield from literal(cursor, start)
        k = ELEMENT_SIZE[t.dtype]
        step = max(k, block // k * k)
        src = basis.data_start + basis.tensors[t.name].begin
        for off in range(0, end - start, step):
            yield Piece("T", start + off, src + off, min(step, end - start - off), k)
        cursor = max(cursor, end)
    yield from literal(cursor, size)


def _payload(raw, level: int, planes: dict[str, int]) -> list[bytes]:
    """A payload of ``raw`` (a contiguous buffer): zlib when it pays, else stored; counted
    in ``planes``."""
    n = len(raw)
    if level and n:
        sample = raw[:SAMPLE]
        if n <= SAMPLE or len(zlib.compress(sample, 1)) <= STORE_ABOVE * len(sample):
            packed = zlib.compress(raw, level)
            if len(packed) < n:
                planes["zlib"] += 1
                return [wire.PAYLOAD.pack(wire.ZLIB, len(packed)), packed]
    planes["stored"] += 1
    return [wire.PAYLOAD.pack(wire.STORED, n), bytes(raw)]


def _record(p: Piece, new_buf, basis_buf, level: int) -> tuple[list[bytes], EncodeStats]:
    """The bytes of one record (runs in a worker thread) and what it counted."""
    import numpy as np

    st = EncodeStats()
    x = new_buf[p.start : p.start + p.length]
    if p.kind == "L":
        st.literal_bytes = p.length
        head = [b"L", wire.LITERAL.pack(p.length)]
        return head + _payload(x, level, {"zlib": 0, "stored": 0}), st
    y = basis_buf[p.basis : p.basis + p.length]
    crc = zlib.crc32(y)
    if np.array_equal(x, y):
        st.copied_bytes = p.length
        return [b"C" + wire.COPY.pack(p.basis, p.length, crc)], st
    st.xor_bytes = p.length
    planes = np.bitwise_xor(x, y).reshape(-1, p.k).T.copy()
    out = [b"X" + wire.XOR.pack(p.basis, p.length, p.k, crc)]
    for plane in planes:
        out += _payload(plane, level, st.planes)
    return out, st


def _merge(total: EncodeStats, part: EncodeStats) -> None:
    total.copied_bytes += part.copied_bytes
    total.xor_bytes += part.xor_bytes
    total.literal_bytes += part.literal_bytes
    for k, v in part.planes.items():
        total.planes[k] += v


def encode(
    new_path: str | os.PathLike,
    basis_path: str | os.PathLike,
    out: BinaryIO | CountingSink,
    *,
    level: int | Callable[[], int] = LEVEL,
    workers: int | None = None,
    block: int = BLOCK,
    basis_sha256: str | None = None,
    new_sha256: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EncodeStats:
    """Write the tensor delta of ``new_path`` against ``basis_path`` to ``out`` (anything with
    ``write(bytes)``) and return what it took. ``level`` is zlib's (0: every plane stored), or
    a function asked for it as each block is handed to the encoder (the deploy's: by how fast
    the link takes the stream, see :mod:`ftctl.deploy.tdsend`).
    With ``basis_sha256`` the basis is hashed while encoding and a mismatch raises before the
    end record is written, so the server applies nothing. :class:`DeployError` when the two
    files' layouts differ (:func:`usable` says so first). ``new_sha256``: the new file's
    sha256 when it is known (its manifest's): it goes into the end record unhashed, so the
    server keeps the rebuilt file only if it hashes to exactly that. ``progress(n)``: ``n``
    more bytes of the new file are encoded and written."""
    import numpy as np

    t0, c0 = time.monotonic(), time.process_time()
    try:
        new, basis = read_layout(new_path), read_layout(basis_path)
    except NotUsable as exc:
        raise DeployError(f"tensor delta: {exc}") from None
    why = layout_difference(new, basis)
    if why:
        raise DeployError(f"tensor delta of {new_path} against {basis_path}: {why}")
    size, basis_size = os.path.getsize(new_path), os.path.getsize(basis_path)
    stats = EncodeStats(new_size=size)
    new_buf = np.memmap(new_path, dtype=np.uint8, mode="r")
    basis_buf = np.memmap(basis_path, dtype=np.uint8, mode="r")
    workers = workers or os.cpu_count() or 1

    def write(chunks: list[bytes]) -> None:
        for c in chunks:
            out.write(c)
            stats.delta_bytes += len(c)

    head = json.dumps({"basis_size": basis_size, "new_size": size}).encode()
    write([wire.MAGIC, wire.HEAD_LEN.pack(len(head)), head])
    with ThreadPoolExecutor(2) as hashers, ThreadPoolExecutor(workers) as pool:
        new_sha = hashers.submit(sha256_file, new_path) if new_sha256 is None else None
        basis_sha = hashers.submit(sha256_file, basis_path) if basis_sha256 else None
        pending: deque[Future] = deque()
        try:
            for p in pieces(new, basis, size, block):
                lvl = level() if callable(level) else level
                pending.append(pool.submit(_record, p, new_buf, basis_buf, lvl))
                while len(pending) > 2 * workers:
                    _write_next(pending, write, stats, progress)
            while pending:
                _write_next(pending, write, stats, progress)
            if basis_sha is not None and basis_sha.result() != basis_sha256:
                raise DeployError(
                    f"tensor delta: {basis_path} changed: its sha256 is no longer "
                    f"{basis_sha256[:12]}… (nothing was applied on the server)"
                )
            digest = new_sha256 or new_sha.result()  # type: ignore[union-attr]
            write([b"E", wire.END.pack(size, bytes.fromhex(digest))])
        finally:
            for f in pending:
                f.cancel()
    if hasattr(out, "flush"):
        out.flush()
    stats.seconds = time.monotonic() - t0
    stats.cpu_seconds = time.process_time() - c0
    return stats


def _write_next(pending: deque[Future], write, stats: EncodeStats, progress=None) -> None:
    chunks, part = pending.popleft().result()
    write(chunks)
    _merge(stats, part)
    if progress is not None:
        progress(part.copied_bytes + part.xor_bytes + part.literal_bytes)


# ------------------------------------------------------------------------ choosing


TENSOR_DELTA = "tensor-delta"


def choose(
    new_path: str | os.PathLike,
    basis: LocalBasis | None,
    server_header: Mapping[str, Any] | None = None,
) -> tuple[str | None, str]:
    """(``"tensor-delta"``, why) when ``new_path`` can go as a tensor delta against ``basis``
    (see :func:`find_local_basis`), else (None, why not: the file goes by rsync, then SFTP).
    There is no link-speed condition: measured, the delta is never slower than rsync + the
    server's verify on loopback and sends 0.63x its bytes (bench/README.md "Tensor delta").
    ``server_header`` (the probe's ``header_info`` of the live file) only sharpens the reason
    when there is no local basis."""
    if basis is None:
        why = "no local copy of a server's version of this file (the manifest's base model "
        why += "is not one)"
        layout = usable(new_path, server_header) if server_header else None
        return None, f"{why}; also {layout}" if layout else why
    layout = usable(new_path, wire.header_info(os.fspath(basis.path)))
    if layout:
        return None, layout
    return TENSOR_DELTA, f"XOR against {basis.how} {basis.path} (sha256 {basis.sha256[:8]})"
