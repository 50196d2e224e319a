"""``ftctl serve``: the reference inference service (docs/serve.md).

    model.py     Predictor (one model on its device, top-2 per text) and ModelHolder (reload)
    batching.py  Batcher: concurrent requests -> one length-sorted forward pass
    predlog.py   PredictionLog: every answer as a JSON line, rotated by size
    app.py       ServeApp: the ASGI app (routes, limits, JSON errors, access log)
    server.py    uvicorn's config and protocol (head timeout, graceful close, drain),
                 LISTEN_FDS, signals

:func:`serve` puts them together and blocks until SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ftctl.clock import utc_iso
from ftctl.errors import FtctlError
from ftctl.serve.app import Limits, ServeApp
from ftctl.serve.batching import Answer, Batcher, Overloaded
from ftctl.serve.model import ModelHolder, Prediction, Predictor, load_predictor
from ftctl.serve.predlog import PredictionLog, default_path

if TYPE_CHECKING:
    from ftctl.config import ServeConfig

__all__ = [
    "Answer",
    "Batcher",
    "EventLog",
    "Limits",
    "ModelHolder",
    "Overloaded",
    "Prediction",
    "PredictionLog",
    "Predictor",
    "ServeApp",
    "build",
    "load_predictor",
    "prediction_log_path",
    "serve",
]


def prediction_log_path(cfg: ServeConfig) -> str | None:
    """Where the prediction log goes: ``[serve] prediction_log``, "off" for none, default
    ``<dir of model_path>/logs/predictions.jsonl``."""
    if cfg.prediction_log == "off":
        return None
    return cfg.prediction_log or str(default_path(cfg.model_path))


def limits(cfg: ServeConfig) -> Limits:
    return Limits(
        max_body=cfg.max_body,
        max_texts=cfg.max_texts,
        max_chars=cfg.max_chars,
        body_timeout=cfg.body_timeout,
        predict_timeout=cfg.predict_timeout,
        max_in_flight=cfg.max_in_flight,
    )


class EventLog:
    """The service's ``log`` made safe to call from any thread: it never raises. A write
    that fails (stderr on a full disk, a pipe nobody reads any more) is remembered, and
    :meth:`status` (``stderr`` in /health) says ``failing since …`` until one goes through."""

    def __init__(self, write: Callable[[dict], None]) -> None:
        self._write = write
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.failed = 0  # events that could not be written

    def __call__(self, event: dict) -> None:
        try:
            self._write(event)
        except Exception as exc:
            self.failed += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.failing_since is None:
                self.failing_since = time.time()
            return
        self.failing_since = None

    def status(self) -> str:
        since = self.failing_since
        return "ok" if since is None else f"failing since {utc_iso(since)}: {self.last_error}"


def build(cfg: ServeConfig, log: Callable[[dict], None]) -> tuple[ServeApp, PredictionLog | None]:
    """Load the model, open the prediction log, start the batcher; the app over them."""
    events = log if isinstance(log, EventLog) else EventLog(log)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    events({"event": "loading", "model_dir": str(cfg.model_path)})
    holder = ModelHolder(
        cfg.model_path,
        max_length=cfg.max_length,
        device=cfg.device,
        batch_size=cfg.batch_size,
        log=events,
    )
    path = prediction_log_path(cfg)
    predlog = None
    if path is not None:
        predlog = PredictionLog(
            path,
            log_texts=cfg.log_texts,
            max_bytes=cfg.log_max_bytes,
            backups=cfg.log_backups,
            on_error=events,
        )
    batcher = Batcher(
        holder,
        max_batch=cfg.batch_size,
        max_wait=cfg.batch_wait_ms / 1000,
        max_pending=cfg.max_pending,
        predict_timeout=cfg.predict_timeout,
        on_batch=predlog.write if predlog else None,
        on_error=events,
    ).start()

    def extra() -> dict:
        return {
            "prediction_log": path,
            "log_texts": cfg.log_texts if path else None,
            "log": predlog.status() if predlog else "off",
            "log_lines_dropped": predlog.dropped if predlog else 0,
            "stderr": events.status(),
        }

    app = ServeApp(
        holder, batcher, limits(cfg), log=events, access_log=cfg.access_log,
        extra_health=extra, failures=predlog.failure if predlog else lambda: None,
    )  # fmt: skip
    # what the imports and the load made lives as long as the process: out of the collector's
    # passes from now on (a full pass over it stalls every thread for 0.1-0.4 s on 2 cores,
    # and the last one, at exit, took a second)
    gc.collect()
    gc.freeze()
    return app, predlog


def serve(cfg: ServeConfig, *, log: Callable[[dict], None] = lambda event: None) -> None:
    """Load, listen (or take systemd's socket), serve until SIGTERM/SIGINT, drain, return.

    ``log`` gets one dict per event (loading, listening, reloaded, reload_failed, access,
    stopping, stopped, errors); it may raise (a full disk under stderr): the service goes on.
    SIGTERM/SIGINT during the load return at once. FtctlError if a thread of the service
    died: the service stopped, for its manager to start it again."""
    from ftctl.serve import server as srv

    stop = srv.StopSignal().install()
    early_hup = srv.PendingSignal(signal.SIGHUP).install()

    def write(event: dict) -> None:  # systemd learns when a reload has finished
        if event.get("event") in ("reloaded", "reload_failed"):
            srv.sd_notify("READY=1")
        log(event)

    events = EventLog(write)

    # the socket first: a port in use fails at once, and clients that come during the load
    # wait in the kernel's queue instead of being refused
    inherited = srv.inherited_sockets()
    sockets = inherited or [srv.bind(cfg.host, cfg.port, cfg.backlog)]
    try:
        import uvicorn

        app, predlog = build(cfg, events)
        stop.loaded()
    except srv.Stop:
        for sock in sockets:
            sock.close()
        events({"event": "stopped", "during": "load"})
        return
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    server = uvicorn.Server(srv.uvicorn_config(app, cfg))
    stop.attach(server)
    srv.route_uvicorn_logs(events)

    def on_hup() -> None:
        events({"event": "sighup"})
        srv.sd_notify("RELOADING=1")
        if predlog is not None:
            predlog.reopen()
        app.holder.request_reload()

    failed: list[str] = []

    def on_failure(why: str) -> None:
        failed.append(why)
        events({"event": "fatal", "error": why})

    p = app.holder.current
    events({"event": "listening", "address": ", ".join(srv.address(s) for s in sockets),
            "inherited": bool(inherited),
            "sha256": p.sha256, "model_dir": p.model_dir, "device": p.device,
            "prediction_log": prediction_log_path(cfg)})  # fmt: skip
    try:
        asyncio.run(srv.run_server(server, sockets, on_hup, early_hup, app.failure, on_failure))
    finally:
        events({"event": "stopping", "in_queue": app.batcher.pending})
        app.batcher.stop(timeout=cfg.graceful_timeout)
        if predlog is not None:
            predlog.close()
        events({"event": "stopped", "requests": app.batcher.requests})
    if failed:
        raise FtctlError(
            f"the service stopped: {failed[0]}",
            hint="/health said so (503); a service manager (Restart=) starts it again",
        )
