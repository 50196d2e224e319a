"""ftctl demo (the whole story on this machine) and ftctl pipeline (the same stages for CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ftctl.cli import common
from ftctl.cli.deploy import (
    AcceptNewOpt,
    HostOpt,
    IdentityOpt,
    KnownHostsOpt,
    ProfileOpt,
    _connector,
    _target,
)
from ftctl.config import check, override
from ftctl.errors import GateFailed, StageFailed

# --------------------------------------------------------------------------- demo


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:5.1f}%"


def _before_after_table(res) -> Table:
    from ftctl.demo import intent_recall

    base, cand = res.gate_report["baseline"], res.gate_report["candidate"]
    table = Table(
        title="comprehensive test, same 500 cases (seed 12345): base -> candidate",
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
        title="confused pairs (* above): cross errors on the same cases", title_justify="left"
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
        Path, typer.Option("--workdir", help="Where the demo writes everything (emptied first).")
    ] = Path("models/demo"),
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Templates, original data and test cases.")
    ] = Path("data"),
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Fine-tune learning rate for the small stand-in model.",
            show_default="2e-4",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="At most this many epochs.", show_default="6")
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
    from ftctl.demo import DEMO_EPOCHS, DEMO_LR, DemoConfig, run_demo

    if json_out:
        common.state(ctx).json = True
    cfg = DemoConfig(
        workdir=workdir,
        data_dir=data_dir,
        lr=lr or DEMO_LR,
        epochs=epochs or DEMO_EPOCHS,
        ssh=ssh,
        keep_serving=keep_serving,
    )
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
        f"(original kept as releases/{dep.get('backup')})"
    )
    out.print(
        Text.assemble(
            "report: ",
            (f"{res.report_dir}/report.md", "bold"),
            " (+ report.json, confusion_matrix.png, per_intent_before_after.png)",
        )
    )
    out.print(
        "stages: " + ", ".join(f"{s['stage'].split(' (')[0]} {s['seconds']}s" for s in res.stages)
    )
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


# --------------------------------------------------------------------------- pipeline


def _subcommand_ctx(ctx: typer.Context, names: list[str], args: list[str]):
    """A click context for ``ftctl <names> <args>``, child of this invocation's root."""
    import click
    import typer.main

    from ftctl.cli.main import app

    parent = ctx.find_root()
    cmd = typer.main.get_command(app)
    for name in names[:-1]:
        cmd = cmd.get_command(parent, name)
        parent = click.Context(cmd, info_name=name, parent=parent)
    leaf = cmd.get_command(parent, names[-1])
    return leaf.make_context(names[-1], list(args), parent=parent)


def _in_image(ctx, names: list[str], args: list[str], gpus, image) -> dict[str, Any]:
    import sys

    from ftctl.cli.docker_run import rerun_in_docker

    sub = _subcommand_ctx(ctx, names, args)
    used = int(sub.params.get("nproc") or 1) if names == ["train"] else 0
    code = rerun_in_docker(sub, gpus=gpus, image=image, gpus_used=used, stdout=sys.stderr.buffer)
    if code != 0:
        raise StageFailed(f"`ftctl {' '.join(names)}` in the image exited {code}", code)
    return {"in_image": True}


