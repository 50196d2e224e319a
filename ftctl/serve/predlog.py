"""The prediction log: one JSON line per answered text, append-only, rotated by size.

A line: ``{"time", "text", "label", "score", "runner_up", "runner_up_score", "sha256"}``
(``time`` in UTC with milliseconds, scores rounded to 4 places, ``sha256`` the model's content
digest). With ``log_texts=False`` the text is left out (``"chars"``, its length, is kept):
nothing a user typed is written to disk.

Rotation is logrotate's numbering: when a write would take ``path`` over ``max_bytes`` it is
renamed ``path.1`` (``path.1`` -> ``path.2`` ... up to ``backups``; the oldest is dropped) and
a fresh ``path`` is started. Each batch is one ``write()`` of whole lines to a file opened
with O_APPEND, so a reader never sees half a line. ``reopen()`` (on SIGHUP) starts writing to
``path`` again, for an external logrotate.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ftctl.serve.model import Prediction

DEFAULT_NAME = "predictions.jsonl"


def default_path(model_dir: str | Path) -> Path:
    """Beside the link the service loads: ``<remote_dir>/logs/predictions.jsonl`` for
    ``<remote_dir>/final`` (harvest finds it there from the deploy profile)."""
    return Path(os.path.abspath(model_dir)).parent / "logs" / DEFAULT_NAME


def _utc_ms(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def records(
    texts: Sequence[str], predictions: Sequence[Prediction], sha256: str, *, log_texts: bool
) -> list[dict]:
    now = _utc_ms(time.time())
    out = []
    for text, p in zip(texts, predictions, strict=True):
        rec: dict = {"time": now}
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
    """Thread-safe appender with size rotation. I/O errors are reported through ``on_error``
    (once per kind) and never raised: a full disk must not stop the predictions."""

    def __init__(
        self,
        path: str | Path,
        *,
        log_texts: bool = True,
        max_bytes: int = 10 << 20,
        backups: int = 5,
        on_error: Callable[[dict], None] = lambda event: None,
    ) -> None:
        self.path = Path(path)
        self.log_texts = log_texts
        self.max_bytes = max_bytes
        self.backups = backups
        self.on_error = on_error
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._last_error: str | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)  # at start only (see reopen)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd, self._size = fd, os.fstat(fd).st_size

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _error(self, what: str, exc: OSError) -> None:
        msg = f"{what} {self.path}: {exc.strerror or exc}"
        if msg != self._last_error:  # once per kind, not once per batch
            self._last_error = msg
            self.on_error({"event": "prediction_log_error", "error": msg})

    def _rotate(self) -> None:
        self._close()
        if self.backups < 1:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write(self, texts: Sequence[str], predictions: Sequence[Prediction], sha256: str) -> None:
        recs = records(texts, predictions, sha256, log_texts=self.log_texts)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
        with self._lock:
            try:
                if self._fd is not None and self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
            except OSError as exc:  # e.g. the directory was removed: keep the open file
                self._error("cannot rotate", exc)
                if self._fd is None:
                    with contextlib.suppress(OSError):
                        self._open()
            if self._fd is None:
                return
            try:
                os.write(self._fd, data)
                self._size += len(data)
                self._last_error = None
            except OSError as exc:
                self._error("cannot write", exc)

    def reopen(self) -> None:
        """Close and open ``path`` again (after an external rotation, or a recreated dir)."""
        with self._lock:
            self._close()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
                self._last_error = None
            except OSError as exc:
                self._error("cannot open", exc)

    def close(self) -> None:
        with self._lock:
            self._close()
