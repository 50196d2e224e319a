"""ftctl eval without a baseline: the draw, predict, metrics, label errors, the report files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import Example
from ftctl.errors import ExitCode
from ftctl.eval.cases import draw_cases
from ftctl.eval.metrics import model_metrics
from ftctl.model.files import load_classifier
from ftctl.model.inference import predict
from tests.helpers import INTENTS
from tests.unit.evalkit import pool_rows, write_pool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def examples(rows: list[dict]) -> list[Example]:
    return [
        Example(r["text"], r["label"], r.get("id"), "pool.jsonl", i + 1) for i, r in enumerate(rows)
    ]


def test_draw_is_stratified_and_deterministic():
    pool = examples(pool_rows())  # 20 intents x 12
    a, b = draw_cases(pool, 100, seed=12345), draw_cases(pool, 100, seed=12345)
    assert [c.id for c in a.cases] == [c.id for c in b.cases]
    assert set(Counter(c.label for c in a.cases).values()) == {5}
    other = draw_cases(pool, 100, seed=1)
    assert [c.id for c in other.cases] != [c.id for c in a.cases]
    assert not a.whole_pool and a.pool_size == 240


def test_draw_spreads_the_remainder_and_fills_from_larger_intents():
    rows = pool_rows()
    rows = [r for r in rows if r["label"] != "CLOCK_IN" or r["id"].endswith(("-0", "-1"))]
    d = draw_cases(examples(rows), 150, seed=7)  # 150 / 20 = 7.5, CLOCK_IN has only 2
    counts = Counter(c.label for c in d.cases)
    assert len(d.cases) == 150
    assert counts["CLOCK_IN"] == 2
    assert max(counts.values()) - min(v for k, v in counts.items() if k != "CLOCK_IN") <= 1


def test_draw_uses_whole_pool_and_line_ids_without_ids():
    pool = examples(pool_rows(3, ids=False))
    d = draw_cases(pool, 500, seed=12345)
    assert d.whole_pool and len(d.cases) == 60
    assert d.cases[0].id == "line-1" and d.cases[-1].id == "line-60"


def test_metrics_match_sklearn():
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = ["A", "B", "C", "D"]  # D is never true: not in macro-F1, still in the matrix
    y_true = ["A", "A", "A", "B", "B", "C", "C", "C", "C", "A"]
    y_pred = ["A", "B", "A", "B", "A", "C", "D", "C", "B", "A"]
    m = model_metrics(y_true, y_pred, labels, [("A", "B")])
    present = ["A", "B", "C"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    )
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    for i, lab in enumerate(present):
        got = m["per_intent"][lab]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    assert m["confusion"]["matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m["pairs"][0] | {} == {
        "a": "A", "b": "B", "a_as_b": 1, "b_as_a": 1, "cross_errors": 2, "a_support": 4,
        "b_support": 2,
    }  # fmt: skip
    assert m["top_confusions"]["C"] == [
        {"predicted": "B", "count": 1},
        {"predicted": "D", "count": 1},
    ]


def test_predict_keeps_input_order_whatever_the_batching(tiny_model_dir):
    model, tok = load_classifier(tiny_model_dir)
    texts = [r["text"] for r in pool_rows(2)]
    one, s1 = predict(model, tok, texts, batch_size=1, max_length=32, device="cpu")
    many, s7 = predict(model, tok, texts, batch_size=7, max_length=32, device="cpu")
    assert one == many
    assert s1 == pytest.approx(s7, abs=1e-4)
    assert set(one) <= set(INTENTS) and all(0 < s <= 1 for s in s1)


def test_cli_eval_without_baseline_writes_the_report(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", pool_rows(4))
    rep_dir = tmp_path / "rep"
    res = CliRunner().invoke(
        app,
        ["eval", "--model", str(tiny_model_dir), "--test-data", str(pool), "--samples", "40",
         "--report-dir", str(rep_dir), "--json", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["gate"]["verdict"] == "SKIPPED" and doc["baseline"] is None
    assert doc["flips"] is None and doc["comparison"] is None
    assert doc["draw"]["drawn"] == 40 and len(doc["draw"]["case_ids"]) == 40
    for name in ("report.json", "report.md", "confusion_matrix.png", "per_intent_before_after.png"):
        assert (rep_dir / name).is_file()
    assert json.loads((rep_dir / "report.json").read_text())["draw"] == doc["draw"]
    assert (rep_dir / "confusion_matrix.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_says_when_samples_exceed_the_pool(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", pool_rows(2))
    res = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_model_dir), "--test-data", str(pool), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "using the whole pool" in flat(res.output)
    assert "cases: 40 over 20 intents" in flat(res.output)


def test_cli_unknown_test_label_is_a_data_error_naming_file_and_line(tiny_model_dir, tmp_path):
    rows = pool_rows(2)
    rows[2] = {"id": "x", "text": "你好", "label": "SMALL_TALK"}
    pool = write_pool(tmp_path / "pool.jsonl", rows)
    res = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_model_dir), "--test-data", str(pool)]
    )
    assert res.exit_code == ExitCode.DATA
    assert "pool.jsonl:3" in flat(res.output) and "SMALL_TALK" in flat(res.output)
    assert "Traceback" not in res.output


def test_cli_bad_flag_value_is_a_usage_error(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", pool_rows(2))
    res = CliRunner().invoke(
        app,
        ["eval", "--model", str(tiny_model_dir), "--test-data", str(pool), "--alpha", "1.5"],
    )
    assert res.exit_code == ExitCode.USAGE
    assert "eval.alpha" in flat(res.output)


def test_cli_missing_model_dir_is_a_clear_error(tmp_path: Path):
    pool = write_pool(tmp_path / "pool.jsonl", pool_rows(2))
    res = CliRunner().invoke(
        app, ["eval", "--model", str(tmp_path / "nope"), "--test-data", str(pool)]
    )
    assert res.exit_code == ExitCode.ERROR
    assert "model directory not found" in flat(res.output)


def test_report_without_a_cjk_font_warns_and_writes_english_plots(
    tiny_model_dir, tmp_path, monkeypatch
):
    import warnings

    from ftctl.config import EvalConfig
    from ftctl.eval import report as report_mod
    from ftctl.eval.evaluate import run_eval
    from ftctl.progress import NullReporter

    pool = write_pool(tmp_path / "pool.jsonl", pool_rows(1))
    doc = run_eval(
        tiny_model_dir, EvalConfig(test_data=pool, device="cpu"), baseline_dir=tiny_model_dir
    )
    monkeypatch.setattr(report_mod, "find_cjk_font", lambda: None)
    rep = NullReporter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = report_mod.write_report(doc, tmp_path / "rep", reporter=rep)
    assert [p.name for p in paths] == list(report_mod.REPORT_FILES)
    assert any("no CJK font" in w for w in rep.warnings)
    assert not [w for w in caught if "missing from font" in str(w.message)]  # no tofu boxes
