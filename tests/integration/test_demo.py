"""`ftctl demo`, the README's first command, end to end on this machine: real training, two
real servers (staging and production: each a real sshd and a real supervisor running `ftctl
serve`), the real harvest, import-review, deploy and promote code."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import read_examples
from ftctl.manifest import model_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REMOTE = ("www", "python-services", "models", "classifier")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, repo_root):
    work = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        result = CliRunner().invoke(
            app, ["demo", "--workdir", str(work / "demo"), "--data-dir", "data", "--json"]
        )
    finally:
        os.chdir(cwd)
    yield result, work / "demo"
    shutil.rmtree(work, ignore_errors=True)


def remote(demo, env: str):
    return demo[1].joinpath(env, *REMOTE)


def test_demo_succeeds_and_reports_json(demo):
    result, _ = demo
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["gate"]["verdict"] == "PASS"
    assert doc["transport"] == "ssh"
    assert [s["status"] for s in doc["stages"]] == ["ok"] * 10


def test_base_model_shows_the_seed_confusions_and_the_candidate_fixes_them(demo):
    doc = json.loads(demo[0].stdout)
    for row in doc["pairs"]:
        assert row["errors_before"] >= 5, row  # visibly confused
        assert row["errors_after"] < row["errors_before"] / 2, row  # fixed


def test_harvest_of_production_then_the_reviewers_answers_become_reviewed_data(demo, repo_root):
    from ftctl.demo.run import DemoConfig, users_questions

    doc = json.loads(demo[0].stdout)
    h, review = doc["harvest"], doc["review"]
    assert h["log"].endswith("/logs/predictions.jsonl") and "@127.0.0.1:" in h["log"]  # SSH
    assert str(remote(demo, "production")) in h["log"]
    questions = users_questions(DemoConfig(data_dir=repo_root / "data"))
    shown = len(doc["live"]["production"])  # the showcase asked production too (before)
    assert h["answers"] == len(questions) + shown and 0 < h["rows"] <= 40 and h["top"]
    assert review["filled"] == h["rows"] and review["added"] > 0 and not review["problems"]
    reviewed = demo[1] / "data" / "reviewed.jsonl"
    assert review["target"] == str(reviewed)
    assert len(read_examples(reviewed).examples) == review["added"]
    manifest = json.loads((demo[1] / "incremental" / "final" / "manifest.json").read_text())
    assert manifest["data"]["new_2"]["path"] == str(reviewed)  # trained on it, last


def test_deploy_to_staging_backed_up_the_original_and_swapped_the_link(demo):
    doc = json.loads(demo[0].stdout)
    host = doc["deploy"]["hosts"][0]
    assert host["ok"] and host["backup"].endswith("-original")
    staging = remote(demo, "staging")
    assert (staging / "final").is_symlink()
    assert (staging / "releases" / host["backup"] / "config.json").is_file()
    assert len((staging / "deploys.log").read_text().splitlines()) == 1


def test_promote_took_the_same_release_to_production(demo):
    doc = json.loads(demo[0].stdout)
    release, digest = doc["deploy"]["hosts"][0]["release"], doc["deploy"]["sha256"]
    prom = doc["promote"]
    assert prom["ok"] and (prom["release"], prom["sha256"]) == (release, digest)
    assert prom["gate"]["verdict"] == "PASS"
    production = remote(demo, "production")
    assert str((production / "final").readlink()) == f"releases/{release}"
    assert model_digest(production / "releases" / release) == digest
    (entry,) = [json.loads(x) for x in (production / "deploys.log").read_text().splitlines()]
    assert entry["promoted_from"]["release"] == release and entry["ok"]


def test_both_services_answer_better_after(demo):
    live = json.loads(demo[0].stdout)["live"]
    for env in ("staging", "production"):
        rows = live[env]
        assert rows, f"no live answers shown for {env}"
        assert sum(r["after_ok"] for r in rows) > sum(r["before_ok"] for r in rows), env


def test_report_files_and_the_verdict_are_written(demo):
    report_dir = demo[1] / "reports" / "gate"
    for name in ("report.json", "report.md", "confusion_matrix.png", "per_intent_before_after.png"):
        assert (report_dir / name).is_file(), name
    verdict = json.loads((demo[1] / "incremental" / "final" / "eval_report.json").read_text())
    assert verdict["verdict"] == "PASS"
