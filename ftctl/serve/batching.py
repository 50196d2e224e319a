"""Micro-batching: the requests that arrive together become one forward pass.

Request handlers ``submit()`` their texts and get a Future. One worker thread (the model
thread) takes what is queued and runs it as one length-sorted batch on the model the holder
serves at that moment, under the holder's batch lock (a reload swaps models between batches).

- **Waiting for company.** When the model falls idle, the worker waits at most ``max_wait``
  seconds for more requests, and only while it expects some: as many requests as the system
  held during the previous batch (closed-loop clients come back once answered). One client
  alone never waits; sixteen are gathered into one batch instead of alternating halves.
- **Admission.** The worker measures the service rate (texts per second, recent batches).
  A request that would find more work queued before it than can be done within
  ``predict_timeout`` is refused at once (:class:`Overloaded`, with the seconds after which a
  retry may fit), instead of waiting to time out. ``max_pending`` texts is a hard cap.
- **Cancelled work leaves the queue**: a request that times out or whose client left cancels
  its Future, and its texts stop counting at once.
- **Nothing dies silently.** A batch that fails is run request by request (one bad request
  cannot fail the others); a request that fails alone gets its exception. Anything else a
  batch raises is given to its requests too, and serving goes on. If the thread dies anyway,
  the queued requests are failed and :meth:`Batcher.failure` says why (/health turns 503 and
  the process exits non-zero).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ftctl.serve.model import Prediction

ADMIT_SHARE = 0.8  # of predict_timeout that queued work may fill (the rate is an estimate)
RATE_WINDOW = 16  # batches the service rate is measured over


class Overloaded(Exception):
    """More work is queued than can be done in time: answer 503, retry after ``retry_after``
    seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Answer:
    """What one request gets back: its predictions and the model that made them."""

    predictions: list[Prediction]
    sha256: str


@dataclass(eq=False)
class _Item:
    texts: Sequence[str]
    future: Future
    queued: float = field(default_factory=time.monotonic)
    taken: bool = False  # out of the queue (into a batch, or cancelled)


class ServiceRate:
    """Texts per second through the model over the last ``window`` batches (their texts over
    their seconds, so a long batch weighs more). ``first`` seeds it: (texts, seconds)."""

    def __init__(self, window: int = RATE_WINDOW, first: tuple[int, float] | None = None) -> None:
        self._batches: deque[tuple[int, float]] = deque(maxlen=window)
        if first is not None and first[1] > 0:
            self._batches.append(first)

    def add(self, texts: int, seconds: float) -> None:
        if seconds > 0:
            self._batches.append((texts, seconds))

    def per_second(self) -> float | None:
        seconds = sum(s for _, s in self._batches)
        return sum(n for n, _ in self._batches) / seconds if seconds > 0 else None


def _guarded(report: Callable[[dict], None]) -> Callable[[dict], None]:
    """``report`` that never raises (a log on a full disk must not stop the model thread)."""

    def call(event: dict) -> None:
        with contextlib.suppress(Exception):
            report(event)

    return call


