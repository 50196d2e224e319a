"""A real Docker engine and the training image for the image tests.

There is no Docker Hub here, so the CUDA base is replaced by local ones, all from one root:

* ``docker_engine``: a client of a running engine; starts ``dockerd`` through ``.ci/dockerd``
  (no bridge, no iptables; overlay2 if the kernel allows, else vfs) when none answers, and
  stops it at session end only if it started it.
* ``root_base_image``: ``debootstrap --variant=minbase bookworm`` + a python3.11 venv at /opt/py
  on PATH + the host CA bundle (PIP_CERT, so pip works inside). No torch: the base that
  ``image build`` must refuse. Built once per machine (kept by tag).
* ``test_base_image``: the root + the local torch 2.13.0 CPU wheel (today's torch). Kept by tag.
* ``ftctl_image``: the project's own Dockerfile built on it (tagged ``ftctl-docker-test:*``,
  never the user's ``ftctl:latest``), once per session; the layers stay cached.
* ``torch291_image``: the root + torch 2.9.1 from PyPI, the torch of the pinned CUDA base (the
  CUDA build with its nvidia-* libraries, ~6.7 GB, which runs on the CPU), and the project
  image on it. Built once per session, only if a test asks for it, and removed at its end
  (``FTCTL_KEEP_TEST_IMAGES=1`` keeps it for the next run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import docker

TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
ROOT_BASE_TAG = "ftctl-docker-test-base:bookworm-py311"  # no torch
TEST_BASE_TAG = "ftctl-docker-test-base:torch2.13.0"
# the project image built from this tree; $FTCTL_TEST_IMAGE_TAG names it apart where several
# trees share one engine (each session uses the id it built, whatever the tag points to later)
TEST_IMAGE_TAG = os.environ.get("FTCTL_TEST_IMAGE_TAG") or "ftctl-docker-test:torch2.13.0"
BASE_291_TAG = "ftctl-docker-test-base:torch2.9.1"
IMAGE_291_TAG = "ftctl-docker-test:torch2.9.1"
BUILD_291_NAME = f"ftctl-docker-test-torch291-{os.getpid()}"  # the container that installs it
KEEP_ENV = "FTCTL_KEEP_TEST_IMAGES"  # set to 1: keep the torch 2.9.1 images between runs
UID = 1234  # a non-root caller of --docker: what the container writes must belong to it
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_CA = "/etc/ssl/certs/host-ca-bundle.crt"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
REPO = Path(__file__).resolve().parents[2]
DOCKERD = REPO / ".ci" / "dockerd"  # starts an engine when none answers (also for .ci/setup)


def _engine_answers() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception:  # any failure means "no engine here"
        return None


def start_dockerd(log: Path) -> int | None:
    """Start an engine through .ci/dockerd (what .ci/setup runs: overlay2 where the kernel
    allows it, else vfs; host network only) when none answers; the pid of the dockerd it
    started, or None when one already answered."""
    res = subprocess.run(["bash", str(DOCKERD), str(log)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{DOCKERD} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return int(res.stdout) if res.stdout.strip() else None


def _running(pid: int) -> bool:
    """The process lives (a zombie no one reaps counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_dockerd(pid: int, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """A client of a running Docker engine (started here if none answers, and then stopped at
    the end of the session)."""
    pid = start_dockerd(tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    client = docker.from_env(timeout=600)  # committing a 7 GB layer takes a minute
    yield client
    client.close()
    if pid is not None:
        stop_dockerd(pid)


def chown_tree(root: Path, uid: int = UID) -> None:
    for p in [root, *root.rglob("*")]:
        os.chown(p, uid, uid)


def small_data(path: Path, per_label: int = 8, source: str = "incremental_training_data") -> Path:
    """The first ``per_label`` rows of each label of a shipped data file."""
    from tests.helpers import write_jsonl

    rows: dict[str, list[str]] = {}
    for line in (REPO / "data" / f"{source}.jsonl").read_text().splitlines():
        ex = json.loads(line)
        rows.setdefault(ex["label"], [])
        if len(rows[ex["label"]]) < per_label:
            rows[ex["label"]].append(ex["text"])
    return write_jsonl(path, [(t, lab) for lab, texts in rows.items() for t in texts])


def readable_copy(src: Path, dst: Path) -> Path:
    """A copy of the model directory ``src`` that any uid may read (mounted read-only)."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:  # a bind mount needs no access to the host's parents
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def debian_mirror() -> str:
    """The first ``URIs:`` of the host's Debian sources (the mirror that answers here)."""
    for line in DEBIAN_SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    return "http://deb.debian.org/debian"


def _run(cmd: list[str] | str, **kw) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(
            f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )


def build_root_base(tag: str = ROOT_BASE_TAG) -> None:
    """debootstrap bookworm + python 3.11 venv on PATH + host CA -> ``docker import``."""
    work = Path(tempfile.mkdtemp(prefix="ftctl-docker-base-"))
    root = work / "rootfs"
    try:
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(root),
                debian_mirror(),
            ]
        )
        shutil.copy(HOST_CA, root / IMAGE_CA.lstrip("/"))
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        _run(["chroot", str(root), "python3", "-m", "venv", "/opt/py"], env=env)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / junk, ignore_errors=True)
        changes = [
            "--change",
            "ENV PATH=/opt/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            f"ENV PIP_CERT={IMAGE_CA}",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            'CMD ["python3"]',
        ]
        _run(
            f"tar -C {root} -c . | docker import {' '.join(repr(c) for c in changes)} - {tag}",
            shell=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_torch_base(
    client, torch_spec: str, tag: str, root: str = ROOT_BASE_TAG, name: str | None = None
) -> float:
    """``root`` + ``pip install <torch_spec>`` committed as ``tag``; returns the seconds taken.

    The local CPU wheel (a path under /opt/wheels) is mounted read-only; anything else comes
    from PyPI (``torch==2.9.1``: the CUDA build with its nvidia-* packages).
    """
    started = time.monotonic()
    volumes = {}
    if torch_spec.startswith("/"):
        volumes[str(Path(torch_spec).parent)] = {"bind": "/wheels", "mode": "ro"}
        torch_spec = f"/wheels/{Path(torch_spec).name}"
    cmd = ["pip", "install", "--no-cache-dir", "--disable-pip-version-check", torch_spec]
    if not torch_spec.startswith("/"):
        cmd.insert(2, "--no-compile")  # compiled on import: the test image imports it once
    container = client.containers.run(
        root, cmd, network_mode="host", volumes=volumes, detach=True, user="0", name=name
    )
    try:
        code = container.wait()["StatusCode"]
        if code != 0:
            log = container.logs().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}) in {root}:\n{log}")
        container.commit(*tag.split(":", 1), changes=['CMD ["python3"]'])
    finally:
        container.remove(force=True)
    return time.monotonic() - started


