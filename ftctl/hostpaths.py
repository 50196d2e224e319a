"""Paths across the container boundary of ``--docker``: speak in the user's paths.

The command inside the image only sees container paths (``/workspace/data/x.jsonl``,
``/mnt/host/1-dk``). A :class:`PathTable` holds the mounts (container path -> host path) and
turns those back into the host paths they were mounted from, touching nothing else: a user's
text (``/help``, ``请打开 /home``, an utterance in an evaluation's flips) is never rewritten.

* in the log the inner command prints (progress, ``file:line`` of errors, hints): an absolute
  path that starts at a mount point gets the host path; every other text stays as it is;
* in a ``--json`` document, only the values ftctl writes as paths (:func:`is_path_key`:
  ``final_dir``, ``file``, ``paths``...) become host paths, a path made inside the container
  marked ``container:/path`` (docker cp's notation: it is gone after the run); ftctl's own
  messages (``message``, ``hint``, ``warnings``) are treated as the log; anything else (texts,
  labels, figures) is left alone, and the document stays valid JSON;
* in what the inner command records (the manifest): :func:`record_host_paths` maps the path
  values the same way, with the table passed in ``$FTCTL_HOST_PATHS`` by the caller.

:class:`HostPathWriter` applies the text rewriting to a byte stream that arrives in chunks: it
rewrites whole lines only, so a path (or a UTF-8 character) split across two chunks is never
cut. Pure standard library: the core and the CLI both use it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

ENV_VAR = "FTCTL_HOST_PATHS"  # JSON {container path: host path}, set in the container
CONTAINER_MARK = "container:"  # prefix of a path that exists only inside the container
MAX_PENDING = 1 << 16  # a "line" longer than this is passed on without waiting for its end

# An absolute path starts at the beginning of the text or after a character that cannot be
# part of a path word (space, quote, bracket, '=', ','): "x/y", "it/s" and URLs never match.
_PATH_START = r"(?:^|(?<=[\s'\"`(\[{<=,]))/"
# Keys whose string values ftctl writes as paths (file:line sources included) ...
PATH_KEYS = frozenset({"path", "paths", "file", "new", "old", "source", "templates", "config",
                       "checkpoint"})  # fmt: skip
PATH_SUFFIXES = ("_dir", "_path", "_data", "_file", "_map")
# ... and those holding ftctl's own messages, which are rewritten as the log is.
TEXT_KEYS = frozenset({"message", "hint", "warnings"})


def is_path_key(key: str) -> bool:
    """Does ftctl write a path (or a list of paths) under ``key`` in its JSON documents?"""
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


@dataclass(frozen=True)
class PathTable:
    """Mount points (container path -> host path), longest container path first."""

    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, mounts: Mapping[str, str] | Iterable[tuple[str, str]]) -> PathTable:
        items = mounts.items() if isinstance(mounts, Mapping) else mounts
        pairs = {c.rstrip("/") or "/": str(h) for c, h in items}
        return cls(tuple(sorted(pairs.items(), key=lambda p: len(p[0]), reverse=True)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PathTable | None:
        """The table the caller passed in ``$FTCTL_HOST_PATHS`` (None outside ``--docker``)."""
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return None
        try:
            table = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if not isinstance(table, dict):
            return None
        return cls.of({str(k): str(v) for k, v in table.items()})

    def to_env(self) -> str:
        return json.dumps(dict(self.pairs), ensure_ascii=False)

    # ------------------------------------------------------------------ exact paths

    def host_path(self, path: str) -> str | None:
        """The host path of the container path ``path``; None if no mount holds it."""
        for container, host in self.pairs:
            if path == container:
                return host
            if path.startswith(container + "/"):
                return host.rstrip("/") + path[len(container) :]
        return None

    # ------------------------------------------------------------------ text

    def path_value(self, value: str) -> str:
        """A path ftctl wrote: its host path, ``container:/path`` for an absolute path no
        mount holds, a relative path as it is."""
        host = self.host_path(value)
        if host is not None:
            return host
        return CONTAINER_MARK + value if value.startswith("/") else value

    # ------------------------------------------------------------------ text

    def _pattern(self) -> re.Pattern[str]:
        words = sorted({c.strip("/") for c, _ in self.pairs if c.strip("/")}, key=len, reverse=True)
        mounts = "|".join(re.escape(w) for w in words) or "(?!)"
        return re.compile(_PATH_START + rf"(?P<mount>{mounts})(?![\w.~@%+-])")

    def rewrite_text(self, text: str) -> str:
        """Paths under a mount point -> host paths; every other text as it is."""
        hosts = {c.strip("/"): h for c, h in self.pairs}
        return self._pattern().sub(lambda m: hosts[m.group("mount")], text)

    def rewrite_json(self, value: Any, key: str | None = None) -> Any:
        """A JSON value with the paths ftctl wrote under path keys mapped
        (:meth:`path_value`) and its messages rewritten as text; the rest as it is."""
        if isinstance(value, dict):
            return {k: self.rewrite_json(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rewrite_json(v, key) for v in value]
        if isinstance(value, str) and key is not None:
            if is_path_key(key):
                return self.path_value(value)
            if key in TEXT_KEYS:
                return self.rewrite_text(value)
        return value


def record_host_paths(payload: Any, table: PathTable | None = None, key: str | None = None) -> Any:
    """``payload`` with every path value (under a path key, :func:`is_path_key`) that is a
    mounted container path replaced by its host path (what a manifest written inside the
    container records); other strings, user texts among them, stay as they are. ``table``
    defaults to ``$FTCTL_HOST_PATHS``; outside ``--docker`` the payload comes back unchanged."""
    table = table if table is not None else PathTable.from_env()
    if table is None:
        return payload
    if isinstance(payload, str):
        return (table.host_path(payload) or payload) if key and is_path_key(key) else payload
    if isinstance(payload, list):
        return [record_host_paths(v, table, key) for v in payload]
    if isinstance(payload, dict):
        return {k: record_host_paths(v, table, k) for k, v in payload.items()}
    return payload


class HostPathWriter:
    """A binary sink that rewrites container paths in each complete line before passing it on
    (:meth:`PathTable.rewrite_text`). Bytes after the last newline wait for the rest of their
    line (or :meth:`close`), so neither a path nor a UTF-8 character is ever cut in two."""

    def __init__(self, table: PathTable, sink: IO[bytes]) -> None:
        self.table = table
        self.sink = sink
        self._pending = b""

    def write(self, data: bytes) -> int:
        self._pending += data
        cut = self._pending.rfind(b"\n") + 1
        if cut == 0 and len(self._pending) > MAX_PENDING:
            cut = len(self._pending)
        if cut:
            self._emit(self._pending[:cut])
            self._pending = self._pending[cut:]
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        """Pass on what is left (a last line without a newline)."""
        if self._pending:
            self._emit(self._pending)
            self._pending = b""
        self.sink.flush()

    def _emit(self, data: bytes) -> None:
        text = data.decode("utf-8", errors="surrogateescape")
        self.sink.write(self.table.rewrite_text(text).encode("utf-8", errors="surrogateescape"))


class HostPathJsonWriter(HostPathWriter):
    """For a ``--json`` run: keeps the whole document, then maps its path values
    (:meth:`PathTable.rewrite_json`; a host path with a quote or a backslash in it stays valid
    JSON). Output that is not one JSON document is rewritten as text."""

    def write(self, data: bytes) -> int:
        self._pending += data
        return len(data)

    def close(self) -> None:
        raw, self._pending = self._pending, b""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if raw:
                self._emit(raw)
        else:
            text = json.dumps(self.table.rewrite_json(doc), ensure_ascii=False, indent=2)
            self.sink.write((text + "\n").encode("utf-8"))
        self.sink.flush()
