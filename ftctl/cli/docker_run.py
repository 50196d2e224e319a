"""``--docker``: run the command being invoked again, inside the training image.

A command's ``if docker:`` branch calls::

    from ftctl.cli.docker_run import rerun_in_docker
    raise typer.Exit(rerun_in_docker(ctx, gpus=gpus, image=image))

The command line is rebuilt from the click context (subcommand names + the parameters the user
gave, minus --docker/--gpus/--image), host paths are rewritten to container paths, and
:func:`ftctl.image.container.run_in_image` runs it. Mounts:

* ``<project>/data`` -> ``/workspace/data`` and ``<project>/models`` -> ``/workspace/models``
  (read-write; the project is the current directory);
* any other path argument -> ``/mnt/host/<n>-<name>``: read-only for inputs, read-write for
  outputs (parameters named like ``out``/``output``/``report`` or declared writable), created
  first so that the caller owns them;
* the config file in use (``--config``, ``$FTCTL_CONFIG`` or ./ftctl.toml) -> read-only, passed
  as ``--config``. Relative paths inside it are relative to the file; a config in the project
  directory is mounted at ``/workspace/<name>``, so its data/ and models/ paths mean the same
  inside as outside.

``FTCTL_DOCKER_USER=uid:gid`` runs the container as someone else (default: the caller).

What the command prints comes back in the user's paths: the mount table goes in as
``$FTCTL_HOST_PATHS`` (the manifest records host paths) and the output is rewritten on the way
out (:mod:`ftctl.hostpaths`). SIGTERM to ftctl stops the container as Ctrl-C does, removes it,
and exits 143.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePath
from typing import IO, Any

import click
import typer
from click.core import ParameterSource

from ftctl.cli import common
from ftctl.config import ImageConfig, with_flags
from ftctl.errors import ConfigError, Stopped
from ftctl.hostpaths import ENV_VAR, HostPathJsonWriter, HostPathWriter, PathTable
from ftctl.image.build import engine
from ftctl.image.container import WORKDIR, Mount, Terminated, gpu_plan, run_in_image

DOCKER_PARAMS = frozenset({"docker", "gpus", "image", "shm_size", "ipc"})  # never passed in
PROJECT_DIRS = ("data", "models")  # mounted at /workspace/<name>
HOST_MOUNT_ROOT = "/mnt/host"
_OUTPUT_NAME = re.compile(r"(^|_)(out|output|outputs|report|reports|dest|save)(_|$)")
_SKIP_SOURCES = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


@dataclass
class PathMapper:
    """Maps host paths to container paths and collects the mounts that make them visible."""

    project: Path
    extra: dict[str, Mount] = field(default_factory=dict)  # host path -> mount

    def map(self, value: str | os.PathLike, *, output: bool) -> str:
        host = Path(os.path.abspath(self.project / Path(value)))
        for name in PROJECT_DIRS:
            base = self.project / name
            if host == base or base in host.parents:
                if output:
                    base.mkdir(parents=True, exist_ok=True)
                return f"{WORKDIR}/{host.relative_to(self.project).as_posix()}"
        if output:
            return self._output(host)
        if not host.exists():
            raise ConfigError(
                f"{value}: not found (needed inside the container)",
                hint="check the path; inputs must exist before --docker can mount them",
            )
        return self._mount(host, read_only=True)

    def _output(self, host: Path) -> str:
        if host.suffix and not host.is_dir():  # an output file: mount its directory
            host.parent.mkdir(parents=True, exist_ok=True)
            return f"{self._mount(host.parent, read_only=False)}/{host.name}"
        host.mkdir(parents=True, exist_ok=True)
        return self._mount(host, read_only=False)

    def config(self, host: Path) -> str:
        """Where the config file ``host`` is seen inside. One in the project directory sits in
        /workspace beside data/ and models/: the paths in it are relative to the file."""
        if host.parent == Path(os.path.abspath(self.project)):
            target = f"{WORKDIR}/{host.name}"
            self.extra[str(host)] = Mount(host, target, read_only=True)
            return target
        return self._mount(host, read_only=True)

    def _mount(self, host: Path, *, read_only: bool) -> str:
        key = str(host)
        old = self.extra.get(key)
        if old is None:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host.name) or "root"
            target = f"{HOST_MOUNT_ROOT}/{len(self.extra)}-{safe}"
            self.extra[key] = Mount(host, target, read_only)
        elif old.read_only and not read_only:
            self.extra[key] = Mount(host, old.container, False)
        return self.extra[key].container

    def mounts(self) -> list[Mount]:
        fixed = [
            Mount(self.project / name, f"{WORKDIR}/{name}", read_only=False)
            for name in PROJECT_DIRS
            if (self.project / name).is_dir()
        ]
        return fixed + list(self.extra.values())


def is_output(param: click.Parameter) -> bool:
    """Does this parameter name something the command writes?"""
    return bool(_OUTPUT_NAME.search(param.name or "")) or bool(
        getattr(param.type, "writable", False)
    )


def _is_path(param: click.Parameter, value: Any) -> bool:
    return isinstance(param.type, click.Path) or isinstance(value, PurePath)


def _text(param: click.Parameter, value: Any, mapper: PathMapper) -> str:
    if isinstance(value, Enum):
        value = value.value
    if _is_path(param, value):
        return mapper.map(value, output=is_output(param))
    return str(value)


def _given(ctx: click.Context, param: click.Parameter) -> bool:
    """Did the user (or the environment) give this parameter, with a value worth passing on?"""
    value = ctx.params.get(param.name)
    if value is None or param.name in DOCKER_PARAMS:
        return False
    source = ctx.get_parameter_source(param.name) if param.name else None
    if source is None:
        return value != param.default
    return source not in _SKIP_SOURCES


def option_args(param: click.Option, value: Any, mapper: PathMapper) -> list[str]:
    """The command-line words that give ``param`` the value ``value``."""
    flag = max(param.opts, key=len)  # prefer the long form
    if param.is_flag and not param.count:
        if param.is_bool_flag:
            if value:
                return [flag]
            return [max(param.secondary_opts, key=len)] if param.secondary_opts else []
        return [flag] if value == param.flag_value else []
    if param.count:
        return [flag] * int(value)
    values = list(value) if param.multiple else [value]
    out: list[str] = []
    for v in values:
        parts = list(v) if param.nargs != 1 else [v]
        out += [flag, *(_text(param, p, mapper) for p in parts)]
    return out


def param_args(ctx: click.Context, mapper: PathMapper) -> list[str]:
    """Options first, then positional arguments (after ``--`` if one looks like an option)."""
    options: list[str] = []
    positionals: list[str] = []
    for param in ctx.command.params:
        if not _given(ctx, param):
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Option):
            options += option_args(param, value, mapper)
        elif isinstance(param, click.Argument):
            values = list(value) if param.nargs != 1 else [value]
            positionals += [_text(param, v, mapper) for v in values]
    if any(p.startswith("-") for p in positionals):
        positionals.insert(0, "--")
    return options + positionals


def command_names(ctx: click.Context) -> list[str]:
    """Subcommand names from the root down to ``ctx`` (``["data", "generate"]``)."""
    names = []
    node: click.Context | None = ctx
    while node is not None and node.parent is not None:
        names.append(node.info_name or node.command.name or "")
        node = node.parent
    return list(reversed(names))


def root_args(ctx: click.Context, mapper: PathMapper) -> list[str]:
    """The global options that must reach the inner ftctl: --config, --debug, --quiet."""
    st = common.state(ctx)
    args: list[str] = []
    if st.config.path is not None:
        host = Path(os.path.abspath(st.config.path))
        args += ["--config", mapper.config(host)]
    if st.debug:
        args.append("--debug")
    if st.quiet:
        args.append("--quiet")
    return args


def plan(ctx: click.Context, project: Path | None = None) -> tuple[list[str], list[Mount]]:
    """The container's argv (after the ``ftctl`` entrypoint) and the mounts it needs."""
    mapper = PathMapper(Path(os.path.abspath(project or Path.cwd())))
    argv = [*root_args(ctx, mapper), *command_names(ctx), *param_args(ctx, mapper)]
    return argv, mapper.mounts()


