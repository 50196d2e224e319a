"""The loop closed against real parts: `ftctl serve` logs its answers on the "server", `ftctl
harvest` reads them over a real sshd (strict host keys, the deploy options), a reviewer
fills the labels in, `ftctl data import-review` appends them to the training data."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import read_examples
from ftctl.errors import ExitCode
from tests.helpers import INTENTS, write_jsonl
from tests.integration.serve_kit import ServeProcess, copy_model, http

pytestmark = pytest.mark.integration

runner = CliRunner()
UTTERANCES = ["查看在产批次", "帮我打卡", "今天出勤多少人", "发货统计", "原料批次查询",
              "查库存", "设备状态", "帮我打卡", "今天几个人打了卡", "本周发货量"]  # fmt: skip


@pytest.fixture
def served_remote(tmp_path, tiny_model_dir):
    """<remote_dir>/final -> a release, served by a real `ftctl serve` with its default
    prediction log (<remote_dir>/logs/predictions.jsonl), which has answered some users."""
    remote = tmp_path / "srv" / "classifier"
    remote.mkdir(parents=True)
    (remote / "final").symlink_to(copy_model(tiny_model_dir, remote / "releases" / "r1"))
    sp = ServeProcess(tmp_path, remote / "final").start()
    for text in UTTERANCES:
        sp.predict(text)
    code, _ = http(sp.url + "/predict", {"texts": ["生产日报", "冷库温度"]})
    assert code == 200
    yield remote, sp
    sp.stop()


def test_harvest_over_ssh_then_import_the_review(tmp_path, sshd_server, served_remote, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/incremental_training_data.jsonl to leave texts out
    remote, _sp = served_remote
    out = tmp_path / "review.csv"
    ssh = ["--host", sshd_server.host, "--identity", str(sshd_server.client_key),
           "--known-hosts", str(sshd_server.known_hosts), "--remote-dir", str(remote)]  # fmt: skip
    result = runner.invoke(
        app, ["harvest", *ssh, "--out", str(out), "--max-score", "0.99", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["files"] == [f"{sshd_server.host}:{remote}/logs/predictions.jsonl"]
    assert doc["answers"] == len(UTTERANCES) + 2 and doc["distinct"] == len(UTTERANCES) + 1
    assert doc["rows"] == doc["distinct"]  # a random-weight model doubts everything
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8-sig"), newline="")))
    assert {r["text"] for r in rows} == set(UTTERANCES) | {"生产日报", "冷库温度"}
    assert all(r["predicted"] in INTENTS and r["label"] == "" for r in rows)
    assert next(r for r in rows if r["text"] == "帮我打卡")["seen"] == "2"

    # the reviewer labels two rows in Excel and saves
    answers = {"今天几个人打了卡": "ATTENDANCE_TODAY", "帮我打卡": "CLOCK_IN"}
    for r in rows:
        r["label"] = answers.get(r["text"], "")
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    out.write_bytes(buf.getvalue().encode("utf-8-sig"))
    data = write_jsonl(tmp_path / "incremental.jsonl", [("查看在产批次", "PROCESSING_BATCH_LIST")])
    labels = ["--labels", str(remote / "final")]  # the model's labels
    result = runner.invoke(app, ["data", "import-review", str(out), "--to", str(data), *labels])
    assert result.exit_code == 0, result.output
    got = {(e.text, e.label) for e in read_examples(data).examples}
    assert got == {("查看在产批次", "PROCESSING_BATCH_LIST"), *answers.items()}

    # the next harvest leaves out what is now in the data
    again = ["--out", str(tmp_path / "r2.csv"), "--max-score", "0.99", "--exclude", str(data)]
    result = runner.invoke(app, ["harvest", *ssh, *again, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["already_in_data"] == 3


def test_harvest_refuses_an_unknown_host_key(tmp_path, sshd_server, served_remote):
    remote, _sp = served_remote
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = runner.invoke(app, ["harvest", "--host", sshd_server.host, "--identity",
                                 str(sshd_server.client_key), "--known-hosts", str(empty),
                                 "--remote-dir", str(remote)])  # fmt: skip
    assert result.exit_code == ExitCode.ENVIRONMENT
    assert "unknown host key" in result.output


def test_the_demos_harvest_stage_reads_its_own_live_service_over_ssh(tmp_path, tiny_model_dir,
                                                                      repo_root):  # fmt: skip
    """The demo's last stage on the demo's own server (sshd + supervisor + ftctl serve), without
    the hour of training before it (tests/integration/test_demo.py runs the whole demo)."""
    from ftctl.demo.localserver import LocalServer
    from ftctl.demo.run import DemoConfig, _harvest, _traffic, users_questions

    server = LocalServer(tmp_path / "server", tiny_model_dir, ssh=True).start()
    try:
        cfg = DemoConfig(data_dir=repo_root / "data", harvest_limit=10)
        questions = users_questions(cfg)
        _traffic(server, questions)
        known = write_jsonl(tmp_path / "new.jsonl", [(questions[0], "PROCESSING_BATCH_LIST")])
        h = _harvest(cfg, server, [known, tmp_path / "none.jsonl"], tmp_path / "review.csv")
    finally:
        server.close()
    assert h["log"] == f"{server.sshd.host}:{server.remote_dir}/logs/predictions.jsonl"
    assert h["answers"] == len(questions) and 0 < h["rows"] <= 10 and h["top"]
    assert questions[0] not in {row["text"] for row in h["top"]}  # already in the data
    assert (tmp_path / "review.csv").read_bytes().startswith(b"\xef\xbb\xbf")
