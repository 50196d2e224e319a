"""``ftctl serve``: the reference inference service (docs/serve.md).

    model.py     Predictor (one model on its device, top-2 per text) and ModelHolder (reload)
    batching.py  Batcher: concurrent requests -> one length-sorted forward pass
    predlog.py   PredictionLog: every answer as a JSON line, rotated by size
    app.py       ServeApp: the ASGI app (routes, limits, JSON errors, access log)
    server.py    uvicorn's protocol with timeouts and a drain, LISTEN_FDS, signals

:func:`serve` puts them together and blocks until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from ftctl.serve.app import Limits, ServeApp
from ftctl.serve.batching import Answer, Batcher, Overloaded
from ftctl.serve.model import ModelHolder, Prediction, Predictor, load_predictor
from ftctl.serve.predlog import PredictionLog, default_path

if TYPE_CHECKING:
    from ftctl.config import ServeConfig

__all__ = [
    "Answer",
    "Batcher",
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


def build(cfg: ServeConfig, log: Callable[[dict], None]) -> tuple[ServeApp, PredictionLog | None]:
    """Load the model, open the prediction log, start the batcher; the app over them."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    log({"event": "loading", "model_dir": str(cfg.model_path)})
    holder = ModelHolder(
        cfg.model_path,
        max_length=cfg.max_length,
        device=cfg.device,
        batch_size=cfg.batch_size,
        log=log,
    )
    path = prediction_log_path(cfg)
    predlog = None
    if path is not None:
        predlog = PredictionLog(
            path,
            log_texts=cfg.log_texts,
            max_bytes=cfg.log_max_bytes,
            backups=cfg.log_backups,
            on_error=log,
        )
    batcher = Batcher(
        holder,
        max_batch=cfg.batch_size,
        max_wait=cfg.batch_wait_ms / 1000,
        max_pending=cfg.max_pending,
        on_batch=predlog.write if predlog else None,
        on_error=log,
    ).start()
    extra = {"prediction_log": path, "log_texts": cfg.log_texts if path else None}
    app = ServeApp(
        holder, batcher, limits(cfg), log=log, access_log=cfg.access_log,
        extra_health=lambda: extra,
    )  # fmt: skip
    return app, predlog


def serve(cfg: ServeConfig, *, log: Callable[[dict], None] = lambda event: None) -> None:
    """Load, listen (or take systemd's socket), serve until SIGTERM/SIGINT, drain, return.

    ``log`` gets one dict per event (loading, listening, reloaded, reload_failed, access,
    stopping, stopped, errors)."""
    from ftctl.serve import server as srv

    early = srv.PendingSignal(signal.SIGHUP).install()
    import uvicorn

    def events(event: dict) -> None:  # systemd learns when a reload has finished
        if event.get("event") in ("reloaded", "reload_failed"):
            srv.sd_notify("READY=1")
        log(event)

    # the socket first: a port in use fails at once, and clients that come during the load
    # wait in the kernel's queue instead of being refused
    inherited = srv.inherited_sockets()
    sockets = inherited or [srv.bind(cfg.host, cfg.port, cfg.backlog)]
    try:
        app, predlog = build(cfg, events)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    conf = uvicorn.Config(
        app,
        http=srv.protocol_class(srv.ConnectionLimits(cfg.header_timeout, cfg.max_connections)),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        backlog=cfg.backlog,
        timeout_keep_alive=cfg.keep_alive,
        timeout_graceful_shutdown=cfg.graceful_timeout,
    )
    server = uvicorn.Server(conf)
    srv.route_uvicorn_logs(log)

    def on_hup() -> None:
        log({"event": "sighup"})
        srv.sd_notify("RELOADING=1")
        if predlog is not None:
            predlog.reopen()
        app.holder.request_reload()

    # a SIGTERM from now until uvicorn takes over is remembered; and uvicorn re-raises the
    # SIGTERM it caught once it has drained: that lands here too, instead of killing us
    stop = srv.PendingSignal(signal.SIGTERM).install()
    p = app.holder.current
    log({"event": "listening", "address": ", ".join(srv.address(s) for s in sockets),
         "inherited": bool(inherited),
         "sha256": p.sha256, "model_dir": p.model_dir, "device": p.device,
         "prediction_log": prediction_log_path(cfg)})  # fmt: skip
    try:
        asyncio.run(srv.run_server(server, sockets, on_hup, early, stop))
    finally:
        log({"event": "stopping", "in_queue": app.batcher.pending})
        app.batcher.stop(timeout=cfg.graceful_timeout)
        if predlog is not None:
            predlog.close()
        log({"event": "stopped", "requests": app.batcher.requests})