def _image_exists(client, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


_ROOT_LOCK = threading.Lock()  # the root base is made once, by a fixture or the prebuild


def ensure_root_base(client) -> str:
    with _ROOT_LOCK:
        if not _image_exists(client, ROOT_BASE_TAG):
            build_root_base(ROOT_BASE_TAG)
    return ROOT_BASE_TAG


@pytest.fixture(scope="session")
def root_base_image(docker_engine) -> str:
    """Python 3.11 + pip, no torch (built once per machine, reused by tag)."""
    return ensure_root_base(docker_engine)


@pytest.fixture(scope="session")
def test_base_image(docker_engine, root_base_image) -> str:
    """The local stand-in for the CUDA base: torch 2.13.0 CPU (once per machine, by tag)."""
    if not _image_exists(docker_engine, TEST_BASE_TAG):
        build_torch_base(docker_engine, str(TORCH_WHEEL), TEST_BASE_TAG, root_base_image)
    return TEST_BASE_TAG


@pytest.fixture(scope="session")
def ftctl_image(docker_engine, test_base_image) -> str:
    """The project's Dockerfile built on the torch 2.13 base (once per session; cached)."""
    from ftctl.image.build import build_image

    result = build_image(REPO, base_image=test_base_image, tags=[TEST_IMAGE_TAG])
    return result.image_id


# --------------------------------------------------------------------------- torch 2.9.1


def build_291_image(client, cancelled: threading.Event | None = None) -> tuple[str, float]:
    """(image id, seconds): root -> torch 2.9.1 base -> the project image on it."""
    from ftctl.image.build import build_image

    def go_on() -> None:
        if cancelled is not None and cancelled.is_set():
            raise RuntimeError("the torch 2.9.1 build was cancelled")

    started = time.monotonic()
    ensure_root_base(client)
    go_on()
    if not _image_exists(client, BASE_291_TAG):
        build_torch_base(client, "torch==2.9.1", BASE_291_TAG, name=BUILD_291_NAME)
    go_on()
    result = build_image(REPO, base_image=BASE_291_TAG, tags=[IMAGE_291_TAG], client=client)
    return result.image_id, time.monotonic() - started


def remove_291_images(client) -> None:
    if os.environ.get(KEEP_ENV):
        return
    for tag in (IMAGE_291_TAG, BASE_291_TAG):
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)


