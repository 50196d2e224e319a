"""ftctl image build | ls: the reproducible training image (Dockerfile at the project root)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ftctl import config as cfgmod
from ftctl.cli import common
from ftctl.image.build import build_image, default_tags, list_images

app = typer.Typer(
    help="Build and list the training image (CUDA PyTorch base + pinned dependencies + ftctl).",
    no_args_is_help=True,
)


@app.command("build")
def build_cmd(
    ctx: typer.Context,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            "-t",
            help="Tag(s) to give the image (repeatable); --docker runs [image] tag.",
            show_default=f"ftctl:<version>-<git sha> and [image] tag ({cfgmod.ImageConfig.tag})",
        ),
    ] = None,
    base_image: Annotated[
        str | None,
        typer.Option(
            "--base-image",
            help="BASE_IMAGE build arg: Python 3.11 + torch + pip, pinned by digest.",
            show_default=cfgmod.DEFAULT_BASE_IMAGE[:64] + "...",
        ),
    ] = None,
    context: Annotated[
        Path | None,
        typer.Option(
            "--context",
            help="Build context (the project root).",
            show_default=common.default_text(cfgmod.ImageConfig, "context"),
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Rebuild every layer (ignore the build cache).")
    ] = False,
    json_: common.JsonOpt = False,
) -> None:
    """Build the training image through the Docker engine and print its id.

    The build log streams to stderr; the image is tagged `ftctl:<version>-<git sha>` and
    `[image] tag` (default `ftctl:latest`) unless --tag is given, and labelled with the git
    revision (OCI labels). `ftctl train --docker` runs `[image] tag`.

    Example: `ftctl image build` (GPU machine) or
    `ftctl image build --base-image ftctl-docker-test-base:torch2.13.0` (no registry)
    """
    cfg = cfgmod.with_flags(common.config(ctx).image, base_image=base_image, context=context)
    result = build_image(
        cfg.context,
        dockerfile=cfg.dockerfile,
        base_image=cfg.base_image,
        tags=tag or default_tags(cfg.context, cfg.tag),
        no_cache=no_cache,
        reporter=common.reporter(ctx),
    )
    if json_:
        common.emit_json(ctx, {"ok": True, **result.to_dict()})
        return
    common.err.print(
        f"built {', '.join(result.tags)} in {result.seconds:.0f} s (base {result.base_image})"
    )
    if cfg.tag not in result.tags:
        common.err.print(f"note: --docker runs [image] tag = {cfg.tag}, not this image")
    common.out.print(result.image_id)


@app.command("ls")
def ls_cmd(ctx: typer.Context, json_: common.JsonOpt = False) -> None:
    """List the local ftctl images, newest first; `*` marks [image] tag, what --docker runs.

    Example: `ftctl image ls --json`
    """
    docker_tag = common.config(ctx).image.tag
    rows = list_images()
    if json_:
        common.emit_json(ctx, {"ok": True, "docker_runs": docker_tag, "images": rows})
        return
    if not rows:
        common.err.print("no ftctl images; build one with `ftctl image build`")
        return
    table = Table("id", "tags", "created", "size", caption=f"* --docker runs {docker_tag}")
    for r in rows:
        table.add_row(
            r["id"].removeprefix("sha256:")[:12],
            ", ".join(f"{t} *" if t == docker_tag else t for t in r["tags"]) or "<none>",
            r["created"][:19].replace("T", " "),
            f"{r['size'] / 1e9:.2f} GB",
        )
    common.out.print(table)
