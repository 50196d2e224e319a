"""The training image through the docker SDK: build it, find it, run one ftctl command inside it.

No typer and no printing here: build logs go to the reporter, a container's stdout/stderr go to
the byte streams the caller passes in.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ftctl import __version__
from ftctl.config import DEFAULT_BASE_IMAGE
from ftctl.errors import ConfigError, EnvironmentProblem, ImageError
from ftctl.progress import NULL, Reporter

REPOSITORY = "ftctl"  # images are tagged ftctl:<version>-<git sha> and ftctl:latest
WORKDIR = "/workspace"  # the container's working directory (data/ and models/ are below it)
LOG_TAIL = 40  # lines of build log quoted in an ImageError
_NO_GPU_MARKERS = ("could not select device driver", "nvidia-container-cli", "unknown runtime")


@dataclass(frozen=True)
class Mount:
    """One host path bound into the container."""

    host: Path
    container: str
    read_only: bool = True


@dataclass(frozen=True)
class BuildResult:
    image_id: str
    tags: tuple[str, ...]
    base_image: str
    seconds: float
    log_tail: tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "tags": list(self.tags),
            "base_image": self.base_image,
            "seconds": round(self.seconds, 1),
        }


# --------------------------------------------------------------------------- the engine


def engine(timeout: int = 600):
    """A client of the Docker engine named by DOCKER_HOST (or the default socket)."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:  # docker raises DockerException, requests errors, OSError...
        raise EnvironmentProblem(
            f"no Docker engine answers at {where} ({type(exc).__name__})",
            hint=(
                "start one: `sudo systemctl start docker` (or, where there is no systemd, "
                "`dockerd --iptables=false --bridge=none &` as root); check DOCKER_HOST and that "
                "you may use the socket (group `docker`)"
            ),
        ) from exc
    return client


# --------------------------------------------------------------------------- build


def git_sha(root: Path) -> str:
    """Short commit of ``root`` (``-dirty`` when tracked files changed), ``nogit`` outside git."""

    def git(*args: str) -> str:
        res = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
        if res.returncode != 0:
            raise OSError(res.stderr)
        return res.stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", "ftctl", "pyproject.toml"
        )
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return f"{sha}-dirty" if dirty else sha


def default_tags(root: Path) -> list[str]:
    return [f"{REPOSITORY}:{__version__}-{git_sha(root)}", f"{REPOSITORY}:latest"]


def _split_tag(tag: str) -> tuple[str, str]:
    repo, sep, name = tag.rpartition(":")
    if not sep or "/" in name:
        return tag, "latest"
    return repo, name


