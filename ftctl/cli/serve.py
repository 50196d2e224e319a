"""ftctl serve: the reference inference service (predict, health, hot reload on SIGHUP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftctl.cli import common
from ftctl.config import check, override
from ftctl.errors import ConfigError


def serve_cmd(
    ctx: typer.Context,
    model_dir: Annotated[
        Path | None,
        typer.Option("--model-dir", help="Model directory or the deploy link (e.g. .../final)."),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="TCP port.", show_default="8000")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Tokens per text.", show_default="64")
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request to stderr.")
    ] = False,
) -> None:
    """Serve a model: POST /predict {"text": ...} -> {"label", "score"}; GET /health.

    `kill -HUP <pid>` loads the model the directory (link) points at now, beside the old one,
    and swaps without failing a request: deploy with `reload_cmd` uses it.

    Example: `ftctl serve --model-dir /srv/models/classifier/final --port 8000`
    """
    from ftctl import serve as core

    cfg = override(
        common.config(ctx).serve, model_dir=model_dir, host=host, port=port, max_length=max_length
    )
    check(cfg)
    if cfg.model_dir is None:
        raise ConfigError("no model directory", hint="pass --model-dir DIR (or [serve] model_dir)")

    def log(message: str) -> None:
        if access_log or not message.startswith('"'):
            common.err.print(message, markup=False, highlight=False)

    core.serve(cfg.model_dir, cfg.host, cfg.port, max_length=cfg.max_length, log=log)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("serve")(serve_cmd)
