"""The training image through the docker SDK: build it, label it, find it.

Running a command inside it is :mod:`ftctl.image.container`. No typer and no printing here: build
logs go to the reporter.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftctl import __version__
from ftctl.config import DEFAULT_BASE_IMAGE
from ftctl.errors import EnvironmentProblem, ImageError
from ftctl.progress import NULL, Reporter

REPOSITORY = "ftctl"  # images are tagged ftctl:<version>-<git sha> and [image] tag
LOG_TAIL = 40  # lines of build log quoted in an ImageError
BUILD_INPUTS = ("ftctl", "pyproject.toml", "Dockerfile", "docker")  # what the image is made of


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


def engine(timeout: float = 600.0):
    """A client of the Docker engine named by DOCKER_HOST (or the default socket); ``timeout``
    is the read timeout of each request (``[image] read_timeout``)."""
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


def _git(root: Path, *args: str) -> str:
    res = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
    )
    if res.returncode != 0:
        raise OSError(res.stderr)
    return res.stdout.strip()


def git_revision(root: Path) -> tuple[str, bool] | None:
    """(full commit, dirty) of ``root``; dirty when a tracked build input changed. None
    outside git."""
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *BUILD_INPUTS)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha, bool(dirty)


def git_sha(root: Path) -> str:
    """Short commit of ``root`` (``-dirty`` when a build input changed), ``nogit`` outside git."""
    rev = git_revision(root)
    if rev is None:
        return "nogit"
    return rev[0][:12] + ("-dirty" if rev[1] else "")


def default_tags(root: Path, tag: str = f"{REPOSITORY}:latest") -> list[str]:
    """``ftctl:<version>-<git sha>`` and ``tag`` (``[image] tag``: what --docker runs)."""
    versioned = f"{REPOSITORY}:{__version__}-{git_sha(root)}"
    return [versioned] if tag == versioned else [versioned, tag]


def oci_labels(root: Path, base_image: str) -> dict[str, str]:
    """OCI annotations of the image: the source revision, ftctl's version, the base."""
    rev = git_revision(root)
    labels = {
        "org.opencontainers.image.title": "ftctl",
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.base.name": base_image,
    }
    if rev is not None:
        labels["org.opencontainers.image.revision"] = rev[0]
        labels["ftctl.source.dirty"] = "true" if rev[1] else "false"
    return labels


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
    labels = oci_labels(context, base_image)
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
            labels=labels,
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
    """``image`` (--image) if given, else ``configured_tag`` (``[image] tag``, the tag that
    ``ftctl image build`` writes). Never "whatever is newest": a run names its image."""
    import docker

    client = client or engine()
    wanted = image or configured_tag or f"{REPOSITORY}:latest"
    try:
        return client.images.get(wanted)
    except docker.errors.ImageNotFound:
        how = (
            "build it with `ftctl image build` (it tags [image] tag)"
            if image is None
            else "check the name (see `ftctl image ls`) or build it with `ftctl image build`"
        )
        raise ImageError(f"image {wanted} not found in the local Docker engine", hint=how) from None
