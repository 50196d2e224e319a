"""ftctl pipeline: generate -> train -> gate -> deploy for CI, one exit code, one JSON document."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ftctl.cli import common, ssh
from ftctl.config import (
    Config,
    DataConfig,
    DeployConfig,
    EvalConfig,
    TrainConfig,
    check,
    override,
)
from ftctl.data.reconcile import with_reviewed
from ftctl.errors import StageFailed
from ftctl.pipeline import PipelineResult, Stage, run_stages

DEFAULT_REPORT_DIR = Path("reports")  # when neither --report-dir nor [eval] report_dir is set


def _subcommand_ctx(ctx: typer.Context, names: list[str], args: list[str]):
    """A click context for ``ftctl <names> <args>``, child of this invocation's root."""
    import click

    parent = ctx.find_root()
    cmd = parent.command  # the root group (the app this invocation runs)
    for name in names[:-1]:
        cmd = cmd.get_command(parent, name)
        parent = click.Context(cmd, info_name=name, parent=parent)
    leaf = cmd.get_command(parent, names[-1])
    return leaf.make_context(names[-1], list(args), parent=parent)


def _in_image(ctx, names: list[str], args: list[str], gpus, image) -> dict[str, Any]:
    from ftctl.cli.docker_run import check_train_in_docker, rerun_in_docker

    sub = _subcommand_ctx(ctx, names, args)
    used = check_train_in_docker(sub) if names == ["train"] else 0
    code = rerun_in_docker(sub, gpus=gpus, image=image, gpus_used=used, stdout=sys.stderr.buffer)
    if code != 0:
        raise StageFailed(f"`ftctl {' '.join(names)}` in the image exited {code}", code)
    return {"in_image": True}


