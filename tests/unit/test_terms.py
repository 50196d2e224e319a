"""The seed's words beside the English where ftctl's output names a concept of the seed
document (ftctl/terms.py): report headings, the gate's hint, train's and deploy's messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli import common
from ftctl.cli.main import app
from ftctl.errors import ExitCode
from ftctl.terms import SEED_WORDS, seed_term
from tests.helpers import write_jsonl
from tests.unit.evalkit import edit_head, pool_rows, train_tiny, write_pool

ROOT = Path(__file__).resolve().parents[2]


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_seed_term_puts_the_seeds_words_before_the_english():
    assert seed_term("confused pairs") == "混淆对 (confused pairs)"
    assert seed_term("backup") == "备份原模型 (backup)"
    with pytest.raises(KeyError):
        seed_term("no such concept")


def test_every_seed_word_is_used_in_ftctls_output():
    """No dead entry: each concept is named through seed_term somewhere in the package."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "ftctl").rglob("*.py"))
    used = set(re.findall(r"seed_term\(['\"]([^'\"]+)['\"]\)", source))
    assert used == set(SEED_WORDS)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A tiny model that knows the pool, and a copy that sends CLOCK_IN to ATTENDANCE_TODAY."""
    root = tmp_path_factory.mktemp("terms")
    rows = pool_rows()
    good = train_tiny(root / "good", rows, tiny_model_dir)
    pair = edit_head(good, root / "pair", forget="CLOCK_IN", into="ATTENDANCE_TODAY")
    return {"pool": write_pool(root / "pool.jsonl", rows), "good": good, "pair": pair}


def test_the_eval_report_and_the_gate_hint_carry_the_seeds_words(models, tmp_path):
    rep = tmp_path / "rep"
    args = ["eval", "--model-path", str(models["pair"]), "--baseline", str(models["good"])]
    args += ["--test-data", str(models["pool"]), "--samples", "200", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--report-dir", str(rep)])
    assert res.exit_code == ExitCode.GATE, res.output
    assert "the seed's FAQ on 其他意图准确率下降 (other intents dropped): raise " in flat(
        res.output
    )
    assert "--replay-ratio (0.7-0.8)" in flat(res.output)
    md = (rep / "report.md").read_text(encoding="utf-8").splitlines()
    assert "## 问题意图 (target pairs)" in md
    assert "## 混淆对 (confused pairs)" in md
    table = md.index("## 混淆对 (confused pairs)")
    assert md[table + 2] == "| pair | A→B | B→A |"


def test_train_messages_carry_the_seeds_words(
    tmp_path, tiny_model_dir, monkeypatch, one_torch_thread
):
    """New data only (the seed's basic usage), and an LR too small to move the weights: the
    warning names 保留旧数据, early stopping fires after epoch 1, the summary names 数据回放 and
    冻结早期层."""
    monkeypatch.setattr(common.err, "width", 400)
    monkeypatch.setattr(common.out, "width", 400)
    rows = [(r["text"], r["label"]) for r in pool_rows()]
    new = write_jsonl(tmp_path / "new.jsonl", rows)
    args = ["train", "--new-data", str(new), "--model-path", str(tiny_model_dir)]
    args += ["--output-path", str(tmp_path / "out"), "--epochs", "3", "--patience", "1"]
    res = CliRunner().invoke(app, [*args, "--lr", "1e-30", "--device", "cpu", "--seed", "1"])
    assert res.exit_code == 0, res.output
    out = flat(res.output)
    assert "forgetting protection is reduced (the seed's 保留旧数据 (keep old data): pass" in out
    assert "早停 (early stopping): no improvement for 1 epoch(s)" in out
    assert "数据回放 (replay) 0 rows, 冻结早期层 (frozen layers) 8," in out


def test_a_first_deploys_backup_line_carries_the_seeds_words():
    from ftctl.cli.deploy import _finish
    from ftctl.deploy.results import DeployResult, HostResult

    host = HostResult(
        host="root@47.100.235.168",
        action="deploy",
        ok=True,
        release="20261201080000-1a2b3c4d",
        backup="20261201080000-original",
        method="rsync",
        health="healthy",
    )
    result = DeployResult(action="deploy", model="models/incremental/final", sha256="x", id="d1")
    result.hosts.append(host)
    with common.out.capture() as captured:
        _finish(None, result, as_json=False)
    lines = captured.get().splitlines()
    assert "  备份原模型 (backup): original model kept as releases/20261201080000-original" in lines
