"""The generation engine (ftctl.data.generate), `ftctl data generate`, and the shipped demo data."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import read_examples
from ftctl.data.generate import generate, load_templates, parse_templates
from ftctl.errors import DataError, ExitCode
from tests.helpers import INTENTS

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output with the console's line wrapping undone (errors go to an 80-column stderr)."""
    return output.replace("\n", "")


REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
PAIR_INTENTS = INTENTS[:5]
GUARD_INTENTS = (
    "MATERIAL_RECEIVE",
    "CLOCK_OUT",
    "SCHEDULE_QUERY",
    "SHIPMENT_CREATE",
    "REPORT_DAILY",
)
INCREMENTAL_INTENTS = (*PAIR_INTENTS, *GUARD_INTENTS)
TRAINING_FILES = (
    "original_training_data.jsonl",
    "incremental_training_data.jsonl",
    "incremental_training_data.csv",
)

SMALL = {
    "slots": {"line": ["一号线", "二号线"], "material": ["面粉", "白糖"]},
    "defaults": {"prefixes": ["", "请"], "suffixes": ["", "呢"], "punctuation": ["", "？"]},
    "intents": {
        "PROCESSING_BATCH_LIST": ["{line}在产批次", "正在加工的批次"],
        "MATERIAL_BATCH_QUERY": ["{material}原料批次", "原材料批号"],
        "CLOCK_IN": {"phrasings": ["帮我打卡", "我要签到"], "suffixes": ["", "吧"]},
    },
}


