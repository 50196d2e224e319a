"""`ftctl demo`, the README's first command, end to end on this machine: real training, a real
sshd, a real supervisor running `ftctl serve`, the real deploy code."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app

pytestmark = pytest.mark.integration


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


def test_demo_succeeds_and_reports_json(demo):
    result, _ = demo
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["gate"]["verdict"] == "PASS"
    assert doc["transport"] == "ssh"


def test_base_model_shows_the_seed_confusions_and_the_candidate_fixes_them(demo):
    doc = json.loads(demo[0].stdout)
    for row in doc["pairs"]:
        assert row["errors_before"] >= 5, row  # visibly confused
        assert row["errors_after"] < row["errors_before"] / 2, row  # fixed


def test_deploy_backed_up_the_original_and_swapped_the_link(demo):
    doc = json.loads(demo[0].stdout)
    host = doc["deploy"]["hosts"][0]
    assert host["ok"] and host["backup"].endswith("-original")
    remote = demo[1] / "server" / "www" / "python-services" / "models" / "classifier"
    assert (remote / "final").is_symlink()
    assert (remote / "releases" / host["backup"] / "config.json").is_file()
    assert len((remote / "deploys.log").read_text().splitlines()) == 1


def test_live_service_answers_better_after_the_deploy(demo):
    live = json.loads(demo[0].stdout)["live"]
    assert live, "no live predictions shown"
    before = sum(r["before_ok"] for r in live)
    after = sum(r["after_ok"] for r in live)
    assert after > before


def test_report_files_are_written(demo):
    report_dir = demo[1] / "reports" / "gate"
    for name in ("report.json", "report.md", "confusion_matrix.png", "per_intent_before_after.png"):
        assert (report_dir / name).is_file(), name


def test_the_demo_ends_with_a_harvest_from_its_own_live_service(demo):
    h = json.loads(demo[0].stdout)["harvest"]
    assert h["log"].endswith("/logs/predictions.jsonl") and "@127.0.0.1:" in h["log"]  # SSH
    assert h["answers"] >= 300 and 0 < h["rows"] <= 40 and h["top"]
    review = demo[1] / "review.csv"
    assert str(review) == h["out"] and review.read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(review.read_text(encoding="utf-8-sig").splitlines()) == h["rows"] + 1
