"""ftctl: the root Typer app. Command groups live in one module each and are joined here."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from ftctl import __version__
from ftctl.cli import common
from ftctl.config import find_config, load_config
from ftctl.errors import ExitCode, FtctlError


class FtctlGroup(TyperGroup):
    """Turns FtctlError into a message + hint + documented exit code; tracebacks only with
    --debug. Works the same under ``main()`` and ``typer.testing.CliRunner``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FtctlError as exc:
            st = common.state(ctx)
            if st.debug:
                traceback.print_exc()
            if st.json:
                sys.stdout.write(
                    __import__("json").dumps({"ok": False, **exc.to_dict()}, ensure_ascii=False)
                    + "\n"
                )
            common.print_error(exc)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            common.err.print("[yellow]interrupted[/]")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


app = typer.Typer(
    name="ftctl",
    cls=FtctlGroup,
    help=(
        "Fine-tune, gate and ship the intent classifier.\n\n"
        "Typical flow: `ftctl data generate` -> `ftctl train` -> `ftctl eval --baseline LIVE` "
        "-> `ftctl deploy`. `ftctl demo` runs all of it on the shipped demo data."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ftctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="ftctl.toml to read (default ./ftctl.toml if present)."
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Fine-tune, gate and ship the intent classifier."""
    st = common.state(ctx)
    st.debug, st.quiet = debug, quiet
    st.config = load_config(find_config(config))
    common.silence_libraries(debug)


def _register() -> None:
    from ftctl.cli import data, demo, deploy, eval, image, serve, train

    app.add_typer(data.app, name="data")
    app.add_typer(image.app, name="image")
    train.register(app)  # train, base
    eval.register(app)  # eval
    deploy.register(app)  # deploy, rollback, releases
    serve.register(app)  # serve
    demo.register(app)  # demo, pipeline


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except FtctlError as exc:  # raised before the group could catch it (e.g. --config)
        common.print_error(exc)
        sys.exit(int(exc.exit_code))