def write_yaml(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------ engine


def test_generate_is_deterministic_for_a_seed():
    t = parse_templates(SMALL)
    a = generate(t, per_intent=12, seed=3)
    b = generate(t, per_intent=12, seed=3)
    c = generate(t, per_intent=12, seed=4)
    assert [(e.text, e.label) for e in a] == [(e.text, e.label) for e in b]
    assert [(e.text, e.label) for e in a] != [(e.text, e.label) for e in c]


def test_generate_is_balanced_per_intent():
    examples = generate(parse_templates(SMALL), per_intent=12, seed=0)
    assert Counter(e.label for e in examples) == {label: 12 for label in SMALL["intents"]}


def test_generate_removes_duplicates():
    doc = {"slots": {"x": ["面粉", "面粉", "面粉"]}, "intents": {"A": ["{x}批次", "查{x}"]}}
    doc["defaults"] = {"prefixes": ["", "", "请"]}
    examples = generate(parse_templates(doc), per_intent=4, seed=0)
    texts = [e.text for e in examples]
    assert len(texts) == len(set(texts)) == 4
    assert set(texts) == {"面粉批次", "查面粉", "请面粉批次", "请查面粉"}


def test_every_phrasing_appears_plain_first():
    examples = generate(parse_templates(SMALL), per_intent=12, seed=0)
    texts = {e.text for e in examples}
    assert {"正在加工的批次", "原材料批号", "帮我打卡", "我要签到"} <= texts


def test_per_intent_overrides_decorations():
    examples = generate(parse_templates(SMALL), per_intent=12, seed=0)
    clock_in = [e.text for e in examples if e.label == "CLOCK_IN"]
    assert not any(t.rstrip("？").endswith("呢") for t in clock_in)


def test_ids_are_unique_and_name_the_intent():
    examples = generate(parse_templates(SMALL), per_intent=5, seed=0, with_ids=True)
    ids = [e.id for e in examples]
    assert len(set(ids)) == len(ids)
    assert all(e.id.startswith(e.label + "-") for e in examples)


def test_one_text_with_two_labels_names_both_template_entries(tmp_path):
    doc = {"intents": {"CLOCK_IN": ["帮我打卡", "打卡"], "ATTENDANCE_TODAY": ["打卡", "出勤"]}}
    path = write_yaml(tmp_path / "t.yaml", doc)
    with pytest.raises(DataError) as exc:
        generate(load_templates(path), per_intent=2, seed=0)
    msg = exc.value.message
    assert str(path) in msg and "'打卡'" in msg
    assert "intents.CLOCK_IN[1]" in msg and "intents.ATTENDANCE_TODAY[0]" in msg


def test_too_few_distinct_texts_is_an_error():
    doc = {"intents": {"CLOCK_IN": ["帮我打卡"]}}
    with pytest.raises(DataError, match="CLOCK_IN yields only 1 distinct texts"):
        generate(parse_templates(doc), per_intent=5, seed=0)


def test_too_long_text_is_an_error():
    doc = {"intents": {"CLOCK_IN": ["帮我打卡" * 10]}}
    with pytest.raises(DataError, match=r"intents.CLOCK_IN\[0\].*over --max-chars 20"):
        generate(parse_templates(doc), per_intent=1, seed=0, max_chars=20)


# ------------------------------------------------------------------ templates-file errors


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("intents:\n  CLOCK_IN: [帮我打卡\n", ["not valid YAML", "bad.yaml:3"]),
        ("intents:\n  CLOCK_IN:\n    - 我在{room}打卡\n", ["CLOCK_IN", "我在{room}打卡", "{room}"]),
        ("intents:\n  CLOCK_IN: []\n", ["intent CLOCK_IN has no phrasings"]),
        ("intents:\n  CLOCK_IN:\n", ["intent CLOCK_IN has no phrasings"]),
        ("intents:\n  CLOCK_IN:\n    suffixes: [吧]\n", ["intent CLOCK_IN has no phrasings"]),
        ("intents: {}\n", ["intents", "non-empty mapping"]),
        ("- 帮我打卡\n", ["must be a mapping"]),
        ("intent:\n  CLOCK_IN: [帮我打卡]\n", ["unknown top-level key(s): intent"]),
        ("intents:\n  CLOCK_IN: [帮我打卡, 帮我打卡]\n", ["CLOCK_IN", "listed twice"]),
        ("intents:\n  CLOCK_IN: [帮我打卡]\n  A: [{x: 1}]\n", ["intents.A", "must be a string"]),
    ],
)
def test_templates_file_errors_name_file_and_entry(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_templates(path)
    assert str(path) in exc.value.message
    for w in words:
        assert w in exc.value.message, (w, exc.value.message)


def test_cli_templates_error_exits_3_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("intents:\n  CLOCK_IN:\n    - 我在{room}打卡\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "generate", "--templates", str(path), "--out-dir", "x"])
    assert result.exit_code == ExitCode.DATA
    assert "unknown slot {room}" in flat(result.output)
    assert "Traceback" not in result.output


def test_cli_missing_templates_file(tmp_path):
    result = runner.invoke(app, ["data", "generate", "--templates", str(tmp_path / "no.yaml")])
    assert result.exit_code == ExitCode.DATA
    assert "templates file not found" in flat(result.output)


# ------------------------------------------------------------------ the command


def test_generate_command_json_gives_counts_and_paths(tmp_path):
    samples = write_yaml(tmp_path / "s.yaml", SMALL)
    out = tmp_path / "out"
    args = ["data", "generate", "--templates", str(samples), "--out-dir", str(out)]
    result = runner.invoke(app, [*args, "--per-intent", "6", "--name", "x", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["counts"] == {label: 6 for label in SMALL["intents"]}
    assert doc["total"] == 18
    assert doc["paths"] == [str(out / "x.jsonl"), str(out / "x.csv")]
    assert read_examples(out / "x.csv").problems == []
    assert len(read_examples(out / "x.jsonl").examples) == 18


def test_generate_command_prints_a_count_table(tmp_path):
    samples = write_yaml(tmp_path / "s.yaml", SMALL)
    result = runner.invoke(
        app,
        ["data", "generate", "--templates", str(samples), "--out-dir", str(tmp_path),
         "--per-intent", "5", "--format", "csv", "--ids"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for label in SMALL["intents"]:
        assert re.search(rf"{label}\s*│\s*2\s*│\s*5", result.stdout), result.stdout
    assert not (tmp_path / "incremental_training_data.jsonl").exists()
    header = (tmp_path / "incremental_training_data.csv").read_text(encoding="utf-8")
    assert header.startswith("id,user_input,intent_code\n")


def test_generate_command_bad_name_is_a_usage_error():
    result = runner.invoke(app, ["data", "generate", "--name", "../x", "--out-dir", "x"])
    assert result.exit_code == ExitCode.USAGE
    assert "plain file stem" in flat(result.output)


def test_generate_command_bad_format_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["data", "generate", "--format", "xml", "--out-dir", "x"])
    assert result.exit_code == ExitCode.USAGE
    assert "data.format" in flat(result.output)


# ------------------------------------------------------------------ the shipped data


def documented_commands(yaml_file: Path) -> list[list[str]]:
    """The `ftctl data generate ...` commands written in a templates file's header comment."""
    header = []
    for line in yaml_file.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    joined = "\n".join(header).replace("\\\n", " ")
    return [shlex.split(ln)[1:] for ln in joined.splitlines() if ln.startswith("ftctl data gen")]


@pytest.mark.parametrize(
    ("templates", "outputs"),
    [
        ("incremental_samples.yaml", TRAINING_FILES[1:]),
        ("original_templates.yaml", ("original_training_data.jsonl",)),
        ("test_templates.yaml", ("test_cases.jsonl",)),
    ],
)
def test_documented_commands_reproduce_the_committed_files_byte_for_byte(
    tmp_path, monkeypatch, templates, outputs
):
    work = tmp_path / "repo"
    (work / "data").mkdir(parents=True)
    for f in DATA.glob("*.yaml"):
        shutil.copy(f, work / "data" / f.name)
    monkeypatch.chdir(work)
    commands = documented_commands(DATA / templates)
    assert commands, f"no `ftctl data generate` command in the header of {templates}"
    for argv in commands:
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
        for name in outputs:
            assert (work / "data" / name).read_bytes() == (DATA / name).read_bytes(), name
            (work / "data" / name).unlink()


def test_default_generate_writes_the_seed_outputs(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copy(DATA / "incremental_samples.yaml", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "generate"])
    assert result.exit_code == 0, result.output
    for name in TRAINING_FILES[1:]:
        assert (tmp_path / "data" / name).read_bytes() == (DATA / name).read_bytes()
    first = (tmp_path / "data" / "incremental_training_data.csv").read_text(encoding="utf-8")
    assert first.startswith("user_input,intent_code\n")


def test_shipped_files_are_valid_and_balanced():
    for name, per_intent, intents in (
        ("original_training_data.jsonl", 120, INTENTS),
        ("incremental_training_data.jsonl", 120, INCREMENTAL_INTENTS),
        ("incremental_training_data.csv", 120, INCREMENTAL_INTENTS),
        ("test_cases.jsonl", 40, INTENTS),
    ):
        result = read_examples(DATA / name, allowed_labels=INTENTS)
        assert result.problems == [], (name, result.problems[:3])
        assert Counter(e.label for e in result.examples) == dict.fromkeys(intents, per_intent)


def test_test_pool_has_unique_ids():
    examples = read_examples(DATA / "test_cases.jsonl").examples
    ids = [e.id for e in examples]
    assert None not in ids and len(set(ids)) == len(ids) == 800


def test_no_test_text_appears_in_any_training_file():
    training = set()
    for name in TRAINING_FILES:
        training |= {e.text for e in read_examples(DATA / name).examples}
    test_texts = {e.text for e in read_examples(DATA / "test_cases.jsonl").examples}
    assert test_texts.isdisjoint(training), sorted(test_texts & training)[:10]


def test_no_test_phrasing_is_a_training_phrasing():
    def phrasings(name):
        return {p for it in load_templates(DATA / name).intents for p in it.phrasings}

    training = phrasings("original_templates.yaml") | phrasings("incremental_samples.yaml")
    assert phrasings("test_templates.yaml").isdisjoint(training)


def test_incremental_samples_have_40_phrasings_for_each_pair_intent_plus_guards():
    templates = load_templates(DATA / "incremental_samples.yaml")
    assert templates.labels == list(INCREMENTAL_INTENTS)
    pairs = [it for it in templates.intents if it.label in PAIR_INTENTS]
    assert len(pairs) == 5 and all(len(it.phrasings) >= 40 for it in pairs)


def test_separating_cues_are_in_the_incremental_data_not_the_original():
    def texts(name, label):
        return [e.text for e in read_examples(DATA / name).examples if e.label == label]

    cues = {
        "PROCESSING_BATCH_LIST": ("在产", "加工", "产线", "生产"),
        "MATERIAL_BATCH_QUERY": ("原料", "原材料", "进货", "原辅料"),
    }
    for label, words in cues.items():
        orig = texts("original_training_data.jsonl", label)
        new = texts("incremental_training_data.jsonl", label)
        assert not any(w in t for t in orig for w in words), label
        assert sum(any(w in t for w in words) for t in new) > len(new) * 0.6, label
