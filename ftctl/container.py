"""One ftctl command inside the training image, followed to its end however long it runs.

* Output: the container's stdout/stderr are copied to the caller's byte streams as they
  arrive, through a connection that has no read timeout (a run may print nothing for an hour).
  Should the connection drop while the container still runs, it is attached again and the
  bytes already passed on are skipped, so no line is lost or repeated.
* Stopping: an interrupt (Ctrl-C, or the caller's SIGTERM handler raising :class:`Terminated`)
  sends SIGINT to the container first, so the command inside can save its work (train writes a
  checkpoint); SIGTERM, then SIGKILL, follow only after a grace period or a second interrupt.
  The container is removed in every case.
* GPUs: ``none`` hides every GPU (``NVIDIA_VISIBLE_DEVICES=void``, which also overrides a
  base image's ``all``), ``N`` asks for N, ``0,2`` for those device ids, ``auto`` for what the
  command uses (and runs on the CPU if the engine has no GPU support).
* A kill by the kernel's OOM killer (exit 137) is reported as such.

No typer and no printing: messages go to the reporter, output to the streams passed in.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from ftctl.config import gpus_problem
from ftctl.errors import ConfigError, ContainerKilled, EnvironmentProblem, ImageError
from ftctl.image import engine, resolve_image
from ftctl.progress import NULL, Reporter

WORKDIR = "/workspace"  # the container's working directory (data/ and models/ are below it)
KILL_AFTER = 10  # seconds between SIGTERM and SIGKILL once the grace period is over
POLL = 0.2  # seconds between checks of the output thread (keeps the main thread interruptible)
MAX_REATTACH = 20  # reconnections of the output stream before giving up
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


def create_container(client, image_id: str, spec: RunSpec, gpus: GpuPlan):
    """Create (not start) the container for ``spec`` with the GPUs of ``gpus``."""
    volumes = {
        str(m.host): {"bind": m.container, "mode": "ro" if m.read_only else "rw"}
        for m in spec.mounts
    }
    memory = {"mem_limit": spec.memory, "memswap_limit": spec.memory} if spec.memory else {}
    try:
        return client.containers.create(
            image_id,
            command=list(spec.argv),
            environment={**spec.environment, **gpus.env},
            volumes=volumes,
            user=spec.user,
            device_requests=list(gpus.requests) or None,
            network_mode=spec.network_mode,
            working_dir=spec.workdir,
            init=True,  # docker-init is PID 1: it passes SIGINT/SIGTERM on to ftctl
            labels={"ftctl.command": " ".join(spec.argv)[:1000]},
            **memory,
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
    :func:`gpu_plan` (``gpus``, ``gpus_used``), ``FTCTL_IMAGE_ID`` set to the image id, and
    ``network_mode`` ("none": offline and reproducible). Its output is copied to
    ``stdout``/``stderr`` as it arrives. An interrupt stops it gently (see the module doc) and
    is raised again once the container is gone; a kill by the OOM killer raises
    :class:`ContainerKilled`.
    """
    client = client or engine()
    img = resolve_image(image, configured_tag=configured_tag, client=client)
    spec = RunSpec(
        argv=tuple(argv),
        environment={"FTCTL_IMAGE_ID": img.id, "HOME": "/tmp", **(env or {})},
        mounts=tuple(mounts),
        user=user or f"{os.getuid()}:{os.getgid()}",
        network_mode=network_mode,
        workdir=workdir,
        memory=memory,
    )
    plan = gpu_plan(gpus, gpus_used)
    short = img.short_id.removeprefix("sha256:")
    reporter.info(f"running in {image or configured_tag or short} ({short}) as {spec.user}")
    container = create_container(client, img.id, spec, plan)
    try:
        follower = Follower(client, container.id, stdout, stderr)
        try:
            follower.attach()  # before start: no output is lost however fast the command
            container.start()
        except Exception as exc:
            follower.close()
            container = _cpu_fallback(client, container, img.id, spec, plan, exc, reporter)
            follower = Follower(client, container.id, stdout, stderr)
            follower.attach()
            container.start()
        code, interrupt = supervise(client, container, follower, stop_grace, reporter)
        if interrupt is not None:
            raise interrupt
        explain_exit(client, container.id, code, memory)
        return code
    finally:
        with contextlib.suppress(Exception):  # already gone (removed by the engine)
            container.remove(force=True)


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