def host_paths(mounts: list[Mount]) -> PathTable:
    """Container path -> host path of every mount (what the output is mapped back with)."""
    return PathTable.of((m.container, os.fspath(m.host)) for m in mounts)


def _environment(table: PathTable) -> dict[str, str]:
    env = {ENV_VAR: table.to_env()}
    if sys.stderr.isatty():  # the inner ftctl formats for the caller's terminal
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    return env


@contextlib.contextmanager
def sigterm_stops_the_run() -> Iterator[None]:
    """While the container runs, SIGTERM to ftctl raises Terminated (handled like Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_processes(ctx: click.Context) -> tuple[int, int]:
    """(processes per machine, machines) a ``train`` command will run: its --nproc/--nnodes,
    else ftctl.toml's [train] values."""
    cfg = common.config(ctx).train
    nproc, nnodes = ctx.params.get("nproc"), ctx.params.get("nnodes")
    return int(nproc or cfg.nproc), int(nnodes or cfg.nnodes)


def check_train_in_docker(ctx: click.Context) -> int:
    """Refuse what a training container cannot do; the GPUs it uses (one per process)."""
    nproc, nnodes = train_processes(ctx)
    if nnodes > 1:
        raise ConfigError(
            f"--nnodes {nnodes} with --docker: a training container has no network "
            "(--network none: offline and reproducible), and several machines need one for "
            "torchrun's rendezvous and NCCL, plus the hosts' network devices, which --docker "
            "does not set up",
            hint="run `ftctl train --nnodes N --rdzv-endpoint HOST:PORT ...` on every machine "
            "without --docker (for instance in your own container with --network host); "
            "--docker --nproc N uses the GPUs of one machine",
        )
    return nproc


