"""One ftctl command inside the training image, followed to its end however long it runs.

* Output: the command inside writes its stdout and stderr to two files in a directory of the
  caller's, mounted into the container (``LOG_MOUNT``); ftctl copies what is new in them to
  the caller's byte streams, by offset. A dropped connection to the engine cannot lose or
  repeat a byte (the log never passes through it), and a run may print nothing for an hour.
* Waiting: the container's state is asked for with a bounded wait (``wait`` with a timeout of
  ``POLL`` seconds); an engine that stops answering is retried for ``ENGINE_PATIENCE`` seconds,
  then an error. Nothing blocks without a limit, and Ctrl-C lands at once.
* Stopping: an interrupt (Ctrl-C, or the caller's SIGTERM handler raising :class:`Terminated`)
  sends SIGINT to the container first, so the command inside can save its work (train writes a
  checkpoint); SIGTERM, then SIGKILL, follow only after a grace period or a second interrupt.
  The grace period goes in as ``$FTCTL_STOP_GRACE``: torchrun inside gives its processes the
  same time (:func:`ftctl.train.distributed.launch`). The container is removed in every case.
* GPUs: ``none`` hides every GPU (``NVIDIA_VISIBLE_DEVICES=void``, which also overrides a
  base image's ``all``), ``N`` asks for N, ``0,2`` for those device ids, ``auto`` for what the
  command uses (and runs on the CPU if the engine has no GPU support). Several processes get
  a /dev/shm big enough for NCCL (:func:`shm_plan`), or the host's IPC namespace.
* A kill by the kernel's OOM killer (exit 137) is reported as such.

No typer and no printing: messages go to the reporter, output to the streams passed in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ftctl.config import gpus_problem, size_bytes
from ftctl.errors import ConfigError, ContainerKilled, EnvironmentProblem, ImageError
from ftctl.image.build import engine, resolve_image
from ftctl.progress import NULL, Reporter
from ftctl.train.distributed import GRACE_ENV

WORKDIR = "/workspace"  # the container's working directory (data/ and models/ are below it)
LOG_MOUNT = "/mnt/ftctl-log"  # where the command inside writes stdout and stderr (files)
STREAMS = ("stdout", "stderr")  # the two log files, in the caller's order of sinks
LAUNCHER_MARGIN = 10  # seconds the container gets beyond the grace (torchrun's own kill, exit)
KILL_AFTER = 10  # seconds between SIGTERM and SIGKILL once the grace period is over
POLL = 0.5  # longest wait for the container's state; the log files are read this often
ENGINE_PATIENCE = 120  # seconds an engine that does not answer is retried before giving up
SHM_PER_PROCESS = "1g"  # /dev/shm per process of a multi-process run (NCCL's buffers)
_NO_GPU_MARKERS = ("could not select device driver", "nvidia-container-cli", "unknown runtime")


class Terminated(BaseException):
    """Raised by a caller's SIGTERM handler: stop the run as Ctrl-C does, then exit 143."""


@dataclass(frozen=True)
class Mount:
    """One host path bound into the container."""

    host: os.PathLike | str
    container: str
    read_only: bool = True


# --------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GpuPlan:
    """What the container gets for a ``--gpus`` value."""

    requests: tuple[Any, ...] = ()  # docker DeviceRequests
    env: Mapping[str, str] = field(default_factory=dict)  # NVIDIA_VISIBLE_DEVICES=void for none
    cpu_fallback: bool = False  # auto: run on the CPU if the engine has no GPU support


def gpu_plan(gpus: str, used: int = 0) -> GpuPlan:
    """``auto`` | ``all`` | ``none`` | ``N`` | ``0,2`` (device ids) -> what the container gets.

    ``used`` is how many GPUs the command will use (train: the processes it starts; data
    generate: 0); ``auto`` asks for exactly that many.
    """
    from docker.types import DeviceRequest

    why = gpus_problem(gpus)
    if why:
        raise ConfigError(f"--gpus {gpus}: {why}", hint="e.g. --gpus all, --gpus 2, --gpus 0,2")
    none = GpuPlan(env={"NVIDIA_VISIBLE_DEVICES": "void"})
    if gpus == "auto":
        if used <= 0:
            return none
        plan = gpu_plan(str(used))
        return GpuPlan(plan.requests, plan.env, cpu_fallback=True)
    if gpus in ("none", "0"):
        return none
    if gpus == "all":
        return GpuPlan((DeviceRequest(count=-1, capabilities=[["gpu"]]),))
    if gpus.isdigit():
        return GpuPlan((DeviceRequest(count=int(gpus), capabilities=[["gpu"]]),))
    ids = gpus.removeprefix("device=").split(",")
    return GpuPlan((DeviceRequest(device_ids=ids, capabilities=[["gpu"]]),))


