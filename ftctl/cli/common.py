"""What every command shares: state, option aliases, output, the rich progress reporter."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ftctl.config import Config, DataConfig, TrainConfig
from ftctl.errors import DataError, FtctlError

out = Console(highlight=False, soft_wrap=True)  # results (stdout)
err = Console(stderr=True, highlight=False)  # progress, warnings, errors (stderr)


@dataclass
class State:
    """Per-invocation state set by the root callback (``ctx.obj``)."""

    config: Config = field(default_factory=Config)
    debug: bool = False
    json: bool = False  # a command sets it when --json is given; errors then go out as JSON too
    json_emitted: bool = False  # the command's one JSON document is out (an error adds none)
    quiet: bool = False  # --quiet: no progress or info on stderr (warnings and errors remain)


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def config(ctx: typer.Context) -> Config:
    return state(ctx).config


def default_text(cls: type, name: str) -> str:
    """How ``--help`` shows the default of field ``name`` of config class ``cls``: help texts
    read the defaults the code uses (tests/unit/test_cli_vocabulary.py compares them)."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(value, float):  # 5e-06 -> 5e-6, as people write it
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].lstrip("+") + m[2], f"{value:g}")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else str(value)


# ------------------------------------------------------------------ shared option aliases

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one machine-readable JSON document on stdout.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (deterministic output).")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto | cpu | cuda.", show_default=default_text(TrainConfig, "device")
    ),
]
MaxCharsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-chars",
        help="Longest allowed text.",
        show_default=default_text(DataConfig, "max_chars"),
    ),
]
DockerOpt = Annotated[
    bool,
    typer.Option("--docker", help="Run this same command inside the training image."),
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help=(
            "With --docker: auto | all | none | N | 0,2 (device ids). auto: the GPUs the "
            "command uses (train: one per process), none if the engine has no GPU support."
        ),
        show_default="auto",
    ),
]
ImageOpt = Annotated[
    str | None,
    typer.Option("--image", help="With --docker: the image to run (default: [image] tag)."),
]
ShmSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--shm-size",
        help="With --docker: /dev/shm of the container (NCCL's buffers): auto (1g per process "
        'when --nproc > 1, else docker\'s 64m) or a size such as "8g".',
        show_default="auto",
    ),
]
IpcOpt = Annotated[
    str | None,
    typer.Option(
        "--ipc",
        help="With --docker: private | host (the host's IPC namespace and /dev/shm; "
        "--shm-size is then unused).",
        show_default="private",
    ),
]


# ------------------------------------------------------------------ output


def warn(message: str) -> None:
    """``warning: <message>`` on stderr (shown even with --quiet)."""
    err.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)


def renamed_flag(old: str, new: str) -> None:
    """An old flag name still works; say what it is called now."""
    warn(f"{old} is now {new}; the old name keeps working for now")


def emit_json(ctx: typer.Context, payload: Any) -> None:
    """Print the command's single JSON document to stdout (the human log stays on stderr)."""
    st = state(ctx)
    st.json = st.json_emitted = True
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_error(exc: FtctlError) -> None:
    """``error: <what>`` and ``hint: <what to do>`` on stderr; user text is never markup."""
    err.print(Text.assemble(("error: ", "bold red"), exc.message), soft_wrap=True)
    if exc.hint:
        err.print(Text.assemble(("hint: ", "cyan"), exc.hint), soft_wrap=True)


PLAIN_EVERY_S = 30.0  # without a terminal: a progress line at least this often


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _fields(fields: dict[str, Any]) -> str:
    return "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
    )


class RichReporter:
    """Progress bars and messages on stderr (the core's :class:`~ftctl.progress.Reporter`).

    Without a terminal (a log file, ``docker logs``, CI), a bar would print nothing until its
    task ends: a task prints a plain line instead whenever ``plain_every`` seconds have passed
    since its last one, and one when it ends."""

    def __init__(
        self,
        console: Console = err,
        quiet: bool = False,
        *,
        plain_every: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.quiet = quiet
        self.plain_every = plain_every
        self.clock = clock
        self.warnings: list[str] = []

    def stage(self, name: str) -> None:
        if not self.quiet:
            self.console.rule(f"[bold]{escape(name)}", align="left")  # names hold [x] too

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(escape(message), soft_wrap=True)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.console.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, unit: str = "it") -> Iterator:
        if self.quiet:
            yield lambda n=1, **fields: None
            return
        if not self.console.is_terminal:
            with self._plain_task(description, total, unit) as advance:
                yield advance
            return
        columns = [
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            tid = progress.add_task(description, total=total, status="")

            def advance(n: int = 1, **fields: Any) -> None:
                status = _fields(fields)
                progress.update(tid, advance=n, **({"status": status} if fields else {}))

            yield advance

    @contextlib.contextmanager
    def _plain_task(self, description: str, total: int | None, unit: str) -> Iterator:
        start = self.clock()
        state: dict[str, Any] = {"done": 0, "fields": {}, "last": start}

        def line(end: str) -> None:
            of = f"/{total}" if total is not None else ""
            status = _fields(state["fields"])
            self.console.print(
                escape(f"{description}: {state['done']}{of} {unit}{end}")
                + (f"  {escape(status)}" if status else ""),
                soft_wrap=True,
                highlight=False,
            )

        def advance(n: int = 1, **fields: Any) -> None:
            state["done"] += n
            state["fields"].update(fields)
            now = self.clock()
            if now - state["last"] >= self.plain_every:
                state["last"] = now
                elapsed = now - start
                eta = ""
                if total and state["done"]:
                    eta = f", eta {_duration(elapsed * (total - state['done']) / state['done'])}"
                line(f", {_duration(elapsed)}{eta}")

        try:
            yield advance
        except BaseException:
            line(f", stopped after {_duration(self.clock() - start)}")
            raise
        line(f" in {_duration(self.clock() - start)}")


def reporter(ctx: typer.Context) -> RichReporter:
    st = state(ctx)
    return RichReporter(err, quiet=st.quiet)


def silence_libraries(debug: bool = False) -> None:
    """transformers' own bars and advisories (and paramiko's tracebacks of a failed SSH
    handshake, which ftctl reports as an error with a hint) would drown ours."""
    import logging

    from ftctl import quiet

    if not debug:
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
    quiet.silence_libraries()


# --------------------------------------------------------------------------- --labels


def read_label_list(path: Path | None, label_map: Path | None = None) -> list[str] | None:
    """--labels: a model directory (config.json id2label; generic LABEL_i names need
    --label-map, as for train) or a text file, one label per line; --label-map alone: its
    names. None when neither is given."""
    from ftctl.model.labels import read_label_map, resolve_labels

    if path is None:
        return read_label_map(label_map) if label_map is not None else None
    if path.is_dir():
        return resolve_labels(path, label_map)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(
            f"--labels {path}: not found",
            hint="pass a model directory or a text file with one label per line",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--labels {path}: cannot read: {exc}") from None
    labels = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not labels:
        raise DataError(f"--labels {path}: no labels in the file", hint="one label per line")
    return labels


def model_tokenizer(path: Path | None):
    """The tokenizer of a --labels model directory (then "the same text" is the same token
    ids), else None."""
    if path is None or not path.is_dir():
        return None
    from ftctl.model.files import load_tokenizer

    return load_tokenizer(path)
