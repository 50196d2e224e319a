"""ftctl demo: the whole story of the seed on this machine (`ftctl pipeline` is its CI twin)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ftctl.cli import common
from ftctl.config import with_flags
from ftctl.demo.run import DemoConfig
from ftctl.terms import seed_term

# --------------------------------------------------------------------------- demo


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:5.1f}%"


def _before_after_table(res) -> Table:
    from ftctl.demo.run import intent_recall

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
    from ftctl.demo.run import pair_table

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
    from ftctl.demo.run import showcase_table

    table = Table(
        title="the live services' answers: staging (deploy) and production (promote), before "
        "-> after",
        title_justify="left",
    )
    for col in ("text", "expected", "staging", "production"):
        table.add_column(col, overflow="fold")
    rows = {env: showcase_table(a.get("before", []), a.get("after", []))
            for env, a in res.live.items()}  # fmt: skip

    def cell(row: dict) -> Text:
        return Text.assemble(
            (row["before"], "green" if row["before_ok"] else "red"),
            " -> ",
            (row["after"], "green" if row["after_ok"] else "red"),
        )

    for st, pr in zip(rows.get("staging", []), rows.get("production", []), strict=False):
        table.add_row(st["text"], st["expected"], cell(st), cell(pr))
    return table


def _summary_lines(res, workdir: Path, keep_serving: bool) -> list[str]:
    dep = res.deploy["hosts"][0] if res.deploy and res.deploy.get("hosts") else {}
    prom = res.promote or {}
    ph = ((prom.get("deploy") or {}).get("hosts") or [{}])[0]
    rev = res.review or {}
    lines = [
        f"review: the reviewer labelled {rev.get('filled', 0)} of {res.harvest['rows']} "
        f"harvested rows ({rev.get('file')}); import-review added {rev.get('added', 0)} to "
        f"{rev.get('target')}",
        f"gate: [bold green]{res.gate_report['gate']['verdict']}[/] (recorded in the model as "
        "eval_report.json; promote requires it)",
        f"staging: deployed {dep.get('release', '?')} over {res.transport} in "
        f"{dep.get('seconds', 0):.1f}s ({seed_term('backup')}: original kept as "
        f"releases/{dep.get('backup')})",
        f"production: promoted {prom.get('release')} ({str(prom.get('sha256'))[:8]}, the same "
        f"name and digest) in {ph.get('seconds', 0):.1f}s; its deploys.log says it came from "
        f"staging's {prom.get('release')}",
    ]
    if keep_serving:
        lines.append(
            f"the services keep running: staging {res.urls.get('staging')}, production "
            f"{res.urls.get('production')} (supervisors in {workdir}/staging, "
            f"{workdir}/production)"
        )
    return lines


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
    chinese-roberta-wwm-ext: it confuses the seed's three pairs), tests it, starts two local
    servers, staging and production (each a real sshd + supervisor + `ftctl serve`), sends
    users' questions to production and harvests its doubtful answers over SSH, lets the
    shipped reviewer's answers (data/demo_reviewer.csv) fill in the review file and imports
    it, fine-tunes on the generated + reviewed data with the seed's anti-forgetting
    strategies, gates candidate vs base, deploys to staging, promotes staging's release to
    production, and shows both services' answers before and after. Exit 4 if the gate fails,
    0 when all went through.

    Example: `ftctl demo` (or `ftctl demo --json > demo.json`)
    """
    from ftctl.demo.run import run_demo

    cfg = with_flags(
        DemoConfig(workdir=workdir, data_dir=data_dir, ssh=ssh, keep_serving=keep_serving),
        lr=lr,
        epochs=epochs,
        force=force,
    )
    res = run_demo(cfg, reporter=common.reporter(ctx))
    if json_out:
        common.emit_json(ctx, res.to_dict())
        return
    out = common.out
    out.print(_before_after_table(res))
    out.print(_pairs_table(res))
    if res.harvest:
        out.print(_harvest_table(res))
    out.print(_live_table(res))
    for line in _summary_lines(res, workdir, keep_serving):
        out.print(line, highlight=False)
    out.print(
        Text.assemble(
            "report: ",
            (f"{res.report_dir}/report.md", "bold"),
            " (+ report.json, confusion_matrix.png, per_intent_before_after.png)",
        )
    )
    out.print("stages: " + ", ".join(f"{s.name.split(' (')[0]} {s.seconds}s" for s in res.stages))


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