def _is_no_gpu_error(exc: Exception) -> bool:
    return any(m in str(exc).lower() for m in _NO_GPU_MARKERS)


# --------------------------------------------------------------------------- the container


@dataclass(frozen=True)
class RunSpec:
    """Everything the container is created with."""

    argv: tuple[str, ...]
    environment: Mapping[str, str]
    mounts: tuple[Mount, ...] = ()
    user: str | None = None
    network_mode: str = "none"
    workdir: str = WORKDIR
    memory: str | None = None  # docker memory limit ("16g"), swap included
    shm_size: str | None = None  # /dev/shm size ("2g"); None: docker's 64m
    ipc_mode: str | None = None  # "host": the host's IPC namespace; None: the engine's default
    log_dir: str | None = None  # the command writes its stdout/stderr here (files)


def shm_plan(shm_size: str, ipc: str, processes: int) -> tuple[str | None, str | None]:
    """(shm_size, ipc_mode) of a run of ``processes`` training processes: ``ipc`` "host"
    shares the host's IPC namespace (and /dev/shm); else ``shm_size``, where "auto" gives
    SHM_PER_PROCESS per process when there are several (NCCL keeps its buffers in /dev/shm;
    docker's 64 MB is too small for it) and docker's default for one."""
    if ipc == "host":
        return None, "host"
    if shm_size != "auto":
        return shm_size, None
    if processes <= 1:
        return None, None
    return f"{processes * size_bytes(SHM_PER_PROCESS) >> 30}g", None


def logged_command(argv: Iterable[str], log_dir: str) -> list[str]:
    """The entrypoint that runs ``ftctl ARGV`` with its stdout and stderr appended to files in
    ``log_dir`` (``exec``: ftctl is the process docker-init signals)."""
    script = f'exec "$0" "$@" >>{log_dir}/stdout 2>>{log_dir}/stderr'
    return ["/bin/sh", "-c", script, "ftctl", *argv]


def create_container(client, image_id: str, spec: RunSpec, gpus: GpuPlan):
    """Create (not start) the container for ``spec`` with the GPUs of ``gpus``."""
    volumes = {
        str(m.host): {"bind": m.container, "mode": "ro" if m.read_only else "rw"}
        for m in spec.mounts
    }
    extra: dict[str, Any] = {}
    if spec.memory:
        extra.update(mem_limit=spec.memory, memswap_limit=spec.memory)
    if spec.shm_size:
        extra["shm_size"] = spec.shm_size
    if spec.ipc_mode:
        extra["ipc_mode"] = spec.ipc_mode
    if spec.log_dir:
        extra["entrypoint"] = logged_command(spec.argv, spec.log_dir)
    try:
        return client.containers.create(
            image_id,
            command=None if spec.log_dir else list(spec.argv),
            environment={**spec.environment, **gpus.env},
            volumes=volumes,
            user=spec.user,
            device_requests=list(gpus.requests) or None,
            network_mode=spec.network_mode,
            working_dir=spec.workdir,
            init=True,  # docker-init is PID 1: it passes SIGINT/SIGTERM on to ftctl
            labels={"ftctl.command": " ".join(spec.argv)[:1000]},
            **extra,
        )
    except Exception as exc:
        raise ImageError(f"cannot create the container: {exc}") from exc


