"""ftctl serve: the reference inference service (predict, health, hot reload on SIGHUP)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ftctl.cli import common
from ftctl.clock import utc_iso
from ftctl.config import ServeConfig, with_flags
from ftctl.errors import ConfigError


def _log_line(event: dict) -> None:
    """One JSON object per line on stderr (journald, supervisor and `jq` read it as is)."""
    line = {"time": utc_iso()} | event
    sys.stderr.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    sys.stderr.flush()


# `ftctl serve`'s options, declared once (the command's signature names them)
ModelPathOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-path",
        "--model-dir",
        help="Model directory or the deploy link (e.g. .../final).",
    ),
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[
    int | None,
    typer.Option("--port", help="TCP port.", show_default=common.default_text(ServeConfig, "port")),
]
MaxLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        help="Tokens per text.",
        show_default=common.default_text(ServeConfig, "max_length"),
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="torch CPU threads (0: one per core).",
        show_default=common.default_text(ServeConfig, "threads"),
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Most texts in one forward pass.",
        show_default=common.default_text(ServeConfig, "batch_size"),
    ),
]
BatchWaitMsOpt = Annotated[
    float | None,
    typer.Option(
        "--batch-wait-ms",
        help="Longest wait of an idle model for the requests it expects (never for one "
        "client alone).",
        show_default=common.default_text(ServeConfig, "batch_wait_ms"),
    ),
]
MaxPendingOpt = Annotated[
    int | None,
    typer.Option(
        "--max-pending",
        help="Texts waiting for the model before 503.",
        show_default=common.default_text(ServeConfig, "max_pending"),
    ),
]
PredictionLogOpt = Annotated[
    str | None,
    typer.Option(
        "--prediction-log",
        help="JSONL log of every answer, or 'off'.",
        show_default="<dir of --model-path>/logs/predictions.jsonl",
    ),
]
LogTextsOpt = Annotated[
    bool | None,
    typer.Option(
        "--log-texts/--no-log-texts",
        help="Write the texts into the prediction log (no: only their lengths).",
        show_default="--log-texts",
    ),
]
GracefulTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--graceful-timeout",
        help="On SIGTERM, the longest wait for requests in flight (s).",
        show_default=common.default_text(ServeConfig, "graceful_timeout"),
    ),
]
AccessLogOpt = Annotated[
    bool | None,
    typer.Option(
        "--access-log/--no-access-log",
        help="One JSON line per request (stderr).",
        show_default="--no-access-log",
    ),
]


def serve_cmd(
    ctx: typer.Context,
    model_path: ModelPathOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    max_length: MaxLengthOpt = None,
    device: common.DeviceOpt = None,
    threads: ThreadsOpt = None,
    batch_size: BatchSizeOpt = None,
    batch_wait_ms: BatchWaitMsOpt = None,
    max_pending: MaxPendingOpt = None,
    prediction_log: PredictionLogOpt = None,
    log_texts: LogTextsOpt = None,
    graceful_timeout: GracefulTimeoutOpt = None,
    access_log: AccessLogOpt = None,
) -> None:
    """Serve a model: POST /predict {"text": ...} or {"texts": [...]}; GET /health.

    Concurrent requests are batched into one forward pass. `kill -HUP <pid>` loads the model
    the directory (link) points at now, beside the old one, and swaps without failing a
    request; SIGTERM stops accepting, finishes the requests in flight and exits 0 (during the
    model load: at once). If a thread of the service dies, /health turns 503 and it exits 1
    (for its service manager to restart it). Under systemd
    socket activation (LISTEN_FDS) it serves the socket it is given (--host/--port unused).
    Logs are JSON lines on stderr; every answer also goes to the prediction log (for
    `ftctl harvest`). More settings: [serve] in ftctl.toml (docs/serve.md).

    Example: `ftctl serve --model-path /srv/models/classifier/final --port 8000 --access-log`
    """
    from ftctl import serve as core

    cfg = with_flags(
        common.config(ctx).serve,
        model_path=model_path, host=host, port=port, max_length=max_length, device=device,
        threads=threads, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
        max_pending=max_pending, prediction_log=prediction_log, log_texts=log_texts,
        graceful_timeout=graceful_timeout, access_log=access_log,
    )  # fmt: skip
    if cfg.model_path is None:
        raise ConfigError(
            "no model directory", hint="pass --model-path DIR (or [serve] model_path)"
        )
    core.serve(cfg, log=_log_line)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("serve")(serve_cmd)