def rerun_in_docker(
    ctx: typer.Context,
    *,
    gpus: str | None,
    image: str | None,
    gpus_used: int = 0,
    stdout: IO[bytes] | None = None,
    shm_size: str | None = None,
    ipc: str | None = None,
) -> int:
    """Run this same command inside the training image; return its exit code.

    ``gpus_used``: how many GPUs the command will use (what ``--gpus auto`` asks for, and how
    large ``--shm-size auto`` makes /dev/shm). Its stdout goes to ``stdout`` (default: ours;
    the pipeline sends it to stderr to keep its JSON clean); the paths in its output are
    mapped back to the host.
    """
    # --shm-size / --ipc get the checks ftctl.toml's values get
    cfg: ImageConfig = with_flags(common.config(ctx).image, gpus=gpus, shm_size=shm_size, ipc=ipc)
    gpus = cfg.gpus
    gpu_plan(gpus, gpus_used)  # validates the value before anything is started
    argv, mounts = plan(ctx)
    table = host_paths(mounts)
    out_writer = HostPathJsonWriter if "--json" in argv else HostPathWriter
    out = out_writer(table, stdout or sys.stdout.buffer)
    err = HostPathWriter(table, sys.stderr.buffer)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with sigterm_stops_the_run():
            return run_in_image(
                argv,
                image=image,
                configured_tag=cfg.tag,
                mounts=mounts,
                env=_environment(table),
                user=os.environ.get("FTCTL_DOCKER_USER") or None,
                gpus=gpus,
                gpus_used=gpus_used,
                network_mode=cfg.network,
                memory=cfg.memory,
                shm_size=cfg.shm_size,
                ipc=cfg.ipc,
                stop_grace=cfg.stop_grace,
                stdout=out,
                stderr=err,
                reporter=common.reporter(ctx),
                client=engine(cfg.read_timeout),
            )
    except Terminated:
        raise Stopped(
            "terminated (SIGTERM): the container was stopped and removed",
            hint="run the same command again (train: with --resume to continue)",
        ) from None
    finally:
        out.close()
        err.close()