def run_in_image(
    argv: list[str],
    *,
    image: str | None = None,
    configured_tag: str | None = None,
    mounts: Iterable[Mount] = (),
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    gpus: str = "none",
    gpus_used: int = 0,
    network_mode: str = "none",
    memory: str | None = None,
    shm_size: str = "auto",
    ipc: str = "private",
    workdir: str = WORKDIR,
    stop_grace: float = 60.0,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
    reporter: Reporter = NULL,
    client=None,
) -> int:
    """Run ``ftctl <argv>`` in the image; return its exit code.

    The image is ``image``, else ``configured_tag``. The container runs as ``user`` (default:
    the caller's uid:gid, so outputs belong to the caller), with ``mounts``, the GPUs of
    :func:`gpu_plan` (``gpus``, ``gpus_used``), /dev/shm of :func:`shm_plan`, ``FTCTL_IMAGE_ID``
    set to the image id, and ``network_mode`` ("none": offline and reproducible). Its output
    is copied to ``stdout``/``stderr`` as it arrives. An interrupt stops it gently (see the
    module doc) and is raised again once the container is gone; a kill by the OOM killer
    raises :class:`ContainerKilled`.
    """
    client = client or engine()
    img = resolve_image(image, configured_tag=configured_tag, client=client)
    user = user or f"{os.getuid()}:{os.getgid()}"
    shm, ipc_mode = shm_plan(shm_size, ipc, gpus_used)
    logs = _log_folder(user)
    spec = RunSpec(
        argv=tuple(argv),
        environment={
            "FTCTL_IMAGE_ID": img.id, "HOME": "/tmp", GRACE_ENV: f"{stop_grace:g}", **(env or {})
        },
        mounts=(*mounts, Mount(logs, LOG_MOUNT, read_only=False)),
        user=user,
        network_mode=network_mode,
        workdir=workdir,
        memory=memory,
        shm_size=shm,
        ipc_mode=ipc_mode,
        log_dir=LOG_MOUNT,
    )  # fmt: skip
    plan = gpu_plan(gpus, gpus_used)
    short = img.short_id.removeprefix("sha256:")
    reporter.info(f"running in {image or configured_tag or short} ({short}) as {spec.user}")
    container = None
    try:
        container = create_container(client, img.id, spec, plan)
        try:
            container.start()
        except Exception as exc:
            container = _cpu_fallback(client, container, img.id, spec, plan, exc, reporter)
            container.start()
        follower = LogFollower(logs, stdout, stderr)
        code, interrupt = supervise(client, container, follower, stop_grace, reporter)
        if interrupt is not None:
            raise interrupt
        explain_exit(client, container.id, code, memory)
        return code
    finally:
        if container is not None:
            with contextlib.suppress(Exception):  # already gone (removed by the engine)
                container.remove(force=True)
        shutil.rmtree(logs, ignore_errors=True)


def _log_folder(user: str) -> Path:
    """A fresh host directory for the log files, writable by the container's ``user``."""
    folder = Path(tempfile.mkdtemp(prefix="ftctl-run-"))
    uid, _, gid = user.partition(":")
    if uid.isdigit() and int(uid) != os.getuid():
        if os.getuid() == 0:  # root gives it to that user
            os.chown(folder, int(uid), int(gid) if gid.isdigit() else -1)
        else:  # the caller cannot: anyone may write (the name is random)
            folder.chmod(0o777)
    return folder


def _cpu_fallback(client, container, image_id, spec: RunSpec, plan: GpuPlan, exc, reporter):
    """The start failed: with ``auto`` and no GPU support, a new container on the CPU."""
    container.remove(force=True)
    if not (plan.requests and _is_no_gpu_error(exc)):
        raise ImageError(f"cannot start the container: {exc}") from exc
    if not plan.cpu_fallback:
        raise EnvironmentProblem(
            f"GPUs were asked for but the Docker engine has no GPU support ({exc})",
            hint=(
                "install the NVIDIA driver + NVIDIA Container Toolkit and restart the "
                "engine, or run on CPU with --gpus none"
            ),
        ) from exc
    reporter.info("no GPU support in the Docker engine: running on the CPU")
    return create_container(client, image_id, spec, gpu_plan("none"))


# --------------------------------------------------------------------------- following


class LogFollower:
    """Copies what is new in ``folder``/stdout and ``folder``/stderr (written by the command
    inside) to two byte streams. Each file is read from where the last read ended, so
    nothing is read twice, and the log never depends on a connection to the engine."""

    def __init__(self, folder: Path, stdout: IO[bytes] | None, stderr: IO[bytes] | None):
        self.files = [folder / name for name in STREAMS]
        self.sinks = (stdout, stderr)
        self.offsets = [0, 0]

    def pump(self) -> int:
        """Copy what was written since the last call; returns the bytes copied."""
        copied = 0
        for i, path in enumerate(self.files):
            try:
                with path.open("rb") as fh:
                    fh.seek(self.offsets[i])
                    data = fh.read()
            except FileNotFoundError:  # not written yet
                continue
            self.offsets[i] += len(data)
            copied += len(data)
            sink = self.sinks[i]
            if data and sink is not None:
                sink.write(data)
                sink.flush()
        return copied


# --------------------------------------------------------------------------- supervising


