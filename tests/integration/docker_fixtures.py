"""A real Docker engine and the training image for the image tests.

* ``docker_engine``: a client of a running engine; starts ``dockerd`` (no bridge, no iptables;
  overlay2 if the kernel allows, else vfs) when none answers, and stops it at session end only
  if it started it.
* ``test_base_image``: there is no Docker Hub here, so the CUDA base is replaced by a local one:
  ``debootstrap --variant=minbase bookworm`` + python3.11 venv at /opt/py + the local torch CPU
  wheel + the host CA bundle (PIP_CERT, so pip works inside). Built once per machine (kept by tag).
* ``ftctl_image``: the project's own Dockerfile built on that base, once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import docker

TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
TEST_BASE_TAG = "ftctl-test-base:bookworm-py311-torch2.13.0"
TEST_IMAGE_TAG = "ftctl:test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_CA = "/etc/ssl/certs/host-ca-bundle.crt"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
REPO = Path(__file__).resolve().parents[2]


def _engine_answers() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception:  # any failure means "no engine here"
        return None


def storage_driver(data_root: Path = Path("/var/lib/docker")) -> str:
    """overlay2 where the kernel and the file system allow it, else vfs.

    vfs copies the whole image for every container, and the classic builder makes a container
    per Dockerfile step: measured here, one `ENV` step took 113 s on vfs and 1 s on overlay2.
    """
    probe = data_root.parent / f".ftctl-overlay-probe-{os.getpid()}"
    dirs = {n: probe / n for n in ("lower", "upper", "work", "merged")}
    try:
        for d in dirs.values():
            d.mkdir(parents=True)
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        res = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
            capture_output=True,
        )
        if res.returncode != 0:
            return "vfs"
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True)
        return "overlay2"
    except OSError:
        return "vfs"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def start_dockerd(log_dir: Path) -> subprocess.Popen:
    """Start a local engine the way ENVIRONMENT.md describes; wait until it answers."""
    log = open(log_dir / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(
        [
            "dockerd",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--storage-driver={storage_driver()}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}; see {log.name}")
        if _engine_answers() is not None:
            return proc
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"dockerd did not answer within 60 s; see {log.name}")


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """A client of a running Docker engine (started here if none answers)."""
    proc = None
    client = _engine_answers()
    if client is None:
        proc = start_dockerd(tmp_path_factory.mktemp("dockerd"))
        client = docker.from_env(timeout=600)
    yield client
    client.close()
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


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


def build_test_base(tag: str = TEST_BASE_TAG) -> None:
    """debootstrap bookworm + python 3.11 venv + torch CPU wheel + host CA -> ``docker import``."""
    work = Path(tempfile.mkdtemp(prefix="ftctl-base-"))
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
        shutil.copy(TORCH_WHEEL, root / "tmp" / TORCH_WHEEL.name)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PIP_CERT": IMAGE_CA, "HOME": "/root"}
        _run(["chroot", str(root), "python3", "-m", "venv", "/opt/py"], env=env)
        _run(
            [
                "chroot",
                str(root),
                "/opt/py/bin/pip",
                "install",
                "--no-cache-dir",
                "--disable-pip-version-check",
                f"/tmp/{TORCH_WHEEL.name}",
            ],
            env=env,
        )
        (root / "tmp" / TORCH_WHEEL.name).unlink()
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / junk, ignore_errors=True)
        changes = [
            "--change",
            "ENV PATH=/opt/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            f"ENV PIP_CERT={IMAGE_CA}",
            "--change",
            "ENV LANG=C.UTF-8",
        ]
        _run(
            f"tar -C {root} -c . | docker import {' '.join(repr(c) for c in changes)} - {tag}",
            shell=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def test_base_image(docker_engine) -> str:
    """The local stand-in for the CUDA base (built once per machine, reused by tag)."""
    try:
        docker_engine.images.get(TEST_BASE_TAG)
    except docker.errors.ImageNotFound:
        build_test_base(TEST_BASE_TAG)
    return TEST_BASE_TAG


@pytest.fixture(scope="session")
def ftctl_image(docker_engine, test_base_image) -> str:
    """The project's Dockerfile built on the test base (once per session; layers cached)."""
    from ftctl.image import build_image

    result = build_image(REPO, base_image=test_base_image, tags=[TEST_IMAGE_TAG])
    return result.image_id


if __name__ == "__main__":  # build the base by hand: python -m tests.integration.docker_fixtures
    build_test_base()
