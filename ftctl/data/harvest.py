"""Harvest: the live service's doubtful answers become a review file for a human.

The service logs every answer (ftctl serve's prediction log, or any JSONL log whose field
names ``[harvest]`` gives). A logged answer is worth a look when

- its score is low (``max_score``),
- the runner-up is close (``min_margin``),
- label and runner-up are one of the confused pairs (``[eval] pairs``) and not far apart
  (``pair_margin``), or
- the same text got different labels (from two model versions, say).

Candidates are deduplicated by text (:func:`ftctl.data.textkey.text_key`; keeping the most doubtful
answer and counting how often it was seen), texts already in the training data are left out,
and at most ``limit`` are kept, shared out round-robin across the predicted intents so that
one noisy intent cannot fill the file.

Logs are streamed: read in chunks, split on LF only (a logged text may hold U+2028 or
U+0085), one entry at a time, so memory grows with the distinct texts, not with the log. A bad
line (broken JSON, a 4,300-digit number, a line over 1 MiB) is counted, never fatal.

The review file is a CSV in UTF-8 with a BOM (Excel and WPS open it as is):
text, predicted, score, runner_up, runner_up_score, reason, seen, and an empty ``label``
column for the reviewer; ``ftctl data import-review`` reads it back.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from ftctl.clock import utc_file_stamp, utc_iso
from ftctl.data.textkey import TextKey, text_key
from ftctl.errors import DataError, EnvironmentProblem
from ftctl.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from ftctl.config import HarvestConfig

REVIEW_COLUMNS = (
    "text", "predicted", "score", "runner_up", "runner_up_score", "reason", "seen", "label",
)  # fmt: skip
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a cell starting so is a formula in Excel


CHUNK = 1 << 16  # bytes read at a time
MAX_LINE = 1 << 20  # a longer line is skipped (and counted as bad), never held whole


def to_cell(text: str) -> str:
    """A text as a spreadsheet cell: a leading = + - @ is escaped with ' (else Excel runs it
    as a formula); :func:`from_cell` undoes it."""
    return "'" + text if text.startswith(FORMULA_START) else text


def from_cell(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


# --------------------------------------------------------------------------- reading logs


@dataclass(frozen=True)
class Entry:
    """One logged answer."""

    text: str | None
    label: str
    score: float
    runner_up: str | None
    runner_up_score: float | None
    time: str | None
    source: str  # file:line

    @property
    def margin(self) -> float | None:
        return None if self.runner_up_score is None else self.score - self.runner_up_score


def _get(obj, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _number(value) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def parse_entry(obj: dict, cfg: HarvestConfig, source: str) -> Entry | str:
    """An Entry, or why the line cannot be one."""
    label, score = _get(obj, cfg.label_field), _number(_get(obj, cfg.score_field))
    runner, runner_score = _get(obj, cfg.runner_up_field), _get(obj, cfg.runner_up_score_field)
    if cfg.scores_field:
        scores = _get(obj, cfg.scores_field)
        if not isinstance(scores, dict) or not scores:
            return f"no '{cfg.scores_field}' object"
        ranked = sorted(
            ((lab, _number(v)) for lab, v in scores.items() if _number(v) is not None),
            key=lambda kv: -kv[1],
        )
        if not ranked:
            return f"no numbers in '{cfg.scores_field}'"
        label, score = (label if isinstance(label, str) else ranked[0][0]), ranked[0][1]
        runner, runner_score = ranked[1] if len(ranked) > 1 else (None, None)
    if not isinstance(label, str) or score is None:
        return f"no '{cfg.label_field}' string or '{cfg.score_field}' number"
    text = _get(obj, cfg.text_field)
    when = _get(obj, cfg.time_field)
    return Entry(
        text if isinstance(text, str) else None,
        label,
        score,
        runner if isinstance(runner, str) else None,
        _number(runner_score),
        when if isinstance(when, str) else None,
        source,
    )


@dataclass
class ReadStats:
    files: list[str] = field(default_factory=list)
    lines: int = 0
    entries: int = 0
    bad_lines: int = 0
    first_bad: str | None = None  # file:line: why, for the message
    without_text: int = 0
    before_since: int = 0


def split_lines(fh: BinaryIO, max_line: int = MAX_LINE) -> Iterator[bytes | None]:
    """The lines of a binary stream, split on LF (b"\\n") only, read ``CHUNK`` bytes at a time; a
    line longer than ``max_line`` comes out as None (read past, never held whole)."""
    buf, skipping = b"", False
    while chunk := fh.read(CHUNK):
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            yield None if skipping or len(line) > max_line else line
            skipping = False
        if len(buf) > max_line:
            buf, skipping = b"", True
    if skipping or len(buf) > max_line:
        yield None
    elif buf:
        yield buf


def parse_lines(
    lines: Iterable[bytes | None],
    cfg: HarvestConfig,
    source: str,
    stats: ReadStats,
    since: str | None = None,
) -> Iterator[Entry]:
    """The entries of a log's lines (:func:`split_lines`); every bad line counted in ``stats``
    (the first one named), never raised."""
    for lineno, raw in enumerate(lines, 1):
        if raw is not None and not raw.strip():
            continue
        stats.lines += 1
        where = f"{source}:{lineno}"
        if raw is None:
            entry: Entry | str = f"a line over {MAX_LINE} bytes"
        else:
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
                entry = parse_entry(obj, cfg, where) if isinstance(obj, dict) else "not an object"
            except (ValueError, RecursionError) as exc:  # broken JSON, a 4,300-digit number
                entry = f"not JSON ({str(exc)[:80]}; cut by a rotation?)"
        if isinstance(entry, str):
            stats.bad_lines += 1
            stats.first_bad = stats.first_bad or f"{where}: {entry}"
            continue
        if since is not None and entry.time is not None and entry.time < since:
            stats.before_since += 1
            continue
        stats.entries += 1
        if entry.text is None:
            stats.without_text += 1
            continue
        yield entry


class LogSource(Protocol):
    """Where log files are read from: this machine or a server over SFTP."""

    name: str

    def listdir(self, directory: str) -> list[str]: ...

    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]: ...


class LocalFiles:
    name = "local"

    def listdir(self, directory: str) -> list[str]:
        return os.listdir(directory)

    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return open(path, "rb")


class _Windowed(io.RawIOBase):
    """A remote file read in windows of pipelined SFTP requests (``readv``): fast over a
    slow link, and never more than one window in memory (paramiko's prefetch would buffer
    the whole file while we parse)."""

    WINDOW = 32  # requests of 32 KiB in flight

    def __init__(self, fh, size: int) -> None:
        self._fh, self._size, self._pos, self._buf = fh, size, 0, b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if not self._buf and self._pos < self._size:
            spans = []
            for _ in range(self.WINDOW):
                if self._pos >= self._size:
                    break
                step = min(32768, self._size - self._pos)
                spans.append((self._pos, step))
                self._pos += step
            self._buf = b"".join(self._fh.readv(spans))
        n = len(self._buf) if n is None or n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._fh.close()
        super().close()


class SFTPFiles:
    """The same two calls over a Fabric Connection's SFTP session."""

    def __init__(self, conn) -> None:
        self.name = f"{conn.user}@{conn.host}:{conn.port}"
        self._sftp = conn.sftp()

    def listdir(self, directory: str) -> list[str]:
        return [
            a.filename
            for a in self._sftp.listdir_attr(directory)
            if a.st_mode is None or stat.S_ISREG(a.st_mode)
        ]

    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        fh = self._sftp.open(path, "rb")
        return _Windowed(fh, fh.stat().st_size)  # type: ignore[return-value]