class _State:
    """The container's exit code, asked for with a bounded wait; an engine that does not
    answer is retried for ENGINE_PATIENCE seconds before :class:`ImageError`."""

    def __init__(self, client, container_id: str) -> None:
        self.client, self.container_id = client, container_id
        self.failing_since: float | None = None
        self.reconnects = 0

    def exit_code(self, wait: float = POLL) -> int | None:
        """The exit code once the container has stopped; None while it runs (after waiting
        up to ``wait`` seconds)."""
        import requests

        try:
            result = self.client.api.wait(self.container_id, timeout=wait)
        except requests.exceptions.ReadTimeout:
            self.failing_since = None
            return None  # still running
        except Exception as exc:  # the connection dropped, the engine restarts...
            return self._unanswered(exc, wait)
        self.failing_since = None
        return int(result.get("StatusCode", 1))

    def _unanswered(self, exc: Exception, wait: float) -> None:
        import docker

        if isinstance(exc, docker.errors.NotFound):
            raise ImageError(f"the container {self.container_id[:12]} is gone") from exc
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
            self.reconnects += 1
        elif now - self.failing_since > ENGINE_PATIENCE:
            raise ImageError(
                f"the Docker engine has not answered for {ENGINE_PATIENCE} s ({exc})",
                hint="check the engine (`docker ps`); the container may still run",
            ) from exc
        time.sleep(wait)
        return None


def supervise(
    client, container, follower: LogFollower, stop_grace: float, reporter: Reporter
) -> tuple[int, BaseException | None]:
    """Follow the container to its end: (exit code, the interrupt that stopped it, if any).

    The main thread only reads files and waits a bounded time, so Ctrl-C and SIGTERM land at
    once; the output keeps flowing while the container stops (its last words, e.g.
    "checkpoint kept", are shown)."""
    state = _State(client, container.id)
    interrupt: BaseException | None = None
    code: int | None = None
    try:
        while code is None:
            follower.pump()
            code = state.exit_code()
    except (KeyboardInterrupt, Terminated) as exc:
        interrupt = exc
        code = stop_gently(container, follower, state, stop_grace, reporter)
    follower.pump()  # what was written before the end
    return code, interrupt


def stop_gently(container, follower: LogFollower, state: _State, grace: float, reporter) -> int:
    """SIGINT, wait up to ``grace`` seconds (+ the launcher's margin) or a second interrupt,
    then SIGTERM + SIGKILL; the exit code."""
    reporter.warn(
        f"interrupted: sent SIGINT to the container; it has {grace:.0f} s to finish "
        "(train saves its checkpoint); interrupt again to stop it now"
    )
    _signal(container, "SIGINT")
    deadline = time.monotonic() + grace + LAUNCHER_MARGIN
    code: int | None = None
    try:
        while code is None and time.monotonic() < deadline:
            follower.pump()
            code = state.exit_code()
    except (KeyboardInterrupt, Terminated):
        pass
    if code is None:
        reporter.warn(f"stopping the container: SIGTERM, SIGKILL after {KILL_AFTER} s")
        with contextlib.suppress(Exception):  # it may have exited in between
            container.stop(timeout=KILL_AFTER)
        deadline = time.monotonic() + KILL_AFTER + 30
        while code is None and time.monotonic() < deadline:
            follower.pump()
            code = state.exit_code()
    return 137 if code is None else code


def _signal(container, name: str) -> None:
    with contextlib.suppress(Exception):  # not running (any more): nothing to stop
        container.kill(signal=name)


def explain_exit(client, container_id: str, code: int, memory: str | None) -> None:
    """Exit 137: say who killed the command (the OOM killer or someone's SIGKILL)."""
    if code != 137:
        return
    state = client.api.inspect_container(container_id)["State"]
    limit = f"the container's limit of {memory}" if memory else "the memory available"
    if state.get("OOMKilled"):
        raise ContainerKilled(
            f"the command in the image ran out of memory: the kernel's OOM killer stopped it "
            f"(exit 137) when it went past {limit}",
            hint=(
                "use a smaller --batch-size or --max-length, free memory, or raise "
                "[image] memory in ftctl.toml"
            ),
        )
    raise ContainerKilled(
        "the command in the image was killed with SIGKILL (exit 137), not by ftctl",
        hint=(
            "someone ran `docker kill`/`docker stop` on it, or the host ran out of memory "
            "(see `dmesg` for the OOM killer); run it again, with --resume to continue training"
        ),
    )
