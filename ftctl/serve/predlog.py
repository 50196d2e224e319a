"""The prediction log: one JSON line per answered text, append-only, rotated by size.

A line: ``{"time", "text", "label", "score", "runner_up", "runner_up_score", "sha256"}``
(``time`` in UTC with milliseconds, scores rounded to 4 places, ``sha256`` the model's content
digest). With ``log_texts=False`` the text is left out (``"chars"``, its length, is kept):
nothing a user typed is written to disk.

- **Off the model thread.** ``write()`` only queues the batch (bounded: past ``max_queued``
  lines, new ones are dropped and counted); a writer thread of its own turns it into lines
  and writes them. A slow or full disk never holds up an answer.
- **Whole lines.** Each batch is one ``write()`` of whole lines to a file opened with
  O_APPEND. A write cut short (the disk filled up mid-way) is trimmed back to its last whole
  line, and the rest is written again later: the file only ever holds whole lines.
- **Retried until it works.** A write, rotation or open that fails keeps the lines and tries
  again (after ``retry[0]`` seconds, doubling up to ``retry[1]``); :meth:`status` says
  ``failing since …`` meanwhile (/health shows it), and ``ok`` once a write goes through.
- Rotation is logrotate's numbering: when a write would take ``path`` over ``max_bytes`` it is
  renamed ``path.1`` (``path.1`` -> ``path.2`` ... up to ``backups``; the oldest is dropped)
  and a fresh ``path`` is started. A file removed under it is opened again (its directory is
  not made again: the lines wait, and /health says so). ``reopen()`` (on SIGHUP) starts
  writing to ``path`` again, for an external logrotate, and makes its directory if needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ftctl.clock import utc_iso, utc_iso_ms
from ftctl.serve.model import Prediction

DEFAULT_NAME = "predictions.jsonl"


def default_path(model_dir: str | Path) -> Path:
    """Beside the link the service loads: ``<remote_dir>/logs/predictions.jsonl`` for
    ``<remote_dir>/final`` (harvest finds it there from the deploy profile)."""
    return Path(os.path.abspath(model_dir)).parent / "logs" / DEFAULT_NAME


def records(
    texts: Sequence[str],
    predictions: Sequence[Prediction],
    sha256: str,
    *,
    log_texts: bool,
    now: float | None = None,
) -> list[dict]:
    stamp = utc_iso_ms(time.time() if now is None else now)
    out = []
    for text, p in zip(texts, predictions, strict=True):
        rec: dict = {"time": stamp}
        rec |= {"text": text} if log_texts else {"chars": len(text)}
        rec |= {
            "label": p.label,
            "score": round(p.score, 4),
            "runner_up": p.runner_up,
            "runner_up_score": None if p.runner_up_score is None else round(p.runner_up_score, 4),
            "sha256": sha256,
        }
        out.append(rec)
    return out


class PredictionLog:
    """A size-rotated JSONL appender with a writer thread of its own. I/O errors go to
    ``on_error`` (once when it starts failing, once when it works again) and to
    :meth:`status`; they are never raised, and the lines are kept and retried."""

    def __init__(
        self,
        path: str | Path,
        *,
        log_texts: bool = True,
        max_bytes: int = 10 << 20,
        backups: int = 5,
        on_error: Callable[[dict], None] = lambda event: None,
        max_queued: int = 100_000,
        retry: tuple[float, float] = (0.5, 5.0),
    ) -> None:
        self.path = Path(path)
        self.log_texts = log_texts
        self.max_bytes = max_bytes
        self.backups = backups
        self.on_error = on_error
        self.max_queued = max_queued
        self.retry = retry
        self._cond = threading.Condition()
        self._queue: deque[tuple[float, Sequence[str], Sequence[Prediction], str]] = deque()
        self._lines = 0  # lines taken by write() and not written yet (queued or held)
        self._doing = "write"  # what the writer is at (for the error message)
        self._reopen = False
        self._closing = False
        self._fd: int | None = None
        self._size = 0
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.dropped = 0  # lines never written (the queue was full, or the log closed failing)
        self._died: str | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)  # at start only (see reopen)
        self._open()
        self._thread = threading.Thread(target=self._run, name="ftctl-predlog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    def write(self, texts: Sequence[str], predictions: Sequence[Prediction], sha256: str) -> None:
        """Queue one batch's lines (returns at once; never raises)."""
        now = time.time()
        with self._cond:
            if self._lines + len(texts) > self.max_queued or self._closing:
                self.dropped += len(texts)
                return
            self._queue.append((now, texts, predictions, sha256))
            self._lines += len(texts)
            self._cond.notify()

    def reopen(self) -> None:
        """Close and open ``path`` again, making its directory if it is gone (after an
        external rotation, or a recreated dir); done by the writer thread."""
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def status(self) -> str:
        """``ok``, or ``failing since <UTC time>: <error>``."""
        since = self.failing_since
        if since is None:
            return "ok"
        return f"failing since {utc_iso(since)}: {self.last_error}"

    def failure(self) -> str | None:
        """Why the writer thread is gone, else None."""
        if self._died is None and not self._thread.is_alive() and not self._closing:
            return "the prediction log's writer thread ended"
        return self._died

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued line is written (or ``timeout``); True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._lines or self._reopen:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (trying for at most ``timeout`` seconds), then stop."""
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 1)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._died = f"the prediction log's writer thread died: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._close_fd()
            with self._cond:
                self._cond.notify_all()

    def _loop(self) -> None:
        backoff = self.retry[0]
        chunks: deque[bytes] = deque()  # encoded batches (whole lines) not written yet
        while True:
            with self._cond:
                while not (self._queue or self._reopen or self._closing or chunks):
                    self._cond.wait()
                taken = list(self._queue)
                self._queue.clear()
                reopen, self._reopen = self._reopen, False
                closing = self._closing
            for batch in taken:
                try:
                    chunks.append(self._encode(*batch))
                except Exception as exc:  # a bug of ours: that batch is lost, and said so
                    self._written(len(batch[1]), lost=True)
                    self._report("prediction_log_error", f"cannot encode a batch: {exc!r}")
            try:
                if reopen:
                    self._doing = "open"
                    self._close_fd()
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._open()
                while chunks:
                    self._write_chunk(chunks[0])
                    self._written(chunks.popleft().count(b"\n"))
            except Exception as exc:  # OSError mostly; anything else is retried the same way
                if isinstance(exc, _ShortWrite):
                    self._written(chunks[0].count(b"\n") - exc.rest.count(b"\n"))
                    chunks[0] = exc.rest
                self._failing(exc)
                if closing and time.monotonic() >= self._close_by:
                    self._written(sum(c.count(b"\n") for c in chunks), lost=True)
                    return
                with self._cond:  # wait; a reopen or a close wakes it early
                    if not (self._reopen or (self._closing and not closing)):
                        self._cond.wait(backoff)
                backoff = min(backoff * 2, self.retry[1])
                continue
            self._recovered()
            backoff = self.retry[0]
            with self._cond:
                if closing and not self._queue:
                    return

    def _written(self, lines: int, *, lost: bool = False) -> None:
        with self._cond:
            self._lines -= lines
            if lost:
                self.dropped += lines
            self._cond.notify_all()

    def _encode(self, now: float, texts, predictions, sha256: str) -> bytes:
        recs = records(texts, predictions, sha256, log_texts=self.log_texts, now=now)
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd, self._size = fd, os.fstat(fd).st_size

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        self._close_fd()
        if self.backups < 1:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def _write_chunk(self, data: bytes) -> bytes:
        """Write ``data`` (whole lines), or raise OSError (:class:`_ShortWrite` with what is
        left, if only part of it went)."""
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            self._close_fd()  # the file was removed: lines written now would go nowhere
        if self._fd is None:
            self._doing = "open"
            self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self._doing = "rotate"
            self._rotate()
        self._doing = "write"
        n = os.write(self._fd, data)
        if n == len(data):
            self._size += n
            return
        whole = data.rfind(b"\n", 0, n) + 1  # the disk filled up mid-way: keep whole lines
        try:
            os.ftruncate(self._fd, self._size + whole)
        except OSError:  # cannot trim: finish the cut line later instead
            whole = n
        self._size += whole
        raise _ShortWrite(data[whole:])

    def _report(self, event: str, error: str | None = None, **more) -> None:
        with contextlib.suppress(Exception):  # stderr may be failing too
            self.on_error({"event": event, **({"error": error} if error else {}), **more})

    def _failing(self, exc: Exception) -> None:
        if isinstance(exc, _ShortWrite):
            why = os.strerror(errno.ENOSPC)
        else:
            why = getattr(exc, "strerror", None) or repr(exc)
        msg = f"cannot {self._doing} {self.path}: {why}"
        first = self.failing_since is None
        if first:
            self.failing_since = time.time()
        if first or msg != self.last_error:
            self.last_error = msg
            self._report("prediction_log_error", msg)

    def _recovered(self) -> None:
        if self.failing_since is None:
            return
        since, self.failing_since, self.last_error = self.failing_since, None, None
        self._report("prediction_log_ok", failing_since=utc_iso(since), dropped=self.dropped)


class _ShortWrite(OSError):
    """A write cut short; ``rest`` is what is left to write."""

    def __init__(self, rest: bytes) -> None:
        super().__init__(errno.ENOSPC, "short write")
        self.rest = rest