class _Pipeline:
    """The four stages over one set of settings: each has its work and its plan."""

    def __init__(self, ctx, data: DataConfig, train: TrainConfig, ev: EvalConfig, **opts):
        self.ctx, self.data, self.train_cfg, self.eval = ctx, data, train, ev
        self.deploy_target: tuple[DeployConfig, list] | None = opts["deploy_target"]
        self.docker, self.gpus, self.image = opts["docker"], opts["gpus"], opts["image"]
        self.accept_new = opts["accept_new"]
        self.rep = common.reporter(ctx)
        self.candidate = Path(train.output_path) / "final"

    def stages(self) -> list[Stage]:
        return [
            Stage("generate", self.generate, self.plan_generate),
            Stage("train", self.train, self.plan_train),
            Stage("gate", self.gate, self.plan_gate),
            Stage("deploy", self.deploy if self.deploy_target else None, self.plan_deploy),
        ]

    def _where(self) -> str:
        return (
            f"in the image ({self.image or common.config(self.ctx).image.tag})"
            if self.docker
            else "here"
        )

    # ------------------------------------------------------------------ generate
    def generate(self) -> dict[str, Any]:
        if self.docker:
            args = ["--templates", str(self.data.templates), "--out-dir", str(self.data.out_dir)]
            return _in_image(self.ctx, ["data", "generate"], args, self.gpus, self.image)
        from ftctl.data.generate import write_generated

        made = write_generated(self.data, reporter=self.rep)
        return {"examples": len(made.examples), "paths": [str(p) for p in made.paths]}

    def plan_generate(self) -> dict[str, Any]:
        from ftctl.data.generate import load_templates

        templates = load_templates(self.data.templates)  # read and checked, nothing written
        stem = Path(self.data.out_dir) / self.data.name
        return {
            "templates": str(self.data.templates),
            "intents": len(templates.intents),
            "per_intent": self.data.per_intent,
            "would_write": [
                str(stem.with_suffix(".jsonl")),
                str(stem.with_suffix(".csv")),
                f"{stem}.generated.json",
            ],
            "never_writes": str(self.data.reviewed),
            "where": self._where(),
        }

    # ------------------------------------------------------------------ train
    def train(self) -> dict[str, Any]:
        cfg = self.train_cfg
        if self.docker:
            args = [arg for f in cfg.new_data for arg in ("--new-data", str(f))]
            args += ["--no-reviewed", "--output-path", str(cfg.output_path)]
            if cfg.model_path:
                args += ["--model-path", str(cfg.model_path)]
            if cfg.old_data:
                args += ["--old-data", str(cfg.old_data)]
            return _in_image(self.ctx, ["train"], args, self.gpus, self.image)
        from ftctl.train.finetune import train as run_train

        return run_train(cfg, reporter=self.rep).summary()

    def plan_train(self) -> dict[str, Any]:
        from ftctl.errors import ConfigError
        from ftctl.model.files import check_supported

        cfg = self.train_cfg
        if cfg.model_path is None:
            raise ConfigError(
                "--model-path is required", hint="pass the live model's directory (.../final)"
            )
        check_supported(cfg.model_path)  # config.json, model type, tokenizer: read only
        return {
            "model_path": str(cfg.model_path),
            "new_data": [str(f) for f in cfg.new_data],
            "old_data": str(cfg.old_data) if cfg.old_data else None,
            "would_write": str(self.candidate),
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "replay_ratio": cfg.replay_ratio,
            "freeze_layers": cfg.freeze_layers,
            "where": self._where(),
        }

    # ------------------------------------------------------------------ gate
    def gate(self) -> dict[str, Any]:
        from ftctl.eval.evaluate import run_eval
        from ftctl.eval.gate import check_gate
        from ftctl.eval.report import write_report, write_verdict

        report = run_eval(
            self.candidate, self.eval, baseline_dir=self.train_cfg.model_path, reporter=self.rep
        )
        write_report(report, self.eval.report_dir, reporter=self.rep)
        write_verdict(report, self.eval.report_dir, self.candidate)  # travels with the release
        check_gate(report, self.eval.report_dir)
        return {
            "verdict": report["gate"]["verdict"],
            "accuracy": report["candidate"]["accuracy"],
            "report_dir": str(self.eval.report_dir),
        }

    def plan_gate(self) -> dict[str, Any]:
        from ftctl.errors import DataError

        ev = self.eval
        if not Path(ev.test_data).is_file():
            raise DataError(f"{ev.test_data}: test data not found", hint="check --test-data")
        return {
            "candidate": str(self.candidate),
            "baseline": str(self.train_cfg.model_path),
            "test_data": str(ev.test_data),
            "samples": ev.samples,
            "seed": ev.seed,
            "max_drop": ev.max_drop,
            "alpha": ev.alpha,
            "would_write": str(ev.report_dir),
        }

    # ------------------------------------------------------------------ deploy
    def deploy(self) -> dict[str, Any]:
        from ftctl import deploy as core

        cfg, hosts = self.deploy_target
        connect = ssh.connector(cfg, None, self.accept_new)
        result = core.deploy(self.candidate, cfg, hosts, connect, reporter=self.rep)
        if result.error is not None:
            raise result.error
        return result.to_dict()

    def plan_deploy(self) -> dict[str, Any]:
        cfg, _hosts = self.deploy_target
        return {
            "model": str(self.candidate),
            "hosts": [str(h) for h in cfg.hosts],
            "remote_dir": cfg.remote_dir,
            "go_live": cfg.reload_cmd or cfg.restart_cmd,
            "health": cfg.health_url or cfg.health_cmd or "unchecked",
            "transfer": cfg.transfer,
            "note": "the transfer plan (bytes to send) needs the trained model: "
            "`ftctl deploy --dry-run` after training",
        }