class Follower:
    """Copies a container's stdout/stderr to byte streams on a thread of its own.

    The attach connection has no read timeout. If it ends while the container still runs, it
    is attached again (with the log from the start) and the bytes already copied are skipped.
    """

    def __init__(self, client, container_id: str, stdout, stderr) -> None:
        self.client = client
        self.container_id = container_id
        self.sinks = (stdout, stderr)
        self.copied = [0, 0]  # bytes of stdout, stderr passed on
        self.reattached = 0
        self.error: BaseException | None = None
        self._socket = None
        self._done = threading.Event()  # not Thread.join: an interrupted join (Ctrl-C) may
        #                                  mark a running thread as finished (CPython 3.11)
        self._thread = threading.Thread(target=self._run, name="ftctl-follow", daemon=True)

    def attach(self) -> None:
        params = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 1}
        self._socket = self.client.api.attach_socket(self.container_id, params=params)
        _no_read_timeout(self._socket)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the output has ended (or ``timeout`` seconds); safe to interrupt."""
        self._done.wait(timeout)

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(Exception):
                self._socket.close()

    def _run(self) -> None:
        try:
            while True:
                self._copy(list(self.copied))
                if not self._running() or self.reattached >= MAX_REATTACH:
                    return
                self.reattached += 1
                time.sleep(min(self.reattached, 5) * 0.2)
                self.attach()
        except BaseException as exc:  # handed to the main thread
            self.error = exc
        finally:
            self.close()
            self._done.set()

    def _copy(self, skip: list[int]) -> None:
        for stream, data in _frames(self._socket):
            i = 0 if stream == 1 else 1
            if skip[i]:
                dropped = min(skip[i], len(data))
                skip[i] -= dropped
                data = data[dropped:]
            sink = self.sinks[i]
            if data and sink is not None:
                sink.write(data)
                sink.flush()
            self.copied[i] += len(data)

    def _running(self) -> bool:
        try:
            state = self.client.api.inspect_container(self.container_id)["State"]
        except Exception:  # gone: nothing more to follow
            return False
        return bool(state.get("Running"))


def _frames(sock) -> Iterator[tuple[int, bytes]]:
    """(stream, bytes) frames of a non-TTY attach connection until it ends."""
    from docker.utils.socket import frames_iter

    return frames_iter(sock, tty=False)


def _no_read_timeout(sock) -> None:
    """No read timeout on the attach connection (its Python socket may sit one level down)."""
    for s in (sock, getattr(sock, "_sock", None)):
        if s is not None and hasattr(s, "settimeout"):
            s.settimeout(None)


# --------------------------------------------------------------------------- supervising


def supervise(
    client, container, follower: Follower, stop_grace: float, reporter: Reporter
) -> tuple[int, BaseException | None]:
    """Follow the container to its end: (exit code, the interrupt that stopped it, if any).

    The main thread only waits, so Ctrl-C and SIGTERM land here at once; the output keeps
    flowing while the container stops (its last words, e.g. "checkpoint kept", are shown).
    """
    follower.start()
    interrupt: BaseException | None = None
    try:
        while follower.alive():
            follower.join(POLL)
    except (KeyboardInterrupt, Terminated) as exc:
        interrupt = exc
        stop_gently(container, follower, stop_grace, reporter)
        follower.join(5)
        follower.close()  # stopped, or the engine does not answer: stop following either way
    follower.join()
    if follower.error is not None and interrupt is None:
        raise ImageError(f"lost the container's output: {follower.error}") from follower.error
    code = int(client.api.wait(container.id).get("StatusCode", 1))
    return code, interrupt


def stop_gently(container, follower: Follower, grace: float, reporter: Reporter) -> None:
    """SIGINT, wait up to ``grace`` seconds (or a second interrupt), then SIGTERM + SIGKILL."""
    reporter.warn(
        f"interrupted: sent SIGINT to the container; it has {grace:.0f} s to finish "
        "(train saves its checkpoint); interrupt again to stop it now"
    )
    _signal(container, "SIGINT")
    deadline = time.monotonic() + grace
    try:
        while follower.alive() and time.monotonic() < deadline:
            follower.join(POLL)
    except (KeyboardInterrupt, Terminated):
        pass
    if follower.alive():
        reporter.warn(f"stopping the container: SIGTERM, SIGKILL after {KILL_AFTER} s")
        with contextlib.suppress(Exception):  # it may have exited in between
            container.stop(timeout=KILL_AFTER)
        follower.join(KILL_AFTER + 30)


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
