"""The model side of the service: one loaded model (:class:`Predictor`) and the holder that
swaps in a new one on reload (:class:`ModelHolder`).

A reload loads the model the link points at *now* beside the old one, warms it, then swaps
one reference under the batch lock (:attr:`ModelHolder.batch_lock`): the batch running then
finishes on the old model, the next one runs on the new, and /health never names a model other
than the one answering. A deploy that reloads instead of restarting fails zero requests. A
model that does not load leaves the old one serving, and /health says so at once
(``reload.state`` = ``failed``, ``last_reload_error``). The reload thread catches everything;
if it dies anyway, :meth:`ModelHolder.failure` says so (/health turns 503, the process exits).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftctl.clock import utc_iso
from ftctl.manifest import model_digest
from ftctl.model.files import check_supported, read_labels
from ftctl.model.inference import batch_probabilities

WARMUP_TEXT = "预热"


@dataclass(frozen=True)
class Prediction:
    """The best label of one text, and the runner-up (None for a one-label model)."""

    label: str
    score: float
    runner_up: str | None
    runner_up_score: float | None


@dataclass
class Predictor:
    """One model, loaded once onto its device; never moved again."""

    model_dir: str  # realpath it was loaded from
    sha256: str  # content digest (ftctl.manifest.model_digest), as deploy names releases
    labels: list[str]
    model: object
    tokenizer: object
    max_length: int = 64
    device: str = "cpu"
    batch_size: int = 64  # texts per forward pass
    warm_seconds: float = 0.0  # one pass over one short text, once warmed up

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Top-2 labels of every text, in input order: length-sorted forward passes of at most
        ``batch_size`` texts under ``torch.inference_mode()`` (little padding per pass).

        Not thread-safe (a fast tokenizer is not): the service calls it from one thread."""
        out: list[Prediction | None] = [None] * len(texts)

        def top_two(idx: list[int], probs) -> None:
            top = probs.topk(min(2, probs.shape[-1]), dim=-1)
            best = zip(idx, top.values.tolist(), top.indices.tolist(), strict=True)
            for i, vals, ids in best:
                second = len(ids) > 1
                out[i] = Prediction(
                    self.labels[ids[0]],
                    vals[0],
                    self.labels[ids[1]] if second else None,
                    vals[1] if second else None,
                )

        batch_probabilities(
            self.model, self.tokenizer, texts, batch_size=self.batch_size,
            max_length=self.max_length, device=self.device, each=top_two,
        )  # fmt: skip
        return out  # type: ignore[return-value]


def load_predictor(
    model_dir: str | Path, *, max_length: int = 64, device: str = "cpu", batch_size: int = 64
) -> Predictor:
    """Resolve the link now and load what it points at (cheap checks first, then the weights),
    then run warm-up passes so that the first request does not pay for lazy set-up (the
    second one is timed: ``warm_seconds``)."""
    from ftctl.model.files import load_classifier
    from ftctl.model.inference import resolve_device

    real = os.path.realpath(model_dir)
    check_supported(real)
    labels = read_labels(real)
    digest = model_digest(real)
    device = resolve_device(device)
    model, tokenizer = load_classifier(real, device=device)
    p = Predictor(real, digest, labels, model, tokenizer, max_length, device, batch_size)
    p.predict([WARMUP_TEXT])
    t0 = time.perf_counter()
    p.predict([WARMUP_TEXT])  # timed warm: a first guess at the service rate
    p.warm_seconds = time.perf_counter() - t0
    return p