def pipeline_cmd(
    ctx: typer.Context,
    model_path: Annotated[
        Path | None,
        typer.Option("--model-path", help="The live (base) model: fine-tuned, and the baseline."),
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option(
            "--templates", help="Templates YAML.", show_default="data/incremental_samples.yaml"
        ),
    ] = None,
    old_data: Annotated[
        Path | None, typer.Option("--old-data", help="Original data to replay.")
    ] = None,
    output_path: Annotated[
        Path | None,
        typer.Option(
            "--output-path", help="Train output (OUTPUT/final/).", show_default="models/incremental"
        ),
    ] = None,
    test_data: Annotated[Path | None, typer.Option("--test-data", help="Test pool.")] = None,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report-dir",
            help="Eval report directory ([eval] report_dir, else reports/).",
            show_default="reports",
        ),
    ] = None,
    profile: ProfileOpt = None,
    host: HostOpt = None,
    identity: IdentityOpt = None,
    known_hosts: KnownHostsOpt = None,
    accept_new_host_key: AcceptNewOpt = False,
    skip_deploy: Annotated[
        bool, typer.Option("--skip-deploy", help="Stop after the gate.")
    ] = False,
    dry_run: common.DryRunOpt = False,
    docker: common.DockerOpt = False,
    gpus: common.GpusOpt = None,
    image: common.ImageOpt = None,
    json_out: common.JsonOpt = False,
) -> None:
    """generate -> train -> eval gate -> deploy, stopping at the first failing stage.

    Exits with the failing stage's code (3 data, 4 gate, 5/6 deploy, 7 environment) and, with
    --json, prints one document listing every stage. With --docker, generation and training
    run inside the training image. Values not given come from ftctl.toml.

    Example: `ftctl pipeline --model-path live/final --old-data data/original_training_data.jsonl
    --profile production --json`
    """
    from ftctl.pipeline import run_stages

    st = common.state(ctx)
    st.json = json_out
    conf = st.config
    rep = common.reporter(ctx)
    data_cfg = override(conf.data, samples=templates, format="both")
    train_cfg = override(
        conf.train, model_path=model_path, old_data=old_data, output_path=output_path
    )
    train_cfg = override(train_cfg, new_data=data_cfg.out_dir / f"{data_cfg.name}.jsonl")
    eval_cfg = override(conf.eval, test_data=test_data, report_dir=report_dir)
    eval_cfg = override(eval_cfg, report_dir=eval_cfg.report_dir or Path("reports"))
    check(data_cfg, train_cfg, eval_cfg)
    candidate = Path(train_cfg.output_path) / "final"
    deploy_target = None
    if not skip_deploy:
        deploy_target = _target(ctx, profile, host, identity=identity, known_hosts=known_hosts)

    def generate() -> dict[str, Any]:
        if docker:
            return _in_image(
                ctx,
                ["data", "generate"],
                ["--samples", str(data_cfg.samples), "--out-dir", str(data_cfg.out_dir)],
                gpus,
                image,
            )
        from ftctl.generate import write_generated

        made = write_generated(data_cfg, reporter=rep)
        return {"examples": len(made.examples), "paths": [str(p) for p in made.paths]}

    def train() -> dict[str, Any]:
        if docker:
            args = [
                "--new-data",
                str(train_cfg.new_data),
                "--output-path",
                str(train_cfg.output_path),
            ]
            if train_cfg.model_path:
                args += ["--model-path", str(train_cfg.model_path)]
            if train_cfg.old_data:
                args += ["--old-data", str(train_cfg.old_data)]
            return _in_image(ctx, ["train"], args, gpus, image)
        from ftctl.train import train as run_train

        return run_train(train_cfg, reporter=rep).summary()

    def gate() -> dict[str, Any]:
        from ftctl.evaluate import run_eval
        from ftctl.report import write_report

        report = run_eval(candidate, eval_cfg, baseline_dir=train_cfg.model_path, reporter=rep)
        write_report(report, eval_cfg.report_dir, reporter=rep)
        verdict = report["gate"]
        if verdict["verdict"] == "FAIL":
            raise GateFailed(
                "the candidate regresses:\n" + "\n".join(f"  {r}" for r in verdict["reasons"]),
                hint=f"see {eval_cfg.report_dir}/report.md",
            )
        return {
            "verdict": verdict["verdict"],
            "accuracy": report["candidate"]["accuracy"],
            "report_dir": str(eval_cfg.report_dir),
        }

    def deploy() -> dict[str, Any]:
        from ftctl import deploy as core

        cfg, hosts = deploy_target
        result = core.deploy(
            candidate,
            cfg,
            hosts,
            _connector(cfg, None, accept_new_host_key),
            dry_run=dry_run,
            reporter=rep,
        )
        if result.error is not None:
            raise result.error
        return result.to_dict()

    result = run_stages(
        [
            ("generate", generate),
            ("train", train),
            ("gate", gate),
            ("deploy", None if skip_deploy else deploy),
        ],
        reporter=rep,
    )
    if json_out:
        common.emit_json(ctx, result.to_dict())
    else:
        for s in result.stages:
            color = {"ok": "green", "failed": "red"}.get(s.status, "dim")
            common.out.print(f"[{color}]{s.status:7}[/] {s.name} ({s.seconds}s)")
    if result.error is not None:
        if not json_out:
            common.print_error(result.error)
        raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("demo")(demo_cmd)
    app.command("pipeline")(pipeline_cmd)
