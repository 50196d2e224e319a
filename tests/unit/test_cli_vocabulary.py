"""One vocabulary across the CLI (issue 14): --model-path everywhere, --templates vs --samples,
--json beside the human log, pipeline --dry-run, help defaults from the code's constants,
explicit bad values refused, demo --workdir guarded, ftctl.toml paths relative to the file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from ftctl.cli.common import default_text
from ftctl.cli.main import app
from ftctl.config import (
    DataConfig,
    DeployConfig,
    EvalConfig,
    HarvestConfig,
    ServeConfig,
    TrainConfig,
    load_config,
)
from ftctl.demo.run import WORKDIR_MARK, DemoConfig, prepare_workdir
from ftctl.errors import ConfigError, ExitCode
from ftctl.train.base import BaseConfig

runner = CliRunner()
TEMPLATES = {"intents": {"CLOCK_IN": ["帮我打卡", "我要签到", "上班打卡"]}}


def commands() -> dict[str, click.Command]:
    """Every leaf command of the app by its full name ("data generate")."""
    found: dict[str, click.Command] = {}

    def walk(cmd: click.Command, prefix: str) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            found[prefix] = cmd

    walk(typer.main.get_command(app), "")
    return found


def option_names(cmd: click.Command) -> set[str]:
    return {name for p in cmd.params for name in (*p.opts, *p.secondary_opts)}


def write_templates(path: Path) -> Path:
    path.write_text(yaml.safe_dump(TEMPLATES, allow_unicode=True), "utf-8")
    return path


# ------------------------------------------------------------------ one name per thing


@pytest.mark.parametrize(
    ("command", "old_names"),
    [
        ("train", []),
        ("eval", ["--model"]),
        ("deploy", ["--model", "-m"]),
        ("serve", ["--model-dir"]),
        ("pipeline", []),
    ],
)
def test_every_command_taking_a_model_directory_accepts_model_path(command, old_names):
    names = option_names(commands()[command])
    assert "--model-path" in names
    assert set(old_names) <= names  # the old names stay as aliases


def test_a_templates_file_is_templates_and_a_case_count_is_samples():
    cmds = commands()
    assert "--templates" in option_names(cmds["data generate"])
    assert "--templates" in option_names(cmds["pipeline"])
    samples = next(p for p in cmds["eval"].params if "--samples" in p.opts)
    assert samples.type.name == "integer"
    # data generate's old --samples is hidden from --help
    old = next(p for p in cmds["data generate"].params if "--samples" in p.opts)
    assert old.hidden


def test_generate_takes_templates_and_the_old_flag_with_a_warning(tmp_path):
    tpl = write_templates(tmp_path / "t.yaml")
    base = ["data", "generate", "--out-dir", str(tmp_path / "o"), "--per-intent", "2", "--json"]
    new = runner.invoke(app, [*base, "--templates", str(tpl)])
    assert new.exit_code == 0, new.output
    assert json.loads(new.stdout)["templates"] == str(tpl)
    assert "is now" not in new.stderr
    old = runner.invoke(app, [*base, "--samples", str(tpl)])
    assert old.exit_code == 0, old.output
    assert json.loads(old.stdout)["counts"] == {"CLOCK_IN": 2}
    assert "data generate --samples is now --templates" in old.stderr


def test_old_toml_keys_are_read_under_their_new_names_with_a_note(tmp_path):
    cfg = tmp_path / "ftctl.toml"
    cfg.write_text('[data]\nsamples = "t.yaml"\n[serve]\nmodel_dir = "live/final"\n', "utf-8")
    conf = load_config(cfg)
    assert conf.data.templates == tmp_path / "t.yaml"
    assert conf.serve.model_path == tmp_path / "live" / "final"
    assert conf.notes == (
        "[data] samples is now templates: rename it (read as templates)",
        "[serve] model_dir is now model_path: rename it (read as model_path)",
    )


def test_the_cli_prints_the_deprecation_note_of_an_old_key(tmp_path):
    tpl = write_templates(tmp_path / "t.yaml")
    cfg = tmp_path / "ftctl.toml"
    cfg.write_text(f'[data]\nsamples = "{tpl}"\nout_dir = "{tmp_path / "o"}"\n', "utf-8")
    res = runner.invoke(app, ["--config", str(cfg), "data", "generate", "--per-intent", "2"])
    assert res.exit_code == 0, res.output
    assert "[data] samples is now templates" in res.stderr


# ------------------------------------------------------------------ ftctl.toml paths


def test_relative_paths_in_ftctl_toml_are_relative_to_the_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    write_templates(project / "t.yaml")
    cfg = project / "ftctl.toml"
    cfg.write_text(
        '[data]\ntemplates = "t.yaml"\nout_dir = "gen"\n'
        '[train]\nmodel_path = "models/live"\n'
        '[image]\ndockerfile = "docker/Dockerfile"\n'
        '[deploy.prod]\nhosts = ["root@h"]\nidentity = "~/.ssh/id_deploy"\n'
        'remote_dir = "/srv/models"\n',
        "utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    conf = load_config(cfg)
    assert conf.data.templates == project / "t.yaml"
    assert conf.train.model_path == project / "models" / "live"
    assert conf.image.dockerfile == Path("docker/Dockerfile")  # relative to the build context
    assert conf.deploy["prod"].identity == Path("~/.ssh/id_deploy").expanduser()
    assert conf.deploy["prod"].remote_dir == "/srv/models"  # a server path: a string
    # and the command reads them from there
    res = runner.invoke(
        app, ["--config", str(cfg), "data", "generate", "--per-intent", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["paths"][0] == str(project / "gen" / (DataConfig.name + ".jsonl"))
    assert not (elsewhere / "gen").exists()


def test_a_toml_beside_the_working_directory_keeps_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ftctl.toml").write_text('[data]\nout_dir = "gen"\n', "utf-8")
    assert load_config(Path("ftctl.toml")).data.out_dir == Path("gen")


# ------------------------------------------------------------------ --json and --quiet


def test_json_is_one_document_on_stdout_and_the_human_log_stays_on_stderr(tmp_path):
    tpl = write_templates(tmp_path / "t.yaml")
    args = ["data", "generate", "--templates", str(tpl), "--out-dir", str(tmp_path / "o")]
    res = runner.invoke(app, [*args, "--per-intent", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"] is True  # the whole of stdout is one document
    assert "generating: 1/1 intents" in res.stderr
    quiet = runner.invoke(app, ["--quiet", *args, "--per-intent", "2", "--json"])
    assert quiet.exit_code == 0, quiet.output
    assert json.loads(quiet.stdout)["ok"] is True
    assert quiet.stderr == ""


def test_an_error_after_a_json_document_adds_no_second_document(tmp_path):
    """eval --json prints its report, then the gate's exit code; here: a bad flag value gives
    exactly one error document."""
    res = runner.invoke(app, ["train", "--lr", "0", "--json"])
    assert res.exit_code == ExitCode.USAGE
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["error"] == "ConfigError"
    assert "train.lr" in doc["message"]
    assert "error:" in res.stderr


# ------------------------------------------------------------------ bad values, help defaults


def test_an_explicit_lr_0_is_an_error_not_the_default(tmp_path):
    train = runner.invoke(app, ["train", "--lr", "0", "--new-data", "x", "--model-path", "y"])
    assert train.exit_code == ExitCode.USAGE
    assert "[train.lr]: must be > 0" in train.stderr
    demo = runner.invoke(app, ["demo", "--lr", "0", "--workdir", str(tmp_path / "d")])
    assert demo.exit_code == ExitCode.USAGE
    assert "[demo.lr]: must be > 0" in demo.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made


CONFIG_OF = {
    "train": TrainConfig,
    "base": BaseConfig,
    "eval": EvalConfig,
    "data generate": DataConfig,
    "data validate": DataConfig,
    "data convert": DataConfig,
    "data import-review": DataConfig,
    "serve": ServeConfig,
    "harvest": HarvestConfig,
    "deploy": DeployConfig,
    "rollback": DeployConfig,
    "demo": DemoConfig,
}


def test_help_defaults_are_the_defaults_the_code_uses():
    checked = 0
    for name, cmd in commands().items():
        cls = CONFIG_OF.get(name)
        fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
        for p in cmd.params:
            field = p.name if p.name != "model_dir" else "model_path"
            shown = isinstance(p.show_default, str) and p.show_default[:1] != "-"
            # a field whose default is None: the help says what None means (a fallback)
            if field in fields and shown and default_text(cls, field) != "none":
                assert p.show_default == default_text(cls, field), (name, p.opts)
                checked += 1
    assert checked >= 40


def test_demo_help_shows_the_demos_own_lr_and_epochs():
    res = runner.invoke(app, ["demo", "--help"], terminal_width=200)
    assert f"[default: ({DemoConfig.lr:g})]" in res.stdout
    assert f"[default: ({DemoConfig.epochs})]" in res.stdout


# ------------------------------------------------------------------ demo --workdir


def test_demo_refuses_a_non_empty_workdir_it_did_not_make(tmp_path):
    models = tmp_path / "models"
    (models / "precious").mkdir(parents=True)
    (models / "precious" / "model.safetensors").write_bytes(b"weights")
    res = runner.invoke(app, ["demo", "--workdir", str(models)])
    assert res.exit_code == ExitCode.USAGE
    assert "not a directory the demo made" in res.stderr and "--force" in res.stderr
    assert (models / "precious" / "model.safetensors").read_bytes() == b"weights"


def test_demo_workdir_is_emptied_when_it_is_the_demos_or_with_force(tmp_path):
    work = tmp_path / "w"
    made = prepare_workdir(DemoConfig(workdir=work))  # new: made and marked
    assert (made / WORKDIR_MARK).is_file()
    (made / "old-run.txt").write_text("x")
    prepare_workdir(DemoConfig(workdir=work))  # the demo's own: emptied
    assert sorted(p.name for p in work.iterdir()) == [WORKDIR_MARK]
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    with pytest.raises(ConfigError):
        prepare_workdir(DemoConfig(workdir=other))
    prepare_workdir(DemoConfig(workdir=other, force=True))
    assert sorted(p.name for p in other.iterdir()) == [WORKDIR_MARK]


# ------------------------------------------------------------------ pipeline --dry-run


def test_pipeline_dry_run_changes_nothing_and_plans_every_stage(
    tmp_path, tiny_model_dir, repo_root, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    res = runner.invoke(
        app,
        [
            "pipeline", "--dry-run", "--json",
            "--model-path", str(tiny_model_dir),
            "--templates", str(repo_root / "data" / "incremental_samples.yaml"),
            "--test-data", str(repo_root / "data" / "test_cases.jsonl"),
            "--host", "root@192.0.2.1:2222",  # TEST-NET: never contacted
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["dry_run"] is True
    assert [(s["name"], s["status"]) for s in doc["stages"]] == [
        ("generate", "planned"),
        ("train", "planned"),
        ("gate", "planned"),
        ("deploy", "planned"),
    ]
    plan = {s["name"]: s["detail"] for s in doc["stages"]}
    assert plan["generate"]["intents"] == 10
    assert plan["train"]["would_write"] == str(Path(TrainConfig.output_path) / "final")
    assert plan["gate"]["samples"] == EvalConfig.samples
    assert plan["deploy"]["hosts"] == ["root@192.0.2.1:2222"]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_pipeline_dry_run_stops_at_a_stage_whose_inputs_are_bad(tmp_path, repo_root):
    res = runner.invoke(
        app,
        ["pipeline", "--dry-run", "--skip-deploy", "--model-path", str(tmp_path / "none"),
         "--templates", str(repo_root / "data" / "incremental_samples.yaml")],
    )  # fmt: skip
    assert res.exit_code != 0
    assert "planned" in res.stdout and "failed" in res.stdout  # generate planned, train failed
    assert str(tmp_path / "none") in res.stderr