class _Prebuild:
    """The torch 2.9.1 image, built on a thread while the other tests run (most of its cost is
    a 3.5 GB download and writing 7 GB of layers, not CPU)."""

    def __init__(self) -> None:
        self.result: tuple[str, float] | None = None
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ftctl-prebuild-291", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = build_291_image(docker.from_env(timeout=600), self.cancelled)
        except BaseException as exc:  # re-raised in the test that needs the image
            self.error = exc

    def cancel(self, client, timeout: float = 60) -> None:
        """Stop the download (the session ends first); an image build dies with pytest."""
        self.cancelled.set()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(BUILD_291_NAME).remove(force=True)
            self.thread.join(1)

    def wait(self) -> tuple[str, float]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


_PREBUILD: dict[str, _Prebuild] = {}  # this pytest session's prebuild, if one was started


def _needs_291(item) -> bool:
    return "torch291_image" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items) -> None:
    """Tests on the torch 2.9.1 image run last: its prebuild has the whole run to finish."""
    items.sort(key=_needs_291)  # stable: the others keep their order


def pytest_collection_finish(session) -> None:
    """A selected test needs the torch 2.9.1 image and an engine runs: start building it."""
    wanted = any(_needs_291(i) for i in session.items)
    probe = _engine_answers() if wanted and not session.config.option.collectonly else None
    if probe is not None:
        probe.close()
        _PREBUILD["291"] = _Prebuild()


def pytest_sessionfinish(session) -> None:
    """Remove the torch 2.9.1 images, also when the test that wanted them never ran."""
    job = _PREBUILD.pop("291", None)
    if job is None:
        return
    client = docker.from_env(timeout=600)
    if job.thread.is_alive():  # the test never ran (-x, Ctrl-C)
        job.cancel(client)
    remove_291_images(client)


@pytest.fixture(scope="session")
def torch291_image(docker_engine, root_base_image):
    """(image id, base tag, seconds): the project image on a torch 2.9.1 base, built once
    per session (on a thread from the start of the session when an engine runs) and removed
    at its end (unless $FTCTL_KEEP_TEST_IMAGES)."""
    job = _PREBUILD.get("291")
    try:
        image_id, seconds = job.wait() if job else build_291_image(docker_engine)
        yield image_id, BASE_291_TAG, seconds
    finally:
        remove_291_images(docker_engine)


if __name__ == "__main__":  # python -m tests.integration.docker_fixtures: the kept test bases
    client = docker.from_env(timeout=600)
    if not _image_exists(client, ROOT_BASE_TAG):
        build_root_base()
    if not _image_exists(client, TEST_BASE_TAG):
        build_torch_base(client, str(TORCH_WHEEL), TEST_BASE_TAG)
    print(TEST_BASE_TAG)
