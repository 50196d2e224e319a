"""Build times of the training image: from scratch, after a code change, after a README change.

ftctl's Dockerfile against a named peer measured in the same run: the Dockerfile (and
.dockerignore) of ftctl before the dependency layer was cut off from pyproject.toml and
README.md (commit e8a0837: its dependency layer copied both, so editing either reinstalled
every dependency). Both build on the local torch 2.13 test base (no registry here), through
the same docker SDK call `ftctl image build` makes.

    .venv/bin/python bench/bench_image.py            # ~10 min on 2 shared cores

Prints a table of seconds and the peer/ftctl ratios. Tags ftctl-docker-bench:* are removed at
the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER_REV = "e8a0837"  # the Dockerfile before #11's dependency layer
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")
CONTEXT_DIRS = ("docker", "ftctl")


def context(dst: Path, peer: bool) -> Path:
    """The build context: today's tree, with the peer's Dockerfile/.dockerignore if ``peer``."""
    dst.mkdir(parents=True)
    for name in CONTEXT_FILES:
        shutil.copy(ROOT / name, dst / name)
    for name in CONTEXT_DIRS:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    if peer:
        for name in ("Dockerfile", ".dockerignore"):
            old = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{PEER_REV}:{name}"],
                capture_output=True,
                check=True,
            ).stdout
            (dst / name).write_bytes(old)
    return dst


def timed_build(client, ctx: Path, base: str, tag: str, no_cache: bool = False) -> float:
    from ftctl.image.build import build_image

    started = time.monotonic()
    build_image(ctx, base_image=base, tags=[tag], no_cache=no_cache, client=client)
    return time.monotonic() - started


def measure(client, ctx: Path, base: str, tag: str) -> dict[str, float]:
    times = {"from scratch": timed_build(client, ctx, base, tag, no_cache=True)}
    with (ctx / "README.md").open("a") as f:
        f.write("\nedited by bench_image.py\n")
    times["after a README change"] = timed_build(client, ctx, base, tag)
    with (ctx / "ftctl" / "cli" / "image.py").open("a") as f:
        f.write("\n# edited by bench_image.py\n")
    times["after a code change"] = timed_build(client, ctx, base, tag)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    import docker
    from tests.integration import docker_fixtures as fx

    client = docker.from_env(timeout=600)
    for tag, make in (
        (fx.ROOT_BASE_TAG, lambda: fx.build_root_base()),
        (
            fx.TEST_BASE_TAG,
            lambda: fx.build_torch_base(client, str(fx.TORCH_WHEEL), fx.TEST_BASE_TAG),
        ),
    ):
        if not fx._image_exists(client, tag):
            make()
    work = Path(tempfile.mkdtemp(prefix="ftctl-docker-bench-"))
    results = {}
    try:
        for name, peer in (("ftctl", False), (f"peer ({PEER_REV})", True)):
            tag = f"ftctl-docker-bench:{'peer' if peer else 'ftctl'}"
            ctx = context(work / ("peer" if peer else "ftctl"), peer)
            results[name] = measure(client, ctx, fx.TEST_BASE_TAG, tag)
            print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in results[name].items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for tag in ("ftctl-docker-bench:ftctl", "ftctl-docker-bench:peer"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(tag, force=True)
    ours, theirs = results["ftctl"], results[f"peer ({PEER_REV})"]
    print(f"\n| build | peer ({PEER_REV}) | ftctl | peer / ftctl |")
    print("|---|---|---|---|")
    for what in ours:
        ratio = theirs[what] / ours[what]
        print(f"| {what} | {theirs[what]:.1f} s | {ours[what]:.1f} s | {ratio:.1f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