class Batcher:
    """A bounded queue and the one thread that runs the model.

    ``holder`` has a ``current`` predictor (``.predict(texts)``, ``.sha256``) and a
    ``batch_lock``; ``current`` is read under the lock once per batch, so a reload never mixes
    two models in one answer. ``on_batch(texts, predictions, sha256)`` gets what was answered,
    after the futures are set (the prediction log; it must not block)."""

    def __init__(
        self,
        holder,
        *,
        max_batch: int = 64,
        max_wait: float = 0.010,
        max_pending: int = 1024,
        predict_timeout: float = 30.0,
        on_batch: Callable[[list[str], list[Prediction], str], None] | None = None,
        on_error: Callable[[dict], None] = lambda event: None,
    ) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_pending = max_pending
        self.predict_timeout = predict_timeout
        self.on_batch = on_batch
        self.report = _guarded(on_error)
        warm = getattr(holder.current, "warm_seconds", 0.0)
        self.rate = ServiceRate(first=(1, warm) if warm else None)
        self._queue: deque[_Item] = deque()
        self._pending = 0  # texts queued
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: list[_Item] = []
        self._expected = 0  # requests the system held during the last batch
        self._idle_since = time.monotonic()
        self._died: str | None = None
        self.requests = 0
        self.texts = 0
        self.batches = 0
        self.largest_batch = 0
        self.refused = 0
        self.cancelled = 0
        self.failed = 0

    # ------------------------------------------------------------------ producer side

    def submit(self, texts: Sequence[str]) -> Future:
        """Queue ``texts`` (one request); the Future resolves to an :class:`Answer`.
        :class:`Overloaded` at once if it cannot be answered in time."""
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                raise Overloaded(self._died or "the service is shutting down")
            self._admit(len(texts))
            item = _Item(texts, fut)
            self._queue.append(item)
            self._pending += len(texts)
            self._cond.notify()
        fut.add_done_callback(lambda f: self._forget(item) if f.cancelled() else None)
        return fut

    def admit_limit(self) -> int:
        """Texts that may wait: what the model does in ADMIT_SHARE of predict_timeout at the
        measured rate (at least one full batch), at most ``max_pending``."""
        rate = self.rate.per_second()
        if rate is None:
            return self.max_pending
        fits = int(rate * self.predict_timeout * ADMIT_SHARE)
        return min(self.max_pending, max(self.max_batch, fits))

    def _admit(self, n: int) -> None:
        """Refuse (Overloaded) a request of ``n`` texts that would wait too long; a request
        that finds the queue empty is always taken."""
        if not self._pending:
            return
        limit = self.admit_limit()
        if self._pending + n <= limit:
            return
        self.refused += 1
        rate = self.rate.per_second()
        retry = math.ceil((self._pending + n - limit) / rate) if rate else 1
        if limit >= self.max_pending:
            why = f"{self._pending} texts are waiting for the model (at most {self.max_pending})"
        else:
            why = (
                f"{self._pending} texts are waiting for the model, about "
                f"{self._pending / rate:.1f} s of work at {rate:.0f} texts/s; answers are due "
                f"within {self.predict_timeout:g} s"
            )
        raise Overloaded(why, retry_after=max(1, retry))

    def _forget(self, item: _Item) -> None:
        """A cancelled request leaves the queue (if the worker has not taken it yet)."""
        with self._cond:
            if item.taken:
                return
            item.taken = True
            self._queue.remove(item)
            self._pending -= len(item.texts)
            self.cancelled += 1

    @property
    def pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ worker side

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._run, name="ftctl-model", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def failure(self) -> str | None:
        """Why the model thread is gone (it died, or ended without being stopped), else None."""
        if self._died is not None:
            return self._died
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the model thread ended"
        return None

    def _more_expected(self) -> bool:
        return len(self._queue) < self._expected and self._pending < self.max_batch

    def _take(self) -> list[_Item] | None:
        """Wait for work; gather up to ``max_batch`` texts; None once stopped and empty."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = max(self._queue[0].queued, self._idle_since) + self.max_wait
            while self._more_expected() and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            items: list[_Item] = []
            n = 0
            while self._queue and (not items or n + len(self._queue[0].texts) <= self.max_batch):
                item = self._queue.popleft()
                item.taken = True
                self._pending -= len(item.texts)
                if item.future.set_running_or_notify_cancel():  # False: the client gave up
                    items.append(item)
                    n += len(item.texts)
            self._running = items
            return items

    def _run(self) -> None:
        try:
            while (items := self._take()) is not None:
                if not items:
                    continue
                try:
                    self.run_batch(items)
                except Exception as exc:  # a bug of ours: its requests get it; serving goes on
                    self._fail(items, exc)
                with self._cond:
                    self._expected = len(items) + len(self._queue)
                    self._idle_since = time.monotonic()
                    self._running = []
        except BaseException as exc:
            self._died = f"the model thread died: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._abandon()

    def _fail(self, items: list[_Item], exc: BaseException) -> None:
        self.report({"event": "batch_failed", "error": f"{type(exc).__name__}: {exc}"})
        for item in items:
            if not item.future.done():
                self.failed += 1
                item.future.set_exception(exc)

    def _abandon(self) -> None:
        """The worker is ending: nothing more is taken, and nothing is left waiting."""
        with self._cond:
            self._stopping = True
            left = [*self._running, *self._queue]
            for item in self._queue:
                item.taken = True
            self._queue.clear()
            self._pending = 0
        gone = RuntimeError(self._died or "the service stopped")
        for item in left:
            with contextlib.suppress(Exception):  # already answered, or cancelled
                if not item.future.done():
                    item.future.set_exception(gone)

    def _predict(self, predictor, items: list[_Item]) -> list[tuple[_Item, object]]:
        """(item, its predictions or its exception) for each item: one pass over all texts;
        if that fails, each request alone."""
        texts = [t for item in items for t in item.texts]
        try:
            predictions = predictor.predict(texts)
        except Exception as exc:
            if len(items) == 1:
                self.report({"event": "predict_failed", "error": f"{type(exc).__name__}: {exc}"})
                return [(items[0], exc)]
            return [done for item in items for done in self._predict(predictor, [item])]
        out: list[tuple[_Item, object]] = []
        start = 0
        for item in items:
            out.append((item, predictions[start : start + len(item.texts)]))
            start += len(item.texts)
        return out

    def run_batch(self, items: list[_Item]) -> None:
        """Run ``items`` as one batch on the current model; answer each request."""
        with self.holder.batch_lock:
            predictor = self.holder.current
            t0 = time.perf_counter()
            results = self._predict(predictor, items)
            seconds = time.perf_counter() - t0
            answered_texts: list[str] = []
            answered: list[Prediction] = []
            for item, result in results:
                if isinstance(result, BaseException):
                    self.failed += 1
                    item.future.set_exception(result)
                    continue
                item.future.set_result(Answer(result, predictor.sha256))
                answered_texts += item.texts
                answered += result
        n = sum(len(item.texts) for item in items)
        if len(answered) == n:
            self.rate.add(n, seconds)
        self.requests += len(items)
        self.texts += n
        self.batches += 1
        self.largest_batch = max(self.largest_batch, n)
        if self.on_batch is not None and answered:
            try:
                self.on_batch(answered_texts, answered, predictor.sha256)
            except Exception as exc:  # a log that fails must not stop the service
                self.report({"event": "log_failed", "error": f"{type(exc).__name__}: {exc}"})

    def stats(self) -> dict:
        rate = self.rate.per_second()
        return {
            "requests": self.requests,
            "texts": self.texts,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "pending": self._pending,
            "max_batch": self.max_batch,
            "max_pending": self.max_pending,
            "texts_per_second": None if rate is None else round(rate, 1),
            "admit_limit": self.admit_limit(),
            "refused": self.refused,
            "cancelled": self.cancelled,
            "failed": self.failed,
        }