class ModelHolder:
    """The live predictor. ``reload()`` swaps in a new one only once it has loaded;
    ``request_reload()`` (what SIGHUP calls) runs it in a background thread, and a request
    that comes while one runs starts another one right after it (the link may have moved).
    ``log`` may fail (a full disk under stderr): that never stops a reload."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_length: int = 64,
        device: str = "cpu",
        batch_size: int = 64,
        log: Callable[[dict], None] = lambda event: None,
    ) -> None:
        self.model_dir = str(model_dir)
        self._load_args = {"max_length": max_length, "device": device, "batch_size": batch_size}
        self.log = log
        self.current = load_predictor(model_dir, **self._load_args)
        self.batch_lock = threading.Lock()  # held by the batcher for a batch; the swap takes it
        self.started = utc_iso()
        self.reload_attempts = 0  # reloads started
        self.reloads = 0  # reloads that swapped a new model in
        self.reload_failures = 0
        self.last_error: str | None = None
        self.last_reload: dict | None = None  # the latest attempt: see health()
        self._reload_lock = threading.Lock()  # one load at a time
        self._state_lock = threading.Lock()  # the request_reload bookkeeping
        self._worker: threading.Thread | None = None
        self._again = False
        self._died: str | None = None  # the reload thread ended by something it could not catch

    def _report(self, event: dict) -> None:
        with contextlib.suppress(Exception):
            self.log(event)

    def swap(self, new: Predictor) -> Predictor:
        """Serve ``new`` from the next batch on (waits for the batch running now)."""
        with self.batch_lock:
            old, self.current = self.current, new
        return old

    def reload(self) -> bool:
        """Load what the link points at now; swap it in if it loaded. Never raises."""
        with self._reload_lock:
            self.reload_attempts += 1
            target = os.path.realpath(self.model_dir)
            attempt = {"state": "loading", "model_dir": target, "started": utc_iso()}
            self.last_reload = attempt
            t0 = time.monotonic()
            try:
                new = load_predictor(self.model_dir, **self._load_args)
            except Exception as exc:  # any failure keeps the old model serving
                self.reload_failures += 1
                self.last_error = str(getattr(exc, "message", exc))
                self.last_reload = attempt | {
                    "state": "failed",
                    "error": self.last_error,
                    "seconds": round(time.monotonic() - t0, 2),
                }
                self._report({"event": "reload_failed", "serving": self.current.sha256[:8],
                              "model_dir": target, "error": self.last_error})  # fmt: skip
                return False
            old = self.swap(new)
            self.reloads += 1
            self.last_error = None
            self.last_reload = attempt | {
                "state": "ok",
                "model_dir": new.model_dir,
                "sha256": new.sha256,
                "seconds": round(time.monotonic() - t0, 2),
            }
            self._report({"event": "reloaded", "old": old.sha256[:8], "new": new.sha256[:8],
                          "model_dir": new.model_dir,
                          "seconds": self.last_reload["seconds"]})  # fmt: skip
            return True

    def request_reload(self) -> None:
        """Reload in the background; if one is running, run one more after it."""
        with self._state_lock:
            if self._worker is not None:
                self._again = True
                return
            self._worker = threading.Thread(target=self._reload_loop, name="ftctl-reload")
            self._worker.daemon = True
            self._worker.start()

    def _reload_loop(self) -> None:
        try:
            while True:
                try:
                    self.reload()
                except Exception as exc:  # a bug of ours: reported, and the next SIGHUP works
                    self.last_error = f"reload crashed: {type(exc).__name__}: {exc}"
                    self._report({"event": "reload_crashed", "error": self.last_error})
                with self._state_lock:
                    if not self._again:
                        self._worker = None
                        return
                    self._again = False
        except BaseException as exc:
            self._died = f"the reload thread died: {type(exc).__name__}: {exc}"
            raise
        finally:
            with self._state_lock:
                if self._worker is threading.current_thread():
                    self._worker = None

    def failure(self) -> str | None:
        """Why the service cannot go on (the reload thread died), else None."""
        return self._died

    def wait_reloads(self, timeout: float | None = None) -> None:
        """Block until no background reload runs (tests and shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._state_lock:
                worker = self._worker
            if worker is None:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            worker.join(left)

    def health(self) -> dict:
        p = self.current
        return {
            "status": "ok",
            "sha256": p.sha256,
            "labels": p.labels,
            "model_dir": p.model_dir,
            "device": p.device,
            "max_length": p.max_length,
            "pid": os.getpid(),
            "started": self.started,
            "reload_attempts": self.reload_attempts,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "reloading": self._worker is not None or self._reload_lock.locked(),
            "reload": self.last_reload,
            "last_reload_error": self.last_error,
        }