def log_files(source: LogSource, log: str) -> list[str]:
    """``log`` and its rotated files (``log.1`` ... ``log.N``, ``.gz`` too), oldest first."""
    directory, name = os.path.split(log)
    try:
        names = source.listdir(directory or ".")
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise EnvironmentProblem(f"{source.name}: cannot list {directory}: {exc}") from None
    rotated = re.compile(re.escape(name) + r"\.(\d+)(\.gz)?$")
    numbered = sorted(
        ((int(m.group(1)), n) for n in names if (m := rotated.match(n))), reverse=True
    )
    files = [os.path.join(directory, n) for _, n in numbered]
    if name in names:
        files.append(log)
    if not files:
        raise DataError(
            f"{source.name}: no log at {log}",
            hint="is the service writing one? ftctl serve logs beside its model link "
            "(<remote_dir>/logs/predictions.jsonl); pass --log PATH for another place",
        )
    return files


def read_log(
    source: LogSource, log: str, cfg: HarvestConfig, stats: ReadStats, since: str | None
) -> Iterator[Entry]:
    """The entries of ``log`` and its rotated files, streamed."""
    for path in log_files(source, log):
        label = path if source.name == "local" else f"{source.name}:{path}"
        stats.files.append(label)
        try:
            with source.open(path) as raw:
                fh = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
                yield from parse_lines(split_lines(fh), cfg, label, stats, since)
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            raise EnvironmentProblem(f"{source.name}: cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------- picking


@dataclass
class Candidate:
    """One distinct text worth a look (its most doubtful logged answer)."""

    entry: Entry
    reasons: set[str]
    seen: int = 1
    labels: set[str] = field(default_factory=set)

    @property
    def doubt(self) -> float:
        """Lower is more doubtful: the margin to the runner-up, else the score."""
        m = self.entry.margin
        return m if m is not None else self.entry.score


def reasons_for(e: Entry, cfg: HarvestConfig, pairs: set[frozenset[str]]) -> set[str]:
    out = set()
    if e.score < cfg.max_score:
        out.add("low_score")
    m = e.margin
    if m is not None and m < cfg.min_margin:
        out.add("small_margin")
    if (
        e.runner_up
        and frozenset((e.label, e.runner_up)) in pairs
        and (m is None or m < cfg.pair_margin)
    ):
        out.add("confused_pair")
    return out


@dataclass
class Harvest:
    rows: list[Candidate]
    stats: ReadStats
    distinct: int  # distinct texts read
    doubtful: int  # distinct texts with a reason
    excluded: int  # doubtful but already in the data
    per_intent: dict[str, int]
    per_reason: dict[str, int]


class Picker:
    """:func:`pick` one entry at a time: one :class:`Candidate` per distinct text."""

    def __init__(
        self, cfg: HarvestConfig, pairs: Sequence[tuple[str, str]], exclude: set[TextKey]
    ) -> None:
        self.cfg, self.exclude = cfg, exclude
        self.pairs = {frozenset(p) for p in pairs}
        self.by_text: dict[TextKey, Candidate] = {}

    def add(self, e: Entry) -> None:
        key = text_key(e.text or "")
        if not key:
            return
        c = self.by_text.get(key)
        if c is None:
            c = self.by_text[key] = Candidate(e, set(), 0)
        c.seen += 1
        c.labels.add(e.label)
        c.reasons |= reasons_for(e, self.cfg, self.pairs)
        if Candidate(e, set()).doubt < c.doubt:
            c.entry = e

    def result(self, stats: ReadStats | None = None) -> Harvest:
        """Keep the doubtful, leave out ``exclude``, cap at ``cfg.limit`` shared round-robin
        across predicted intents."""
        for c in self.by_text.values():
            if len(c.labels) > 1:
                c.reasons.add("inconsistent")
        doubtful = {k: c for k, c in self.by_text.items() if c.reasons}
        kept = [c for k, c in doubtful.items() if k not in self.exclude]
        chosen = _round_robin(kept, self.cfg.limit)
        per_intent: dict[str, int] = {}
        per_reason: dict[str, int] = {}
        for c in chosen:
            per_intent[c.entry.label] = per_intent.get(c.entry.label, 0) + 1
            for r in c.reasons:
                per_reason[r] = per_reason.get(r, 0) + 1
        return Harvest(
            chosen, stats or ReadStats(), len(self.by_text), len(doubtful),
            len(doubtful) - len(kept), dict(sorted(per_intent.items())),
            dict(sorted(per_reason.items())),
        )  # fmt: skip


def _round_robin(kept: list[Candidate], limit: int) -> list[Candidate]:
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(kept, key=lambda c: (c.doubt, -c.seen, c.entry.text)):
        groups.setdefault(c.entry.label, []).append(c)
    chosen: list[Candidate] = []
    queues = sorted(groups.values(), key=lambda g: g[0].doubt)
    while len(chosen) < limit and queues:
        for g in list(queues):
            if len(chosen) == limit:
                break
            chosen.append(g.pop(0))
            if not g:
                queues.remove(g)
    chosen.sort(key=lambda c: (c.entry.label, c.doubt))
    return chosen


def pick(
    entries: Iterable[Entry],
    cfg: HarvestConfig,
    pairs: Sequence[tuple[str, str]],
    *,
    exclude: set[TextKey] = frozenset(),  # type: ignore[assignment]
    stats: ReadStats | None = None,
) -> Harvest:
    """Deduplicate, keep the doubtful, leave out ``exclude`` (text keys), cap at
    ``cfg.limit`` shared round-robin across predicted intents."""
    picker = Picker(cfg, pairs, exclude)
    for e in entries:
        picker.add(e)
    return picker.result(stats)


# --------------------------------------------------------------------------- the review file


def review_csv(rows: Sequence[Candidate]) -> bytes:
    """The review file's bytes: UTF-8 with BOM, CRLF, quoted where needed."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(REVIEW_COLUMNS)
    for c in rows:
        e = c.entry
        w.writerow([
            to_cell(e.text or ""), e.label, f"{e.score:.4f}", e.runner_up or "",
            "" if e.runner_up_score is None else f"{e.runner_up_score:.4f}",
            " ".join(sorted(c.reasons)), c.seen, "",
        ])  # fmt: skip
    return buf.getvalue().encode("utf-8-sig")


def write_review(path: Path, rows: Sequence[Candidate], *, force: bool = False) -> Path:
    if path.exists() and not force:
        raise DataError(
            f"{path} exists (a review someone may be filling in)",
            hint="pass another --out, or --force to replace it",
        )
    return atomic_write_bytes(path, review_csv(rows))


def default_review_path(out_dir: Path) -> Path:
    return out_dir / f"review-{utc_file_stamp()}.csv"


def parse_since(value: str, now: float | None = None) -> str:
    """``7d``, ``12h``, ``30m`` ago, or an ISO date/time -> an ISO UTC string to compare to."""
    m = re.fullmatch(r"(\d+)([dhm])", value.strip())
    if m:
        seconds = int(m.group(1)) * {"d": 86400, "h": 3600, "m": 60}[m.group(2)]
        t = (time.time() if now is None else now) - seconds
        return utc_iso(t).removesuffix("Z")  # as a date given below: without the Z
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2})?)?Z?", value.strip()):
        return value.strip().replace(" ", "T").rstrip("Z")
    raise DataError(
        f"--since {value}: not a duration or a date",
        hint="write 7d, 12h or 30m, or a date like 2026-11-01 (UTC)",
    )


def harvest(
    sources: Iterable[tuple[LogSource, str]],
    cfg: HarvestConfig,
    pairs: Sequence[tuple[str, str]],
    *,
    exclude: set[TextKey] = frozenset(),  # type: ignore[assignment]
    since: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> Harvest:
    """Stream every (source, log path) through :func:`pick`. Errors if no line had a text."""
    stats = ReadStats()
    picker = Picker(cfg, pairs, exclude)
    for source, log in sources:
        progress(f"reading {source.name}:{log}")
        for entry in read_log(source, log, cfg, stats, since):
            picker.add(entry)
    if stats.entries == stats.without_text > 0:
        raise DataError(
            f"none of the {stats.entries} logged answers has a text (field '{cfg.text_field}')",
            hint="the service runs with --no-log-texts (nothing to review), or the log names "
            "the text differently: set [harvest] text_field",
        )
    if not stats.entries:
        why = f" (first bad line: {stats.first_bad})" if stats.first_bad else ""
        raise DataError(
            f"no logged answers in {', '.join(stats.files)}{why}",
            hint="let the service answer some requests first; for another service's log, "
            "set the field names in [harvest] (label_field, score_field, ...)",
        )
    if stats.bad_lines:
        progress(f"{stats.bad_lines} line(s) could not be read (first: {stats.first_bad})")
    return picker.result(stats)
