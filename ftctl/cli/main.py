"""ftctl: the root Typer app. Command groups live in one module each and are joined here."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

# `ftctl serve`, from its first line (before the slow imports below): a SIGHUP (reload) that
# comes while it starts must not kill it (the load reads the link anyway), and a SIGTERM stops
# it at once with exit 0 (nothing is served yet); ftctl.serve.server takes over once serve runs
if next((a for a in sys.argv[1:] if not a.startswith("-")), None) == "serve" or (
    sys.argv[1:2] in (["--config"], ["-c"]) and sys.argv[3:4] == ["serve"]
):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))

import click
import typer
from typer.core import TyperGroup

from ftctl import __version__
from ftctl.cli import common
from ftctl.config import find_config, load_config
from ftctl.errors import ExitCode, FtctlError, Interrupted, UsageProblem


class FtctlGroup(TyperGroup):
    """Turns FtctlError into a message + hint + documented exit code; tracebacks only with
    --debug. Works the same under ``main()`` and ``typer.testing.CliRunner``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["ftctl.args"] = list(args)  # to know about --json before the command runs
        return super().parse_args(ctx, args)

    def _wants_json(self, ctx: click.Context) -> bool:
        """--json was given: set by the command, or (for errors raised before the command
        could set it: ftctl.toml, flag values, usage errors) found on the command line."""
        args = ctx.meta.get("ftctl.args", [])
        args = args[: args.index("--")] if "--" in args else args
        return common.state(ctx).json or "--json" in args

    def _write_json_error(self, ctx: click.Context, exc: FtctlError) -> None:
        """The error as the command's one JSON document, unless it already printed its own
        (``eval --json`` prints its report, then exits 4)."""
        if self._wants_json(ctx) and not common.state(ctx).json_emitted:
            common.emit_json(ctx, {"ok": False, **exc.to_dict()})

    def _fail(self, ctx: click.Context, exc: FtctlError):
        """error + hint on stderr (and the JSON document if --json), then the exit code."""
        if common.state(ctx).debug:
            traceback.print_exc()
        self._write_json_error(ctx, exc)
        common.print_error(exc)
        raise typer.Exit(int(exc.exit_code)) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FtctlError as exc:
            self._fail(ctx, exc)
        except BrokenPipeError:  # `ftctl ... | head`: the reader left; nothing to say
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (python's own advice for EPIPE)
            raise typer.Exit(int(ExitCode.ERROR)) from None
        except OSError as exc:  # a path ftctl cannot write or read (a file where a directory
            # belongs, permissions, a full disk): an error with a hint, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            self._fail(
                ctx,
                FtctlError(
                    f"{where}{exc.strerror or exc}",
                    hint="check that path (a file where a directory belongs? permissions? "
                    "free space?); --debug shows where it happened",
                ),
            )
        except click.UsageError as exc:  # click prints the usage and exits 2
            usage = UsageProblem(exc.format_message(), hint="see the command's --help")
            self._write_json_error(ctx, usage)
            raise
        except KeyboardInterrupt:
            self._write_json_error(ctx, Interrupted("interrupted"))
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
    for note in st.config.notes:
        common.warn(f"{st.config.path}: {note}")
    common.silence_libraries(debug)


def _register() -> None:
    from ftctl.cli import data, demo, deploy, eval, harvest, image, pipeline, promote, serve, train

    app.add_typer(data.app, name="data")
    app.add_typer(image.app, name="image")
    train.register(app)  # train, base
    eval.register(app)  # eval
    deploy.register(app)  # deploy, rollback, releases
    serve.register(app)  # serve
    harvest.register(app)  # harvest
    # import-review is under `data`; its code lives beside `ftctl harvest`, which writes the file
    data.app.command("import-review")(harvest.import_review_cmd)
    demo.register(app)  # demo
    pipeline.register(app)  # pipeline
    promote.register(app)  # promote


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except FtctlError as exc:  # raised before the group could catch it (e.g. --config)
        common.print_error(exc)
        sys.exit(int(exc.exit_code))
