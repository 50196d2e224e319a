"""The forgetting gate: McNemar maths, and real models that did / did not forget an intent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.errors import ExitCode
from ftctl.eval.gate import gate_check, mcnemar_p
from tests.unit.evalkit import edit_head, pool_rows, train_tiny, write_pool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


# report.json keys documented in docs/eval.md
TOP_KEYS = {
    "schema_version", "ftctl_version", "created_utc", "settings", "test_data", "draw",
    "leakage", "candidate", "baseline", "comparison", "gate", "flips", "cases",
}  # fmt: skip
MODEL_KEYS = {
    "path", "weights_sha256", "labels", "n", "correct", "accuracy", "macro_f1", "per_intent",
    "confusion", "top_confusions", "pairs", "seconds", "cases_per_second",
}  # fmt: skip
CHECK_KEYS = {
    "kind", "name", "metric", "n", "before", "after", "worse_by_points", "losses", "gains",
    "p_value", "p_value_gain", "change", "significant", "verdict", "failed", "over_max_drop",
}  # fmt: skip
PAIR_KEYS = {
    "a", "b", "before", "after", "change", "significant", "fixed", "broken", "p_value",
    "p_value_gain", "verdict",
}  # fmt: skip
FLIP_KEYS = {
    "id", "text", "label", "baseline", "baseline_score", "candidate", "candidate_score",
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


def run(models, candidate: str, *extra: str, baseline: str = "good"):
    args = ["eval", "--model", str(models[candidate]), "--baseline", str(models[baseline])]
    args += ["--test-data", str(models["pool"]), "--samples", "200", "--device", "cpu", *extra]
    return CliRunner().invoke(app, args)


# ------------------------------------------------------------------ the statistics


def test_mcnemar_is_scipys_exact_binomial_test():
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
    assert set(report) == TOP_KEYS and report["schema_version"] == 2
    assert set(report["candidate"]) == MODEL_KEYS == set(report["baseline"])
    assert all(set(c) == CHECK_KEYS for c in report["gate"]["checks"])
    assert all(set(p) == PAIR_KEYS for p in report["comparison"]["pairs"])
    assert all(set(f) == FLIP_KEYS for f in report["flips"]["lost"])
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

    from ftctl.eval.plots import before_after_png, confusion_png, find_cjk_font

    font = find_cjk_font()
    assert font is not None, "install fonts-noto-cjk (CI does)"
    doc = json.loads(run(models, "pair", "--json", "--samples", "40").stdout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert confusion_png(doc, font).startswith(PNG_MAGIC)
        assert before_after_png(doc, font).startswith(PNG_MAGIC)
    assert not [w for w in caught if "missing from font" in str(w.message)]


# ------------------------------------------------------------------ what a reviewer reads first


def test_report_lists_every_check_the_flipped_cases_and_a_verdict_per_pair(models, tmp_path):
    rep = tmp_path / "rep"
    res = run(models, "pair", "--json", "--report-dir", str(rep))
    assert res.exit_code == ExitCode.GATE
    doc = json.loads((rep / "report.json").read_text(encoding="utf-8"))

    # flipped cases: the CLOCK_IN cases the candidate now sends to ATTENDANCE_TODAY (whose head
    # row it took over, so ATTENDANCE_TODAY's own cases are lost too)
    lost, gained = doc["flips"]["lost"], doc["flips"]["gained"]
    assert gained == [] and len(lost) == 20
    clock = [f for f in lost if f["label"] == "CLOCK_IN"]
    assert len(clock) == 10
    assert {(f["baseline"], f["candidate"]) for f in clock} == {("CLOCK_IN", "ATTENDANCE_TODAY")}
    assert {f["label"] for f in lost} == {"CLOCK_IN", "ATTENDANCE_TODAY"}
    by_id = {c["id"]: c for c in doc["cases"]}
    assert all(by_id[f["id"]]["text"] == f["text"] for f in lost)

    # a verdict per target pair, with its numbers
    pairs = {(p["a"], p["b"]): p for p in doc["comparison"]["pairs"]}
    bad = pairs[("CLOCK_IN", "ATTENDANCE_TODAY")]
    assert (bad["change"], bad["significant"], bad["broken"], bad["fixed"]) == (
        "worse",
        True,
        10,
        0,
    )
    assert bad["verdict"] == "FAIL (worse, significant)" and bad["p_value"] < 0.01
    same = pairs[("PROCESSING_BATCH_LIST", "MATERIAL_BATCH_QUERY")]
    assert (same["change"], same["verdict"], same["p_value"]) == ("unchanged", "unchanged", 1.0)

    md = (rep / "report.md").read_text(encoding="utf-8")
    assert (
        "- **CLOCK_IN ↔ ATTENDANCE_TODAY: FAIL (worse, significant)**: cross errors 0 → 10 "
        "(0 fixed, 10 new;" in md
    )
    assert "- **PROCESSING_BATCH_LIST ↔ MATERIAL_BATCH_QUERY: unchanged**" in md
    assert "## Checks" in md and "| p (worse) | p (better) | verdict |" in md
    check = next(c for c in doc["gate"]["checks"] if c["name"] == "CLOCK_IN")
    assert (
        f"| intent CLOCK_IN | recall | {check['n']} | 100.0% | 0.0% | -100.0 | 10 | 0 | "
        f"{check['p_value']:.3g} | 1 | FAIL (worse, significant) |"
    ) in md
    assert "### Right before, wrong now (20)" in md and "### Wrong before, right now (0)" in md
    first = clock[0]
    assert (
        f"| {first['id']} | {first['text']} | CLOCK_IN | CLOCK_IN | {first['baseline_score']:.3f} "
        f"| ATTENDANCE_TODAY | {first['candidate_score']:.3f} |"
    ) in md


def test_an_improved_pair_is_called_improved_and_significant(models, tmp_path):
    rep = tmp_path / "rep"
    res = run(models, "good", "--json", "--report-dir", str(rep), baseline="pair")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    pair = next(p for p in doc["comparison"]["pairs"] if p["a"] == "CLOCK_IN")
    assert (pair["change"], pair["significant"], pair["fixed"]) == ("improved", True, 10)
    assert pair["verdict"] == "improved (significant)" and pair["p_value_gain"] < 0.01
    assert len(doc["flips"]["gained"]) == 20 and doc["flips"]["lost"] == []
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert "- **CLOCK_IN ↔ ATTENDANCE_TODAY: improved (significant)**: cross errors 10 → 0" in md
    assert "pair CLOCK_IN <-> ATTENDANCE_TODAY: A->B 10 -> 0, B->A 0 -> 0: improved" in flat(
        run(models, "good", baseline="pair").output
    )


def test_pairs_naming_labels_the_model_lacks_are_an_error(models, tmp_path):
    toml = tmp_path / "ftctl.toml"
    toml.write_text(
        '[eval]\npairs = [["CLOCK_IN", "CLOCK_IN_V2"], ["REFUND", "ORDER_QUERY"]]\n',
        encoding="utf-8",
    )
    args = ["-c", str(toml), "eval", "--model", str(models["good"]), "--baseline",
            str(models["good"]), "--test-data", str(models["pool"]), "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == ExitCode.USAGE, res.output
    out = flat(res.output)
    assert "does not have: CLOCK_IN_V2, REFUND" in out
    assert "CLOCK_IN<->CLOCK_IN_V2" in out and "pairs = []" in out
    toml.write_text("[eval]\npairs = []\n", encoding="utf-8")
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["comparison"]["pairs"] == []


def _with_manifest(src: Path, dst: Path, data: dict) -> Path:
    import shutil

    from ftctl.manifest import write_manifest

    shutil.copytree(src, dst)
    write_manifest(dst, {"kind": "incremental", "data": data})
    return dst


def test_test_cases_in_the_training_data_are_a_warning_or_with_strict_an_error(models, tmp_path):
    from ftctl.fsutil import sha256_file
    from tests.unit.evalkit import pool_rows

    pool = pool_rows()
    leaked = [pool[0], pool[13], pool[26]]
    train_file = tmp_path / "new.jsonl"
    train_file.write_text(
        "".join(
            json.dumps({"text": f" {r['text']} ", "label": r["label"]}, ensure_ascii=False) + "\n"
            for r in leaked
        )
        + json.dumps({"text": "别的句子", "label": "CLOCK_IN"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    cand = _with_manifest(
        models["good"], tmp_path / "cand",
        {"new": {"path": str(train_file), "sha256": sha256_file(train_file)},
         "old": {"path": str(tmp_path / "gone.jsonl"), "sha256": "0" * 64}},
    )  # fmt: skip
    models = {**models, "cand": cand}
    rep = tmp_path / "rep"
    res = run(models, "cand", "--samples", "500", "--report-dir", str(rep))
    assert res.exit_code == 0, res.output
    out = flat(res.output)
    want = f"3 of the 240 test cases also appear in the candidate's training data ({train_file}: 3)"
    assert want in out
    assert f"'{leaked[0]['text']}' ({leaked[0]['label']}, {train_file}:1)" in out
    assert f"{tmp_path / 'gone.jsonl'} (old data in the candidate's manifest) is missing" in out
    doc = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    leaks = doc["leakage"]
    assert leaks["checked"] and leaks["n"] == 3 and leaks["of"] == 240
    assert [s["status"] for s in leaks["sources"]] == ["checked", "missing"]
    assert {c["id"] for c in leaks["cases"]} == {r["id"] for r in leaked}
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert "3 of 240 test cases appear in" in md

    strict = run(models, "cand", "--samples", "500", "--strict")
    assert strict.exit_code == ExitCode.DATA
    assert "3 of the 240 test cases" in flat(strict.output) and "Traceback" not in strict.output


def test_a_model_without_a_manifest_is_not_checked_for_leakage(models):
    doc = json.loads(run(models, "good", "--json", "--samples", "40").stdout)
    assert doc["leakage"]["checked"] is False and "no manifest.json" in doc["leakage"]["reason"]