# `ftctl pipeline`'s options, declared once (the command's signature names them)
ModelPathOpt = Annotated[
    Path | None,
    typer.Option("--model-path", help="The live (base) model: fine-tuned, and the baseline."),
]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--templates",
        help="Templates YAML.",
        show_default=common.default_text(DataConfig, "templates"),
    ),
]
OldDataOpt = Annotated[Path | None, typer.Option("--old-data", help="Original data to replay.")]
OutputPathOpt = Annotated[
    Path | None,
    typer.Option(
        "--output-path",
        help="Train output (OUTPUT/final/).",
        show_default=common.default_text(TrainConfig, "output_path"),
    ),
]
TestDataOpt = Annotated[Path | None, typer.Option("--test-data", help="Test pool.")]
ReportDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--report-dir",
        help="Eval report directory ([eval] report_dir, else reports/).",
        show_default=str(DEFAULT_REPORT_DIR),
    ),
]
SkipDeployOpt = Annotated[bool, typer.Option("--skip-deploy", help="Stop after the gate.")]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check the inputs and print every stage's plan; write nothing, train nothing, "
        "connect to nothing.",
    ),
]


def pipeline_cmd(
    ctx: typer.Context,
    model_path: ModelPathOpt = None,
    templates: TemplatesOpt = None,
    old_data: OldDataOpt = None,
    output_path: OutputPathOpt = None,
    test_data: TestDataOpt = None,
    report_dir: ReportDirOpt = None,
    profile: ssh.ProfileOpt = None,
    host: ssh.HostOpt = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    skip_deploy: SkipDeployOpt = False,
    dry_run: DryRunOpt = False,
    docker: common.DockerOpt = False,
    gpus: common.GpusOpt = None,
    image: common.ImageOpt = None,
    json_out: common.JsonOpt = False,
) -> None:
    """generate -> train -> eval gate -> deploy, stopping at the first failing stage.

    Exits with the failing stage's code (3 data, 4 gate, 5/6 deploy, 7 environment) and, with
    --json, prints one document listing every stage. With --docker, generation and training
    run inside the training image. Values not given come from ftctl.toml. --dry-run changes
    nothing: it checks what it can read and prints each stage's plan.

    Example: `ftctl pipeline --model-path live/final --old-data data/original_training_data.jsonl
    --profile production --json`
    """
    conf = common.config(ctx)
    data_cfg, train_cfg, eval_cfg = _settings(
        conf, model_path, templates, old_data, output_path, test_data, report_dir
    )
    deploy_target = None
    if not skip_deploy:
        deploy_target = ssh.target(ctx, profile, host, identity=identity, known_hosts=known_hosts)
    pipeline = _Pipeline(
        ctx, data_cfg, train_cfg, eval_cfg, deploy_target=deploy_target, docker=docker,
        gpus=gpus, image=image, accept_new=accept_new_host_key,
    )  # fmt: skip
    result = run_stages(pipeline.stages(), reporter=pipeline.rep, dry_run=dry_run)
    if json_out:
        common.emit_json(ctx, result.to_dict())
    else:
        _print_stages(result)
    if result.error is not None:
        raise result.error


def _settings(conf: Config, model_path, templates, old_data, output_path, test_data, report_dir):
    """The stages' settings: flags over ftctl.toml; every problem in one error."""
    data_cfg = override(conf.data, templates=templates, format="both")
    train_cfg = override(
        conf.train, model_path=model_path, old_data=old_data, output_path=output_path
    )
    generated = data_cfg.out_dir / f"{data_cfg.name}.jsonl"
    others = [f for f in train_cfg.new_data if Path(f).resolve() != generated.resolve()]
    train_cfg = override(  # what generate writes, [train] new_data, the reviewed data last
        train_cfg, new_data=with_reviewed((generated, *others), data_cfg.reviewed)
    )
    eval_cfg = override(conf.eval, test_data=test_data, report_dir=report_dir)
    eval_cfg = override(eval_cfg, report_dir=eval_cfg.report_dir or DEFAULT_REPORT_DIR)
    check(data_cfg, train_cfg, eval_cfg)
    return data_cfg, train_cfg, eval_cfg


def _print_stages(result: PipelineResult) -> None:
    for s in result.stages:
        color = {"ok": "green", "planned": "cyan", "failed": "red"}.get(s.status, "dim")
        common.out.print(f"[{color}]{s.status:7}[/] {s.name} ({s.seconds}s)")
        if s.status == "planned":
            for key, value in s.detail.items():
                common.out.print(f"          {key}: {value}", markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("pipeline")(pipeline_cmd)