def build_image(
    context: Path,
    *,
    dockerfile: Path | str = "Dockerfile",
    base_image: str = DEFAULT_BASE_IMAGE,
    tags: Iterable[str] | None = None,
    no_cache: bool = False,
    build_args: Mapping[str, str] | None = None,
    network_mode: str = "host",
    reporter: Reporter = NULL,
    client=None,
) -> BuildResult:
    """Build the Dockerfile in ``context`` with BASE_IMAGE=``base_image``, streaming the log.

    Every line of the build log goes to ``reporter.info`` as it arrives. A failed build raises
    :class:`ImageError` quoting the last lines of the log.
    """
    context = Path(context)
    if not (context / dockerfile).is_file():
        raise ImageError(
            f"no {dockerfile} in {context}",
            hint="run from the project root or pass the right build context",
        )
    tags = list(tags) if tags else default_tags(context)
    client = client or engine()
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
    image_id = None
    reporter.stage(f"building {tags[0]} on {base_image}")
    try:
        stream = client.api.build(
            path=str(context),
            dockerfile=str(dockerfile),
            tag=tags[0],
            buildargs={"BASE_IMAGE": base_image, **(build_args or {})},
            nocache=no_cache,
            rm=True,
            forcerm=True,
            pull=False,
            network_mode=network_mode,
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk or "errorDetail" in chunk:
                message = chunk.get("error") or chunk["errorDetail"].get("message", "")
                tail.append(message.rstrip())
                raise _build_failed(message, tail, base_image)
            text = chunk.get("stream") or chunk.get("status") or ""
            for line in text.splitlines():
                if line.strip():
                    tail.append(line)
                    reporter.info(line)
            aux = chunk.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                image_id = aux["ID"]
    except ImageError:
        raise
    except Exception as exc:  # APIError for a bad request, connection errors mid-build
        tail.append(str(exc))
        raise _build_failed(str(exc), tail, base_image) from exc
    if image_id is None:
        image_id = client.images.get(tags[0]).id
    for tag in tags[1:]:
        repo, name = _split_tag(tag)
        client.api.tag(image_id, repo, name)
    return BuildResult(image_id, tuple(tags), base_image, time.monotonic() - started, tuple(tail))


def _build_failed(message: str, tail: Iterable[str], base_image: str) -> ImageError:
    hint = "fix the step named above (full log: rerun without --json)"
    low = message.lower()
    if any(s in low for s in ("pull access denied", "manifest unknown", "not found", "lookup")):
        hint = (
            f"the base image {base_image} is not available: `docker pull` it (needs a registry), "
            "or pass --base-image with a local image that has Python 3.11 + torch + pip"
        )
    return ImageError(
        f"image build failed: {message.strip()}\n--- last lines of the build log ---\n"
        + "\n".join(tail),
        hint=hint,
    )


def list_images(client=None) -> list[dict[str, Any]]:
    """Local ``ftctl:*`` images, newest first."""
    client = client or engine()
    rows = []
    for img in client.images.list(name=REPOSITORY):
        rows.append(
            {
                "id": img.id,
                "tags": sorted(t for t in img.tags if _split_tag(t)[0] == REPOSITORY),
                "created": img.attrs.get("Created", ""),
                "size": img.attrs.get("Size", 0),
            }
        )
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def resolve_image(image: str | None, *, configured_tag: str | None = None, client=None):
    """``image`` if given, else the configured tag, else the newest local ``ftctl:*``."""
    import docker

    client = client or engine()
    wanted = image or configured_tag
    if wanted:
        try:
            return client.images.get(wanted)
        except docker.errors.ImageNotFound:
            raise ImageError(
                f"image {wanted} not found in the local Docker engine",
                hint="build it with `ftctl image build` (see `ftctl image ls`)",
            ) from None
    rows = list_images(client)
    if not rows:
        raise ImageError(
            "no ftctl image in the local Docker engine",
            hint="build one with `ftctl image build` (or pass --image NAME)",
        )
    return client.images.get(rows[0]["id"])


# --------------------------------------------------------------------------- run


def device_requests(gpus: str) -> list:
    """``all`` | ``none`` | ``N`` -> docker DeviceRequests (``auto`` is handled by the caller)."""
    from docker.types import DeviceRequest

    if gpus == "none" or gpus == "0":
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if gpus.isdigit():
        return [DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
    raise ConfigError(f"--gpus {gpus}: must be all, none, auto or a count", hint="e.g. --gpus all")


def _is_no_gpu_error(exc: Exception) -> bool:
    return any(m in str(exc).lower() for m in _NO_GPU_MARKERS)


def run_in_image(
    argv: list[str],
    *,
    image: str | None = None,
    configured_tag: str | None = None,
    mounts: Iterable[Mount] = (),
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    gpus: str = "none",
    network_mode: str = "none",
    workdir: str = WORKDIR,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
    reporter: Reporter = NULL,
    client=None,
) -> int:
    """Run ``ftctl <argv>`` in the image; return its exit code.

    The container runs as ``user`` (default: the caller's uid:gid, so outputs belong to the
    caller), with ``mounts`` bound in, the GPUs asked for (``auto``: all if the engine has GPU
    support, else none), ``FTCTL_IMAGE_ID`` set to the image id, and ``network_mode`` ("none":
    offline and reproducible). Its stdout/stderr are copied to ``stdout``/``stderr`` as they
    arrive. Ctrl-C stops the container; it is removed in every case.
    """
    client = client or engine()
    img = resolve_image(image, configured_tag=configured_tag, client=client)
    user = user or f"{os.getuid()}:{os.getgid()}"
    environment = {"FTCTL_IMAGE_ID": img.id, "HOME": "/tmp", **(env or {})}
    volumes = {
        str(m.host): {"bind": m.container, "mode": "ro" if m.read_only else "rw"} for m in mounts
    }
    reporter.info(f"running `ftctl {' '.join(argv)}` in {_image_name(img)} as {user}")
    requests = device_requests("all" if gpus == "auto" else gpus)
    container = _create(
        client, img, argv, environment, volumes, user, requests, network_mode, workdir
    )
    try:
        try:
            output = _attach_and_start(client, container)
        except Exception as exc:
            if not (requests and _is_no_gpu_error(exc)):
                raise ImageError(f"cannot start the container: {exc}") from exc
            container.remove(force=True)
            if gpus != "auto":
                raise EnvironmentProblem(
                    f"--gpus {gpus}: the Docker engine has no GPU support ({exc})",
                    hint=(
                        "install the NVIDIA driver + NVIDIA Container Toolkit and restart the "
                        "engine, or run on CPU with --gpus none"
                    ),
                ) from exc
            reporter.info("no GPU support in the Docker engine: running on CPU")
            container = _create(
                client, img, argv, environment, volumes, user, [], network_mode, workdir
            )
            output = _attach_and_start(client, container)
        _copy_output(output, stdout, stderr)
        return int(container.wait().get("StatusCode", 1))
    except KeyboardInterrupt:
        reporter.warn("interrupted: stopping the container")
        container.stop(timeout=10)
        raise
    finally:
        with contextlib.suppress(Exception):  # already gone (removed above or by the engine)
            container.remove(force=True)


def _image_name(img) -> str:
    return img.tags[0] if img.tags else img.short_id


def _create(client, img, argv, environment, volumes, user, requests, network_mode, workdir):
    try:
        return client.containers.create(
            img.id,
            command=list(argv),
            environment=environment,
            volumes=volumes,
            user=user,
            device_requests=requests or None,
            network_mode=network_mode,
            working_dir=workdir,
            init=True,
            labels={"ftctl.command": " ".join(argv)[:1000]},
        )
    except Exception as exc:
        raise ImageError(f"cannot create the container: {exc}") from exc


def _attach_and_start(client, container):
    """Attach first (so no output is lost however fast the command), then start."""
    output = client.api.attach(container.id, stream=True, logs=True, demux=True)
    container.start()
    return output


def _copy_output(output, stdout: IO[bytes] | None, stderr: IO[bytes] | None) -> None:
    """Copy the container's (stdout, stderr) chunks to the given streams until it exits."""
    for out, err in output:
        for data, sink in ((out, stdout), (err, stderr)):
            if data and sink is not None:
                sink.write(data)
                sink.flush()
