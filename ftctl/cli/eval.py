"""ftctl eval: the comprehensive test and the forgetting gate (candidate vs the live model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ftctl.cli import common
from ftctl.config import EvalConfig, with_flags
from ftctl.eval.gate import check_gate


def _summary(report: dict[str, Any]) -> None:
    out = common.out
    cand, base, gate = report["candidate"], report["baseline"], report["gate"]
    draw = report["draw"]
    out.print(
        f"cases: {draw['drawn']} over {len(draw['per_intent'])} intents "
        f"(seed {report['settings']['seed']})"
    )
    for name, r in (("baseline", base), ("candidate", cand)):
        if r:
            out.print(
                f"{name:9}  accuracy {r['accuracy'] * 100:5.1f}%  "
                f"macro-F1 {r['macro_f1'] * 100:5.1f}%  ({r['cases_per_second']:.0f} cases/s)"
            )
    before = {(p["a"], p["b"]): p for p in base["pairs"]} if base else {}
    verdicts = {(p["a"], p["b"]): p for p in (report["comparison"] or {}).get("pairs", [])}
    for p in cand["pairs"]:
        b = before.get((p["a"], p["b"]))
        ab = f"{b['a_as_b']} -> {p['a_as_b']}" if b else str(p["a_as_b"])
        ba = f"{b['b_as_a']} -> {p['b_as_a']}" if b else str(p["b_as_a"])
        v = verdicts.get((p["a"], p["b"]))
        verdict = f": {v['verdict']}" if v else ""
        out.print(f"pair {p['a']} <-> {p['b']}: A->B {ab}, B->A {ba}{escape(verdict)}")
    if report["flips"] is not None:
        f = report["flips"]
        out.print(
            f"flipped cases: {len(f['lost'])} right before and wrong now, "
            f"{len(f['gained'])} wrong before and right now"
        )
    color = {"PASS": "green", "FAIL": "red"}.get(gate["verdict"], "yellow")
    out.print(f"[bold {color}]gate: {gate['verdict']}[/]")
    for reason in gate["reasons"]:
        out.print(f"  - {escape(reason)}")
    for note in gate["not_significant"]:
        out.print(f"  [dim]- not significant: {escape(note)}[/]")


# `ftctl eval`'s options, declared once (the command's signature names them)
ModelOpt = Annotated[
    Path,
    typer.Option("--model-path", "--model", help="The candidate model directory (HF format)."),
]
BaselineOpt = Annotated[
    Path | None,
    typer.Option("--baseline", help="The live model to compare against; enables the gate."),
]
TestDataOpt = Annotated[
    Path | None,
    typer.Option(
        "--test-data",
        help="Held-out test pool (JSONL/CSV).",
        show_default=common.default_text(EvalConfig, "test_data"),
    ),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples",
        "-n",
        help="Cases to draw, stratified.",
        show_default=common.default_text(EvalConfig, "samples"),
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Seed of the draw.", show_default=common.default_text(EvalConfig, "seed")
    ),
]
ReportDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--report-dir",
        help="Write report.json, report.md and two PNG plots here.",
    ),
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option(
        "--max-drop",
        help="Accuracy points a check may lose before it can fail.",
        show_default=common.default_text(EvalConfig, "max_drop"),
    ),
]
AlphaOpt = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help="Significance level of the McNemar test.",
        show_default=common.default_text(EvalConfig, "alpha"),
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Inference batch.",
        show_default=common.default_text(EvalConfig, "batch_size"),
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Test cases found in the candidate's training data (its manifest's data "
        "files) are an error (exit 3), not a warning.",
    ),
]


def eval_cmd(
    ctx: typer.Context,
    model: ModelOpt,
    baseline: BaselineOpt = None,
    test_data: TestDataOpt = None,
    samples: SamplesOpt = None,
    seed: SeedOpt = None,
    report_dir: ReportDirOpt = None,
    max_drop: MaxDropOpt = None,
    alpha: AlphaOpt = None,
    batch_size: BatchSizeOpt = None,
    device: common.DeviceOpt = None,
    strict: StrictOpt = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Test a model on a seeded, stratified draw of test cases; with --baseline, gate it.

    Both models see the same cases. The gate FAILS (exit 4) when the candidate is worse than
    the baseline by more than --max-drop points AND significantly (one-sided exact McNemar,
    --alpha) on overall accuracy, any intent's recall, or a confused pair's cross errors.
    Confused pairs naming labels the model lacks are an error (exit 2). With --baseline and
    --report-dir the verdict, bound to the model's digest and to report.json's sha256, is also
    written to MODEL/eval_report.json: deploy ships it, `ftctl promote` requires a PASS.

    Example:

        ftctl eval --model-path models/incremental/final --baseline live/final --report-dir rep
    """
    from ftctl.eval.evaluate import run_eval
    from ftctl.eval.report import write_report, write_verdict

    settings = with_flags(
        common.config(ctx).eval,
        test_data=test_data,
        samples=samples,
        seed=seed,
        report_dir=report_dir,
        max_drop=max_drop,
        alpha=alpha,
        batch_size=batch_size,
        device=device,
    )
    rep = common.reporter(ctx)
    report = run_eval(model, settings, baseline_dir=baseline, strict=strict, reporter=rep)
    if settings.report_dir is not None:
        paths = write_report(report, settings.report_dir, reporter=rep)
        if baseline is not None:  # the verdict travels with the model (deploy, promote)
            paths.append(write_verdict(report, settings.report_dir, model))
        rep.info("report: " + ", ".join(str(p) for p in paths))
    if json_out:
        common.emit_json(ctx, {"ok": report["gate"]["verdict"] != "FAIL", **report})
    else:
        _summary(report)
    check_gate(report, settings.report_dir)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("eval")(eval_cmd)
