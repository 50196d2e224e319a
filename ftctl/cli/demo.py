"""ftctl demo: the whole story of the seed on this machine (`ftctl pipeline` is its CI twin)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ftctl.cli import common
from ftctl.config import check, override
from ftctl.demo import DemoConfig
from ftctl.terms import seed_term

# --------------------------------------------------------------------------- demo


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:5.1f}%"


def _before_after_table(res) -> Table:
    from ftctl.demo import intent_recall

    base, cand = res.gate_report["baseline"], res.gate_report["candidate"]
    table = Table(
        title=f"{seed_term('comprehensive test')}, same 500 cases (seed 12345): base -> candidate",
        title_justify="left",
    )
    for col in ("intent", "base", "candidate", "change"):
        table.add_column(col, justify="left" if col == "intent" else "right")
    pair_intents = {lab for pair in res.gate_report["settings"]["pairs"] for lab in pair}
    labels = sorted(base["per_intent"], key=lambda lab: (lab not in pair_intents, lab))
    for lab in labels:
        b, c = intent_recall(base, lab), intent_recall(cand, lab)
        delta = None if b is None or c is None else (c - b) * 100
        style = "bold" if lab in pair_intents else ""
        color = "green" if (delta or 0) > 0.05 else "red" if (delta or 0) < -0.05 else "dim"
        table.add_row(
            Text(lab + (" *" if lab in pair_intents else ""), style=style),
            _pct(b),
            _pct(c),
            Text("" if delta is None else f"{delta:+.1f}", style=color),
        )
    table.add_section()
    table.add_row(
        "overall accuracy",
        _pct(base["accuracy"]),
        _pct(cand["accuracy"]),
        f"{(cand['accuracy'] - base['accuracy']) * 100:+.1f}",
    )
    return table


def _pairs_table(res) -> Table:
    from ftctl.demo import pair_table

    table = Table(
        title=f"{seed_term('confused pairs')}, * above: cross errors on the same cases",
        title_justify="left",
    )
    for col in ("pair", "before", "after"):
        table.add_column(col, justify="left" if col == "pair" else "right")
    for row in pair_table(res.gate_report):
        table.add_row(row["pair"], str(row["errors_before"]), str(row["errors_after"]))
    return table


def _live_table(res) -> Table:
    from ftctl.demo import showcase_table

    table = Table(
        title=f"live service {res.server_url}: before and after the deploy", title_justify="left"
    )
    for col in ("text", "expected", "before", "after"):
        table.add_column(col, overflow="fold")
    for row in showcase_table(res.live_before, res.live_after):
        table.add_row(
            row["text"],
            row["expected"],
            Text(row["before"], style="green" if row["before_ok"] else "red"),
            Text(row["after"], style="green" if row["after_ok"] else "red"),
        )
    return table


def demo_cmd(
    ctx: typer.Context,
    workdir: Annotated[
        Path,
        typer.Option(
            "--workdir",
            help="Where the demo writes everything (emptied first: a non-empty directory the "
            "demo did not make is refused unless --force).",
        ),
    ] = DemoConfig.workdir,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Templates, original data and test cases.")
    ] = Path("data"),
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Fine-tune learning rate for the small stand-in model.",
            show_default=common.default_text(DemoConfig, "lr"),
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="At most this many epochs.",
            show_default=common.default_text(DemoConfig, "epochs"),
        ),
    ] = None,
    ssh: Annotated[
        bool,
        typer.Option(
            "--ssh/--no-ssh",
            help="Deploy over SSH to a local sshd, or to a local "
            "target through the same deploy code.",
        ),
    ] = True,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Leave the local server running at the end.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Empty --workdir even if the demo did not make it."),
    ] = False,
    json_out: common.JsonOpt = False,
) -> None:
    """Run the whole seed workflow on the shipped demo data, on this machine.

    Generates the incremental data, trains a base classifier (a small stand-in for
    chinese-roberta-wwm-ext: it confuses the seed's three pairs), tests it, starts a local
    "production" server (real sshd + supervisor + `ftctl serve`), fine-tunes with the seed's
    anti-forgetting strategies, gates candidate vs base, deploys over SSH, shows live
    predictions before and after, and ends with `ftctl harvest` of the live service's doubtful
    answers into a review file. Exit 4 if the gate fails, 0 when all went through.

    Example: `ftctl demo` (or `ftctl demo --json > demo.json`)
    """
    from ftctl.demo import run_demo

    cfg = override(
        DemoConfig(workdir=workdir, data_dir=data_dir, ssh=ssh, keep_serving=keep_serving),
        lr=lr,
        epochs=epochs,
        force=force,
    )
    check(cfg)
    res = run_demo(cfg, reporter=common.reporter(ctx))
    if json_out:
        common.emit_json(ctx, res.to_dict())
        return
    out = common.out
    out.print(_before_after_table(res))
    out.print(_pairs_table(res))
    out.print(_live_table(res))
    if res.harvest:
        out.print(_harvest_table(res))
    dep = res.deploy["hosts"][0] if res.deploy and res.deploy.get("hosts") else {}
    out.print(
        f"gate: [bold green]{res.gate_report['gate']['verdict']}[/]   deployed "
        f"{dep.get('release', '?')} over {res.transport} in {dep.get('seconds', 0):.1f}s "
        f"({seed_term('backup')}: original kept as releases/{dep.get('backup')})"
    )
    out.print(
        Text.assemble(
            "report: ",
            (f"{res.report_dir}/report.md", "bold"),
            " (+ report.json, confusion_matrix.png, per_intent_before_after.png)",
        )
    )
    out.print("stages: " + ", ".join(f"{s.name.split(' (')[0]} {s.seconds}s" for s in res.stages))
    if res.harvest:
        out.print(
            f"review file: {res.harvest['out']} ({res.harvest['rows']} rows): fill in the label "
            f"column, then `ftctl data import-review {res.harvest['out']}`",
            markup=False,
        )
    if keep_serving:
        out.print(f"the server keeps running at {res.server_url} (supervisor in {workdir}/server)")


def _harvest_table(res) -> Table:
    h = res.harvest
    table = Table(
        title=f"harvest from the live service ({h['log']}): {h['doubtful']} doubtful of "
        f"{h['distinct']} texts; the most doubtful",
        title_justify="left",
    )
    for col in ("text", "predicted", "score", "runner-up", "why"):
        table.add_column(col, overflow="fold")
    for row in h["top"]:
        table.add_row(row["text"], row["predicted"], f"{row['score']:.2f}",
                      row["runner_up"] or "-", " ".join(row["reasons"]))  # fmt: skip
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("demo")(demo_cmd)
