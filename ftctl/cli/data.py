"""ftctl data generate | validate | convert: training and test data files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ftctl import config as cfgmod
from ftctl.cli import common
from ftctl.config import DataConfig
from ftctl.data.examples import file_format, read_examples, write_examples
from ftctl.data.generate import counts, write_generated
from ftctl.data.reconcile import cross_file_problems
from ftctl.errors import DataError, ExitCode, FtctlError, Problem

app = typer.Typer(
    help="Generate, validate and convert training/test data (JSONL and CSV).",
    no_args_is_help=True,
)


# --------------------------------------------------------------------------- generate


# `ftctl data generate`'s options, declared once (the command's signature names them)
TemplatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--templates",
        help="Templates YAML file (phrasings per intent).",
        show_default=common.default_text(DataConfig, "templates"),
    ),
]
OldSamplesOpt = Annotated[
    Path | None,
    typer.Option("--samples", hidden=True, help="Old name of --templates."),
]
OutDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--out-dir",
        help="Output directory.",
        show_default=common.default_text(DataConfig, "out_dir"),
    ),
]
PerIntentOpt = Annotated[
    int | None,
    typer.Option(
        "--per-intent",
        help="Examples per intent (balanced).",
        show_default=common.default_text(DataConfig, "per_intent"),
    ),
]
FmtOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="jsonl | csv | both.",
        show_default=common.default_text(DataConfig, "format"),
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="Output file stem (STEM.jsonl / STEM.csv).",
        show_default=common.default_text(DataConfig, "name"),
    ),
]
IdsOpt = Annotated[bool, typer.Option("--ids", help='Write an "id" field (for test pools).')]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an output file even if it holds rows generate did not write.",
    ),
]


@app.command("generate")
def generate_cmd(
    ctx: typer.Context,
    templates: TemplatesOpt = None,
    old_samples: OldSamplesOpt = None,
    out_dir: OutDirOpt = None,
    per_intent: PerIntentOpt = None,
    seed: common.SeedOpt = None,
    fmt: FmtOpt = None,
    name: NameOpt = None,
    ids: IdsOpt = False,
    force: ForceOpt = False,
    json_: common.JsonOpt = False,
    docker: common.DockerOpt = False,
    gpus: common.GpusOpt = None,
    image: common.ImageOpt = None,
) -> None:
    """Expand the templates file into balanced, deduplicated training data.

    Writes OUT_DIR/STEM.jsonl ({"text","label"}) and/or OUT_DIR/STEM.csv
    (user_input,intent_code), deterministic for a seed, and OUT_DIR/STEM.generated.json (what
    it wrote). A file holding rows generate did not write is not replaced (exit 3) unless
    --force; the reviewed data ([data] reviewed) is never written.

    Example: `ftctl data generate --per-intent 120 --seed 42`
    """
    if docker:
        from ftctl.cli.docker_run import rerun_in_docker

        raise typer.Exit(rerun_in_docker(ctx, gpus=gpus, image=image))
    if old_samples is not None:
        common.renamed_flag("data generate --samples", "--templates")
    cfg = cfgmod.with_flags(
        common.config(ctx).data,
        templates=templates or old_samples,
        out_dir=out_dir,
        per_intent=per_intent,
        seed=seed,
        format=fmt,
        name=name,
    )
    made = write_generated(cfg, with_ids=ids, force=force, reporter=common.reporter(ctx))
    templates, examples, paths = made.templates, made.examples, made.paths
    per_label = counts(examples)
    ordered = {label: per_label.get(label, 0) for label in templates.labels}
    if json_:
        common.emit_json(
            ctx,
            {
                "ok": True,
                "templates": str(cfg.templates),
                "seed": cfg.seed,
                "total": len(examples),
                "counts": ordered,
                "paths": [str(p) for p in paths],
            },
        )
        return
    phrasings = {it.label: len(it.phrasings) for it in templates.intents}
    table = Table(title=f"generated from {cfg.templates} (seed {cfg.seed})")
    table.add_column("intent")
    table.add_column("phrasings", justify="right")
    table.add_column("examples", justify="right")
    for label, n in ordered.items():
        table.add_row(label, str(phrasings[label]), str(n))
    table.add_section()
    table.add_row("total", str(sum(phrasings.values())), str(len(examples)))
    common.out.print(table)
    for p in paths:
        common.out.print(Text.assemble("wrote ", (str(p), "bold")))


# --------------------------------------------------------------------------- validate


def _validate_file(path: Path, max_chars: int, labels: list[str] | None, tokenizer=None) -> dict:
    """Summary of one file; whole-file failures become one error problem."""
    rows = []
    try:
        result = read_examples(
            path, max_chars=max_chars, allowed_labels=labels, tokenizer=tokenizer
        )
        problems, rows = result.problems, result.examples
    except FtctlError as exc:
        message = exc.message.removeprefix(f"{path}: ")  # the location is printed once
        problems = exc.problems or [Problem(message, file=str(path))]
        if exc.hint:
            problems = [
                Problem(f"{p.message} (hint: {exc.hint})", p.file, p.line, p.field, p.severity)
                for p in problems
            ]
    if not rows and not problems:
        problems = [Problem("no examples: the file is empty (or a CSV header alone)", str(path))]
    return {"file": str(path), "examples": len(rows), "rows": rows, "problems": problems}


def _add_cross_file(reports: list[dict], tokenizer=None) -> dict[str, int]:
    """Texts in several files (relabels, duplicates) as warnings on the later file's rows;
    their counts."""
    cross = cross_file_problems([r["rows"] for r in reports], tokenizer)
    for r in reports:
        r["problems"] += [p for p in cross if p.file == r["file"]]
    relabels = sum(p.field == "label" for p in cross)
    return {"relabels": relabels, "duplicates": len(cross) - relabels}


def _print_problem(p: Problem, strict: bool) -> None:
    is_error = p.severity == "error" or strict
    style = "red" if is_error else "yellow"
    common.out.print(Text.assemble((f"{p.severity}: ", style), str(p)))


@app.command("validate")
def validate_cmd(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="JSONL or CSV data files.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Allowed labels: a model directory (config.json id2label) or a text file "
            "with one label per line.",
        ),
    ] = None,
    max_chars: common.MaxCharsOpt = None,
    label_map: Annotated[
        Path | None,
        typer.Option(
            "--label-map",
            help="Intent names (JSON or CSV id,intent) for a --labels model whose labels are "
            "LABEL_0, LABEL_1...",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Treat warnings (duplicates) as errors.")
    ] = False,
    json_: common.JsonOpt = False,
) -> None:
    """Check data files and report every problem with file:line.

    Given several files (new data first, then old data), a text found in more than one is
    reported too: with another label (a relabel: `ftctl train` keeps the --new-data label and
    drops the old row) or the same one (a duplicate: train keeps one copy). Texts are the same
    when the model sees them the same: NFKC, whitespace, lowercasing; with --labels MODEL_DIR,
    equal token ids of its tokenizer.

    Exit codes: 0 clean (warnings allowed), 3 any error (or any warning with --strict).

    Example: `ftctl data validate data/new.jsonl data/old.jsonl --labels models/base/final`
    """
    cfg = cfgmod.with_flags(common.config(ctx).data, max_chars=max_chars)
    allowed = common.read_label_list(labels, label_map)
    tokenizer = common.model_tokenizer(labels)
    reports = [_validate_file(f, cfg.max_chars, allowed, tokenizer) for f in files]
    across = _add_cross_file(reports, tokenizer)
    n_err = sum(1 for r in reports for p in r["problems"] if p.severity == "error")
    n_warn = sum(1 for r in reports for p in r["problems"] if p.severity == "warning")
    failed = n_err > 0 or (strict and n_warn > 0)
    if json_:
        common.emit_json(
            ctx,
            {
                "ok": not failed,
                "errors": n_err,
                "warnings": n_warn,
                "strict": strict,
                "across_files": across,
                "files": [
                    {
                        "file": r["file"],
                        "examples": r["examples"],
                        "errors": sum(p.severity == "error" for p in r["problems"]),
                        "warnings": sum(p.severity == "warning" for p in r["problems"]),
                        "problems": [p.to_dict() for p in r["problems"]],
                    }
                    for r in reports
                ],
            },
        )
    else:
        for r in reports:
            for p in r["problems"]:
                _print_problem(p, strict)
        table = Table(title="validation summary")
        for col in ("file", "examples", "errors", "warnings"):
            table.add_column(col, justify="left" if col == "file" else "right")
        for r in reports:
            e = sum(p.severity == "error" for p in r["problems"])
            w = sum(p.severity == "warning" for p in r["problems"])
            table.add_row(r["file"], str(r["examples"]), str(e), str(w))
        common.out.print(table)
        verdict = "FAILED" if failed else "OK"
        common.out.print(
            Text.assemble(
                (verdict, "bold red" if failed else "bold green"),
                f": {n_err} error(s), {n_warn} warning(s) in {len(reports)} file(s)"
                + (
                    f"; across files: {across['relabels']} relabel(s), "
                    f"{across['duplicates']} duplicate(s)"
                    if len(reports) > 1
                    else ""
                )
                + (" (--strict: warnings count as errors)" if strict and n_warn else ""),
            )
        )
    if failed:
        raise typer.Exit(int(ExitCode.DATA))


# --------------------------------------------------------------------------- convert


@app.command("convert")
def convert_cmd(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="Input file (.jsonl or .csv).")],
    dst: Annotated[Path, typer.Argument(help="Output file (.jsonl or .csv).")],
    max_chars: common.MaxCharsOpt = None,
    json_: common.JsonOpt = False,
) -> None:
    """Convert JSONL <-> CSV (formats by extension), validating on the way; written atomically.

    Ids are kept when the input has them. Duplicates are dropped with a warning; any error
    stops the conversion and writes nothing.

    Example: `ftctl data convert data/incremental_training_data.jsonl /tmp/train.csv`
    """
    cfg = cfgmod.with_flags(common.config(ctx).data, max_chars=max_chars)
    file_format(dst)  # unknown output extension: fail before reading anything
    result = read_examples(src, max_chars=cfg.max_chars)
    if result.errors:
        shown = "\n".join(f"  {p}" for p in result.errors[:20])
        more = f"\n  ... and {len(result.errors) - 20} more" if len(result.errors) > 20 else ""
        raise DataError(
            f"{src}: {len(result.errors)} error(s); nothing written:\n{shown}{more}",
            hint=f"run `ftctl data validate {src}`, fix the rows and retry",
            problems=result.errors,
        )
    if not result.examples:
        raise DataError(f"{src}: no examples to convert", hint="add some rows")
    rep = common.reporter(ctx)
    for w in result.warnings:
        rep.warn(f"{w} (dropped)")
    with_ids = any(ex.id is not None for ex in result.examples)
    write_examples(dst, result.examples, with_ids=with_ids)
    if json_:
        common.emit_json(
            ctx,
            {
                "ok": True,
                "input": str(src),
                "output": str(dst),
                "examples": len(result.examples),
                "dropped_duplicates": len(result.warnings),
            },
        )
        return
    common.out.print(
        Text.assemble("wrote ", (str(dst), "bold"), f": {len(result.examples)} examples from {src}")
    )
