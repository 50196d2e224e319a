"""ftctl pipeline: stages in order, stop at the first failure with its exit code."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.errors import ExitCode, GateFailed, StageFailed
from ftctl.pipeline import Stage, Stages, run_stages

runner = CliRunner()


def test_stages_run_in_order_and_record_details():
    calls = []
    result = run_stages(
        [Stage("a", lambda: calls.append("a") or {"n": 1}), Stage("b", lambda: calls.append("b"))]
    )
    assert calls == ["a", "b"]
    assert result.exit_code == 0
    assert [(s.name, s.status) for s in result.stages] == [("a", "ok"), ("b", "ok")]
    assert result.stages[0].detail == {"n": 1}


def test_first_failure_stops_and_keeps_its_exit_code():
    def gate():
        raise GateFailed("worse")

    calls = []
    result = run_stages(
        [Stage("train", dict), Stage("gate", gate), Stage("deploy", lambda: calls.append(1))]
    )
    assert calls == []
    assert result.exit_code == ExitCode.GATE
    assert [s.status for s in result.stages] == ["ok", "failed", "skipped"]
    doc = result.to_dict()
    assert doc["failed_stage"] == "gate" and doc["ok"] is False
    assert doc["stages"][1]["error"]["error"] == "GateFailed"


def test_a_stage_in_another_process_passes_its_exit_code_on():
    def in_image():
        raise StageFailed("train in the image exited 3", 3)

    assert run_stages([Stage("train", in_image)]).exit_code == 3


def test_skipped_stage_is_recorded():
    result = run_stages([Stage("gate", dict), Stage("deploy", None)])
    assert [s.status for s in result.stages] == ["ok", "skipped"]
    assert result.exit_code == 0


def test_a_dry_run_runs_each_stages_plan_and_none_of_its_work():
    work = []
    result = run_stages(
        [
            Stage("train", lambda: work.append("train"), lambda: {"would_write": "out"}),
            Stage("deploy", lambda: work.append("deploy"), lambda: {"hosts": ["h"]}),
        ],
        dry_run=True,
    )
    assert work == []
    assert [(s.status, s.detail) for s in result.stages] == [
        ("planned", {"would_write": "out"}),
        ("planned", {"hosts": ["h"]}),
    ]
    assert result.to_dict()["dry_run"] is True


def test_the_stage_timer_numbers_stages_and_records_failures():
    seen = []

    class Rec:
        def stage(self, name):
            seen.append(name)

    st = Stages("demo", 2, Rec())
    with st.run("first") as rec:
        rec.detail = {"x": 1}
    try:
        with st.run("second"):
            raise GateFailed("worse")
    except GateFailed:
        pass
    assert seen == ["demo 1/2: first", "demo 2/2: second"]
    assert [(r.name, r.status) for r in st.results] == [("first", "ok"), ("second", "failed")]
    assert st.results[1].error["exit_code"] == ExitCode.GATE
    assert all(r.seconds >= 0 for r in st.results)


def test_cli_stops_at_generate_on_bad_templates_with_exit_3(tmp_path, tiny_model_dir):
    bad = tmp_path / "t.yaml"
    bad.write_text("intents:\n  CLOCK_IN: 12\n", encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "pipeline",
            "--templates",
            str(bad),
            "--model-path",
            str(tiny_model_dir),
            "--output-path",
            str(tmp_path / "out"),
            "--skip-deploy",
            "--json",
        ],
    )
    assert result.exit_code == ExitCode.DATA, result.output
    doc = json.loads(result.stdout)
    assert doc["failed_stage"] == "generate"
    assert [s["status"] for s in doc["stages"]] == ["failed", "skipped", "skipped", "skipped"]
    assert not (tmp_path / "out").exists()


def test_cli_without_deploy_target_is_a_usage_error(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["pipeline", "--model-path", str(tiny_model_dir)])
    assert result.exit_code == ExitCode.USAGE
    assert "no host to deploy to" in result.output


def test_cli_runs_every_stage_on_the_host_with_values_from_ftctl_toml(
    tmp_path, tiny_model_dir, repo_root
):
    cfg = tmp_path / "ftctl.toml"
    cfg.write_text(
        f"""
[data]
templates = "{repo_root / "data" / "incremental_samples.yaml"}"
out_dir = "{tmp_path / "data"}"
per_intent = 10

[train]
output_path = "{tmp_path / "out"}"
epochs = 1
lr = 1e-12

[eval]
test_data = "{repo_root / "data" / "test_cases.jsonl"}"
samples = 40
report_dir = "{tmp_path / "rep"}"
""",
        encoding="utf-8",
    )
    result = runner.invoke(
        app,
        [
            "--config",
            str(cfg),
            "pipeline",
            "--model-path",
            str(tiny_model_dir),
            "--skip-deploy",
            "--json",
        ],
    )
    doc = json.loads(result.stdout)
    assert result.exit_code == doc["exit_code"]
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["generate"]["status"] == "ok"
    assert stages["generate"]["detail"]["examples"] == 100  # 10 intents x per_intent 10
    assert stages["train"]["status"] == "ok"
    assert (tmp_path / "out" / "final" / "manifest.json").is_file()
    # lr 1e-12 leaves the candidate the base model: the same answer on every case, so PASS
    assert stages["gate"]["status"] == "ok" and stages["gate"]["detail"]["verdict"] == "PASS"
    report = json.loads((tmp_path / "rep" / "report.json").read_text())  # [eval] report_dir
    assert {c["change"] for c in report["gate"]["checks"]} == {"unchanged"}
    assert stages["deploy"]["status"] == "skipped"
    assert result.exit_code == ExitCode.OK
