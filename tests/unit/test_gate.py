"""The forgetting gate: McNemar maths, and real models that did / did not forget an intent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.errors import ExitCode
from ftctl.evaluate import gate_check, mcnemar_p
from tests.unit.evalkit import edit_head, pool_rows, train_tiny, write_pool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


# report.json keys documented in docs/eval.md
TOP_KEYS = {
    "schema_version", "ftctl_version", "created_utc", "settings", "test_data", "draw",
    "candidate", "baseline", "comparison", "gate", "cases",
}  # fmt: skip
MODEL_KEYS = {
    "path", "weights_sha256", "labels", "n", "correct", "accuracy", "macro_f1", "per_intent",
    "confusion", "top_confusions", "pairs", "seconds", "cases_per_second",
}  # fmt: skip
CHECK_KEYS = {
    "kind", "name", "metric", "n", "before", "after", "worse_by_points", "losses", "gains",
    "p_value", "failed", "over_max_drop",
}  # fmt: skip


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A tiny model trained to know the pool, a copy that forgot CLOCK_IN, one that sends
    CLOCK_IN to ATTENDANCE_TODAY, and the pool itself."""
    root = tmp_path_factory.mktemp("gate")
    rows = pool_rows()
    good = train_tiny(root / "good", rows, tiny_model_dir)
    return {
        "pool": write_pool(root / "pool.jsonl", rows),
        "good": good,
        "forgot": edit_head(good, root / "forgot", forget="LEAVE_REQUEST"),
        "pair": edit_head(good, root / "pair", forget="CLOCK_IN", into="ATTENDANCE_TODAY"),
    }


def run(models, candidate: str, *extra: str):
    args = ["eval", "--model", str(models[candidate]), "--baseline", str(models["good"])]
    args += ["--test-data", str(models["pool"]), "--samples", "200", "--device", "cpu", *extra]
    return CliRunner().invoke(app, args)


# ------------------------------------------------------------------ the statistics


def test_mcnemar_matches_scipy_binomtest():
    from scipy.stats import binomtest

    for losses, gains in ((0, 0), (1, 0), (5, 0), (4, 1), (10, 3), (7, 7), (2, 9)):
        n = losses + gains
        want = binomtest(losses, n, 0.5, alternative="greater").pvalue if n else 1.0
        assert mcnemar_p(losses, gains) == pytest.approx(want)


def test_check_ignores_noise_and_small_drops():
    before = [True] * 25
    after = [True] * 23 + [False] * 2  # -8 points, p = 0.25: not significant
    c = gate_check("intent", "X", "recall", before, after, max_drop=2, alpha=0.05)
    assert c["over_max_drop"] and not c["failed"]
    swapped = [False] + [True] * 24  # 1 lost, 1 gained
    c = gate_check("intent", "X", "recall", [True] * 24 + [False], swapped, max_drop=2, alpha=0.05)
    assert c["worse_by_points"] == 0 and not c["failed"]


def test_check_fails_a_significant_drop_beyond_max_drop_only():
    before, after = [True] * 25, [False] * 6 + [True] * 19  # 6 lost: p = 0.016
    c = gate_check("intent", "X", "recall", before, after, max_drop=2, alpha=0.05)
    assert c["failed"] and c["losses"] == 6 and c["worse_by_points"] == pytest.approx(24)
    lenient = gate_check("intent", "X", "recall", before, after, max_drop=30, alpha=0.05)
    assert not lenient["failed"]


# ------------------------------------------------------------------ real models


def test_gate_passes_a_candidate_identical_to_the_baseline(models):
    res = run(models, "good", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["gate"]["verdict"] == "PASS" and doc["ok"] is True
    assert doc["baseline"]["accuracy"] == 1.0  # the trained baseline really knows the pool
    assert doc["candidate"]["accuracy"] == 1.0
    assert all(not c["failed"] for c in doc["gate"]["checks"])


def test_gate_fails_a_model_that_forgot_an_intent(models):
    res = run(models, "forgot")
    assert res.exit_code == ExitCode.GATE, res.output
    assert "intent LEAVE_REQUEST: recall 100.0% -> 0.0%" in flat(res.output)
    assert "Traceback" not in res.output


def test_gate_fails_a_pair_that_got_worse_and_reports_both_directions(models, tmp_path):
    rep = tmp_path / "rep"
    res = run(models, "pair", "--json", "--report-dir", str(rep))
    assert res.exit_code == ExitCode.GATE
    doc = json.loads(res.stdout)
    failed = {(c["kind"], c["name"]) for c in doc["gate"]["checks"] if c["failed"]}
    assert ("pair", "CLOCK_IN<->ATTENDANCE_TODAY") in failed
    assert ("intent", "CLOCK_IN") in failed
    pair = next(p for p in doc["comparison"]["pairs"] if p["a"] == "CLOCK_IN")
    assert pair["before"]["a_as_b"] == 0 and pair["after"]["a_as_b"] == 10
    assert doc["comparison"]["per_intent"]["CLOCK_IN"]["delta_points"] == pytest.approx(-100)

    # the report: files, documented keys, valid PNGs
    report = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    assert set(report) == TOP_KEYS and report["schema_version"] == 1
    assert set(report["candidate"]) == MODEL_KEYS == set(report["baseline"])
    assert all(set(c) == CHECK_KEYS for c in report["gate"]["checks"])
    assert report["draw"]["case_ids"] == [c["id"] for c in report["cases"]]
    for png in ("confusion_matrix.png", "per_intent_before_after.png"):
        assert (rep / png).read_bytes().startswith(PNG_MAGIC)
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert "**Verdict: FAIL**" in md and "CLOCK_IN ↔ ATTENDANCE_TODAY | 0 → 10" in md


def test_both_models_see_the_same_cases(models):
    doc = json.loads(run(models, "forgot", "--json", "--samples", "60").stdout)
    assert len(doc["cases"]) == 60
    assert all("baseline" in c and "candidate" in c for c in doc["cases"])
    again = json.loads(run(models, "good", "--json", "--samples", "60").stdout)
    assert again["draw"]["case_ids"] == doc["draw"]["case_ids"]


def test_candidate_missing_a_baseline_label_is_an_error(models, tmp_path):
    from tests.helpers import INTENTS, make_tiny_model

    small = make_tiny_model(tmp_path / "small", labels=INTENTS[:-1], hidden=16, layers=1)
    res = CliRunner().invoke(
        app,
        ["eval", "--model", str(small), "--baseline", str(models["good"]),
         "--test-data", str(models["pool"])],
    )  # fmt: skip
    assert res.exit_code == ExitCode.ERROR
    assert "lacks 1 of the baseline's labels: SCHEDULE_QUERY" in flat(res.output)


def test_plots_render_chinese_without_missing_glyphs(models):
    import warnings

    from ftctl.report import before_after_png, confusion_png, find_cjk_font

    font = find_cjk_font()
    assert font is not None, "install fonts-noto-cjk (CI does)"
    doc = json.loads(run(models, "pair", "--json", "--samples", "40").stdout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert confusion_png(doc, font).startswith(PNG_MAGIC)
        assert before_after_png(doc, font).startswith(PNG_MAGIC)
    assert not [w for w in caught if "missing from font" in str(w.message)]
