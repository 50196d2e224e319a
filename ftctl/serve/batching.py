"""Micro-batching: the requests that arrive together become one forward pass.

Request handlers ``submit()`` their texts and get a Future. One worker thread takes what is
queued, waits at most ``max_wait`` seconds for more (only when the first request found the
model idle: under load the queue fills while the previous batch runs), and runs everything it
took as one length-sorted batch on the model the holder serves at that moment. The queue is
bounded (``max_pending`` texts): beyond it ``submit()`` raises :class:`Overloaded` at once
instead of letting latency grow without end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ftctl.serve.model import Prediction


class Overloaded(Exception):
    """The queue holds ``max_pending`` texts already: answer 503, retry later."""


@dataclass(frozen=True)
class Answer:
    """What one request gets back: its predictions and the model that made them."""

    predictions: list[Prediction]
    sha256: str


@dataclass
class _Item:
    texts: Sequence[str]
    future: Future
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    """A bounded queue and the one thread that runs the model.

    ``holder`` has a ``current`` predictor (``.predict(texts)``, ``.sha256``); it is read once
    per batch, so a reload never mixes two models in one answer. ``on_batch(texts,
    predictions, sha256)`` is called after the futures are set (the prediction log)."""

    def __init__(
        self,
        holder,
        *,
        max_batch: int = 64,
        max_wait: float = 0.003,
        max_pending: int = 1024,
        on_batch: Callable[[list[str], list[Prediction], str], None] | None = None,
        on_error: Callable[[dict], None] = lambda event: None,
    ) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_pending = max_pending
        self.on_batch = on_batch
        self.on_error = on_error
        self._queue: deque[_Item] = deque()
        self._pending = 0  # texts queued
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.requests = 0
        self.texts = 0
        self.batches = 0
        self.largest_batch = 0

    # ------------------------------------------------------------------ producer side

    def submit(self, texts: Sequence[str]) -> Future:
        """Queue ``texts`` (one request); the Future resolves to an :class:`Answer`."""
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                raise Overloaded("the service is shutting down")
            if self._pending + len(texts) > self.max_pending:
                raise Overloaded(
                    f"{self._pending} texts are waiting for the model (at most {self.max_pending})"
                )
            self._queue.append(_Item(texts, fut))
            self._pending += len(texts)
            self._cond.notify()
        return fut

    @property
    def pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ worker side

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._run, name="ftctl-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[_Item] | None:
        """Wait for work; gather up to ``max_batch`` texts; None once stopped and empty."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].queued + self.max_wait
            while self._pending < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            items: list[_Item] = []
            n = 0
            while self._queue and (not items or n + len(self._queue[0].texts) <= self.max_batch):
                item = self._queue.popleft()
                self._pending -= len(item.texts)
                if item.future.set_running_or_notify_cancel():  # False: the client gave up
                    items.append(item)
                    n += len(item.texts)
            return items

    def _run(self) -> None:
        while (items := self._take()) is not None:
            if items:
                self.run_batch(items)

    def run_batch(self, items: list[_Item]) -> None:
        """One forward pass over all texts of ``items``; if it fails, each request alone (so
        one bad request cannot fail the others)."""
        predictor = self.holder.current
        texts = [t for item in items for t in item.texts]
        try:
            predictions = predictor.predict(texts)
        except Exception as exc:
            if len(items) > 1:
                for item in items:
                    self.run_batch([item])
                return
            self.on_error({"event": "predict_failed", "error": f"{type(exc).__name__}: {exc}"})
            items[0].future.set_exception(exc)
            return
        self.requests += len(items)
        self.texts += len(texts)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(texts))
        start = 0
        for item in items:
            end = start + len(item.texts)
            item.future.set_result(Answer(predictions[start:end], predictor.sha256))
            start = end
        if self.on_batch is not None:
            try:
                self.on_batch(texts, predictions, predictor.sha256)
            except Exception as exc:  # a log that fails must not stop the service
                self.on_error({"event": "log_failed", "error": f"{type(exc).__name__}: {exc}"})

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "texts": self.texts,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "pending": self._pending,
            "max_batch": self.max_batch,
            "max_pending": self.max_pending,
        }
