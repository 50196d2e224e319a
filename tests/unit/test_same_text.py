"""One notion of "the same text" (ftctl.data.textkey.text_key): a pair the model's tokenizer cannot
tell apart (case and full width: 'WiFi连不上' and 'ｗｉｆｉ连不上') is one text in generate,
validate, convert, reconcile (train), harvest, import-review and eval's leakage check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import SEED_PAIRS, HarvestConfig
from ftctl.data.examples import Example, read_examples
from ftctl.data.generate import generate, parse_templates
from ftctl.data.harvest import LocalFiles, harvest
from ftctl.data.reconcile import reconcile
from ftctl.data.review import import_review
from ftctl.data.textkey import text_key, text_keys
from ftctl.errors import DataError, ExitCode
from ftctl.manifest import write_manifest
from ftctl.model.files import load_tokenizer
from tests.helpers import write_jsonl
from tests.unit.test_reviewed import review_file

runner = CliRunner()
A, B = "WiFi连不上", "ｗｉｆｉ连不上"  # differ in case and width; one input to the model


@pytest.fixture(scope="module")
def lowercasing_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with chinese-roberta-wwm-ext's tokenizer setting: lowercasing."""
    out = tmp_path_factory.mktemp("lower") / "final"
    shutil.copytree(tiny_model_dir, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = True
    (out / "tokenizer.json").write_text(json.dumps(tok))
    conf = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(conf | {"do_lower_case": True}))
    return out


def test_the_key_with_and_without_the_tokenizer(lowercasing_model, tiny_model_dir):
    lower = load_tokenizer(lowercasing_model)
    assert text_key(A) == text_key(B) == "wifi连不上"
    assert text_key(A, lower) == text_key(B, lower)
    assert text_key("查看 在产批次", lower) == text_key("查看在产批次", lower)  # BERT splits CJK
    assert text_key(A, lower) != text_key("WiFi连得上", lower)
    # a tokenizer that keeps case tells them apart: the key is what the model sees
    cased = load_tokenizer(tiny_model_dir)
    assert text_key("WiFi连不上", cased) != text_key("wifi连不上", cased)
    assert text_keys([], cased) == []


def test_generate_makes_them_one_text(tmp_path):
    same_intent = parse_templates({"intents": {"CLOCK_IN": [A, B]}})
    with pytest.raises(DataError, match="yields only 1 distinct texts"):
        generate(same_intent, per_intent=2, seed=1)
    two_intents = parse_templates({"intents": {"CLOCK_IN": [A], "ORDER_QUERY": [B]}})
    with pytest.raises(DataError, match=f"comes out of two intents: .* \\(as '{A}'\\)"):
        generate(two_intents, per_intent=1, seed=1)


def test_validate_and_convert_make_them_one_text(tmp_path, lowercasing_model):
    rows = [(A, "CLOCK_IN"), (B, "CLOCK_IN"), ("下班", "CLOCK_OUT")]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    for extra in ([], ["--labels", str(lowercasing_model)]):
        res = runner.invoke(app, ["data", "validate", str(data), "--json", *extra])
        doc = json.loads(res.stdout)
        assert [p["message"] for p in doc["files"][0]["problems"]] == ["duplicate of line 1"]
    out = tmp_path / "d.csv"
    res = runner.invoke(app, ["data", "convert", str(data), str(out), "--json"])
    assert json.loads(res.stdout)["dropped_duplicates"] == 1
    assert [e.text for e in read_examples(out).examples] == [A, "下班"]
    conflict = write_jsonl(tmp_path / "c.jsonl", [(A, "CLOCK_IN"), (B, "ORDER_QUERY")])
    args = ["data", "validate", str(conflict), "--labels", str(lowercasing_model)]
    res = runner.invoke(app, args)
    assert res.exit_code == ExitCode.DATA and "conflict: same text" in res.output


def test_train_reconciles_them_as_one_text(lowercasing_model):
    tok = load_tokenizer(lowercasing_model)
    _new, old, rec = reconcile([Example(A, "ORDER_QUERY")], [Example(B, "CLOCK_IN")], tok)
    assert [o.dropped.text for o in rec.relabelled] == [B] and old == []


def test_harvest_counts_them_as_one_text(tmp_path):
    log = tmp_path / "p.jsonl"
    rec = {"text": A, "label": "CLOCK_IN", "score": 0.4, "runner_up": "ORDER_QUERY",
           "runner_up_score": 0.3}  # fmt: skip
    log.write_text("\n".join(json.dumps(rec | {"text": t}) for t in (A, B)) + "\n")
    res = harvest([(LocalFiles(), str(log))], HarvestConfig(), SEED_PAIRS)
    assert res.distinct == 1 and res.rows[0].seen == 2
    excluded = harvest([(LocalFiles(), str(log))], HarvestConfig(), SEED_PAIRS,
                       exclude={text_key(A)})  # fmt: skip
    assert excluded.rows == [] and excluded.excluded == 1


def test_import_review_makes_them_one_text(tmp_path, lowercasing_model):
    target = write_jsonl(tmp_path / "reviewed.jsonl", [(A, "CLOCK_IN")])
    review = review_file(tmp_path / "r.csv", [(B, "ORDER_QUERY")])
    tok = load_tokenizer(lowercasing_model)
    with pytest.raises(DataError) as info:
        import_review(review, target, labels={"CLOCK_IN", "ORDER_QUERY"}, tokenizer=tok)
    assert f"labelled ORDER_QUERY here but CLOCK_IN in {target}:1" in info.value.problems[0].message


def test_the_leakage_check_finds_them_as_one_text(tmp_path, lowercasing_model):
    from ftctl.eval.cases import Case
    from ftctl.eval.leakage import leakage

    model = tmp_path / "final"
    shutil.copytree(lowercasing_model, model)
    train = write_jsonl(tmp_path / "train.jsonl", [(A, "CLOCK_IN")])
    write_manifest(model, {"data": {"new": {"path": str(train), "sha256": None}}})
    leaks = leakage([Case("t1", B, "CLOCK_IN"), Case("t2", "下班", "CLOCK_OUT")], model)
    assert leaks["n"] == 1 and leaks["cases"][0]["train"] == f"{train}:1"
