"""ftctl.data.examples (readers, writers) and the `ftctl data validate` / `convert` commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import Example, load_examples, read_examples, write_examples
from ftctl.errors import DataError, ExitCode
from tests.helpers import INTENTS

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output with the console's line wrapping undone (errors go to an 80-column stderr)."""
    return output.replace("\n", "")


GOOD = '{"text": "查看在产批次", "label": "PROCESSING_BATCH_LIST"}'

# One JSONL file with every kind of row problem; the value is the line it sits on and the
# words its message must contain.
BAD_JSONL_ROWS = [
    (GOOD, None),
    ('{"text": "坏的 JSON", ', "invalid JSON"),
    ('["帮我打卡", "CLOCK_IN"]', "expected a JSON object"),
    ('{"label": "CLOCK_IN"}', "missing text"),
    ('{"text": "   ", "label": "CLOCK_IN"}', "empty or whitespace-only text"),
    (json.dumps({"text": "长" * 200, "label": "CLOCK_IN"}, ensure_ascii=False), "over --max-chars"),
    ('{"text": "今天到了多少人"}', "missing label"),
    ('{"text": "你好呀", "label": "NOT_AN_INTENT"}', "label 'NOT_AN_INTENT' is not one of"),
    ('{"text": "查看在产批次", "label": "MATERIAL_BATCH_QUERY"}', "conflict"),
    (GOOD, "duplicate of line 1"),
    ('{"text": 5, "label": "CLOCK_IN"}', "text must be a string"),
    ('{"text": "帮我签到", "label": ""}', "label must be a non-empty string"),
]


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def at(path: Path, line: int, text: str) -> bool:
    """Does ``text`` name ``path:line`` (not ``path:line0``...)?"""
    return re.search(re.escape(f"{path}:{line}") + r"[ :]", text) is not None


def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("# the 20 demo intents\n" + "\n".join(INTENTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def bad_jsonl(tmp_path) -> Path:
    return write_lines(tmp_path / "bad.jsonl", [row for row, _ in BAD_JSONL_ROWS])


# ------------------------------------------------------------------ validate: every problem


def test_validate_names_every_problem_with_its_line(bad_jsonl, tmp_path):
    result = runner.invoke(
        app, ["data", "validate", str(bad_jsonl), "--labels", str(labels_file(tmp_path))]
    )
    assert result.exit_code == ExitCode.DATA
    for lineno, (_, words) in enumerate(BAD_JSONL_ROWS, start=1):
        if words is None:
            continue
        lines = [ln for ln in result.stdout.splitlines() if at(bad_jsonl, lineno, ln)]
        assert lines, f"line {lineno} ({words}) not reported:\n{result.stdout}"
        assert any(words in ln for ln in lines), (lineno, words, lines)
    assert not at(bad_jsonl, 1, result.stdout)  # the good row has no problem
    assert "Traceback" not in result.output


def test_validate_json_lists_problems_with_lines(bad_jsonl, tmp_path):
    result = runner.invoke(
        app,
        ["data", "validate", str(bad_jsonl), "--labels", str(labels_file(tmp_path)), "--json"],
    )
    assert result.exit_code == ExitCode.DATA
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert doc["errors"] == 10 and doc["warnings"] == 1
    (f,) = doc["files"]
    lines = sorted(p["line"] for p in f["problems"])
    assert lines == list(range(2, len(BAD_JSONL_ROWS) + 1))
    assert f["examples"] == 1


def test_validate_labels_from_a_model_directory(tiny_model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [GOOD, '{"text": "你好呀", "label": "NOT_AN_INTENT"}'])
    result = runner.invoke(app, ["data", "validate", str(data), "--labels", str(tiny_model_dir)])
    assert result.exit_code == ExitCode.DATA
    assert f"{data}:2" in result.stdout
    assert "not one of the model's 20 labels" in result.stdout


def test_validate_clean_file_exits_0_and_prints_a_summary(tmp_path):
    data = write_lines(tmp_path / "ok.jsonl", [GOOD, '{"text": "帮我打卡", "label": "CLOCK_IN"}'])
    result = runner.invoke(app, ["data", "validate", str(data)])
    assert result.exit_code == 0, result.output
    assert "OK: 0 error(s), 0 warning(s) in 1 file(s)" in result.stdout


def test_validate_warnings_pass_unless_strict(tmp_path):
    data = write_lines(tmp_path / "dup.jsonl", [GOOD, GOOD])
    loose = runner.invoke(app, ["data", "validate", str(data)])
    assert loose.exit_code == 0
    assert f"{data}:2" in loose.stdout and "duplicate of line 1" in loose.stdout
    strict = runner.invoke(app, ["data", "validate", str(data), "--strict"])
    assert strict.exit_code == ExitCode.DATA
    assert "--strict" in strict.stdout


def test_validate_max_chars_flag(tmp_path):
    data = write_lines(tmp_path / "long.jsonl", ['{"text": "帮我打个卡吧", "label": "CLOCK_IN"}'])
    assert runner.invoke(app, ["data", "validate", str(data)]).exit_code == 0
    result = runner.invoke(app, ["data", "validate", str(data), "--max-chars", "3"])
    assert result.exit_code == ExitCode.DATA
    assert f"{data}:1" in result.stdout and "over --max-chars 3" in result.stdout


def test_validate_several_files_one_summary_each(tmp_path, bad_jsonl):
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    missing = tmp_path / "missing.jsonl"
    result = runner.invoke(app, ["data", "validate", str(good), str(bad_jsonl), str(missing)])
    assert result.exit_code == ExitCode.DATA
    doc = json.loads(
        runner.invoke(
            app, ["data", "validate", str(good), str(bad_jsonl), str(missing), "--json"]
        ).stdout
    )
    by_file = {f["file"]: f for f in doc["files"]}
    assert by_file[str(good)]["errors"] == 0
    assert by_file[str(bad_jsonl)]["errors"] > 0
    assert "file not found" in by_file[str(missing)]["problems"][0]["message"]


def test_validate_csv_problems(tmp_path):
    data = write_lines(
        tmp_path / "bad.csv",
        [
            "user_input,intent_code",
            "查看在产批次,PROCESSING_BATCH_LIST",
            "今天, 到了多少人,ATTENDANCE_TODAY",
            ",CLOCK_IN",
            "帮我打卡,",
        ],
    )
    result = runner.invoke(app, ["data", "validate", str(data)])
    assert result.exit_code == ExitCode.DATA
    out = result.stdout
    assert f"{data}:3" in out and "3 fields, header has 2" in out
    assert f"{data}:4" in out and "empty or whitespace-only text" in out
    assert f"{data}:5" in out and "label must be a non-empty string" in out


def test_validate_csv_wrong_header(tmp_path):
    data = write_lines(tmp_path / "h.csv", ["text,label", "帮我打卡,CLOCK_IN"])
    result = runner.invoke(app, ["data", "validate", str(data)])
    assert result.exit_code == ExitCode.DATA
    assert f"{data}:1" in result.stdout
    assert "missing user_input, intent_code" in result.stdout


def test_validate_gbk_file_says_how_to_convert(tmp_path):
    data = write_lines(
        tmp_path / "excel.csv", ["user_input,intent_code", "帮我打卡,CLOCK_IN"], encoding="gbk"
    )
    result = runner.invoke(app, ["data", "validate", str(data)])
    assert result.exit_code == ExitCode.DATA
    assert f"{data}:2" in result.stdout
    assert "GBK" in result.stdout
    assert "iconv -f GB18030 -t UTF-8" in result.stdout
    with pytest.raises(DataError, match="not UTF-8") as exc:
        read_examples(data)
    assert "iconv" in exc.value.hint


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        ("bom.jsonl", ['{"text": "帮我打卡", "label": "CLOCK_IN"}']),
        ("bom.csv", ["user_input,intent_code", "帮我打卡,CLOCK_IN"]),
    ],
)
def test_bom_is_accepted(tmp_path, name, lines):
    data = tmp_path / name
    data.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    assert read_examples(data).examples[0].text == "帮我打卡"
    assert read_examples(data).problems == []
    assert runner.invoke(app, ["data", "validate", str(data)]).exit_code == 0


def test_unknown_extension_is_a_data_error(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("帮我打卡\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "validate", str(data)])
    assert result.exit_code == ExitCode.DATA
    assert "unknown data format '.txt'" in result.stdout


def test_labels_file_that_is_missing_is_a_clear_error(tmp_path):
    data = write_lines(tmp_path / "ok.jsonl", [GOOD])
    result = runner.invoke(
        app, ["data", "validate", str(data), "--labels", str(tmp_path / "none.txt")]
    )
    assert result.exit_code == ExitCode.DATA
    assert "--labels" in flat(result.output) and "not found" in flat(result.output)
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ library API


def test_load_examples_raises_one_error_listing_all(bad_jsonl):
    with pytest.raises(DataError) as exc:
        load_examples(bad_jsonl, allowed_labels=INTENTS)
    assert len(exc.value.problems) == 10
    assert {p.line for p in exc.value.problems} == set(range(2, 13)) - {10}


def test_write_examples_is_utf8_not_escaped(tmp_path):
    path = write_examples(tmp_path / "o.jsonl", [Example("帮我打卡", "CLOCK_IN")])
    assert path.read_text(encoding="utf-8") == '{"text": "帮我打卡", "label": "CLOCK_IN"}\n'


# ------------------------------------------------------------------ convert


ROWS = [
    Example("查看在产批次", "PROCESSING_BATCH_LIST"),
    Example('面粉是哪个批次，"急"', "MATERIAL_BATCH_QUERY"),
    Example("帮我打卡", "CLOCK_IN"),
]


def test_convert_round_trip_jsonl_csv_jsonl(tmp_path):
    src = write_examples(tmp_path / "a.jsonl", ROWS)
    csv_path, back = tmp_path / "b.csv", tmp_path / "c.jsonl"
    r1 = runner.invoke(app, ["data", "convert", str(src), str(csv_path)])
    assert r1.exit_code == 0, r1.output
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "user_input,intent_code"
    r2 = runner.invoke(app, ["data", "convert", str(csv_path), str(back)])
    assert r2.exit_code == 0, r2.output
    assert back.read_bytes() == src.read_bytes()


def test_convert_keeps_ids(tmp_path):
    src = write_examples(
        tmp_path / "a.jsonl", [Example("帮我打卡", "CLOCK_IN", "t1")], with_ids=True
    )
    dst = tmp_path / "a.csv"
    result = runner.invoke(app, ["data", "convert", str(src), str(dst), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["examples"] == 1
    assert dst.read_text(encoding="utf-8") == "id,user_input,intent_code\nt1,帮我打卡,CLOCK_IN\n"


def test_convert_with_errors_writes_nothing(bad_jsonl, tmp_path):
    dst = tmp_path / "out.csv"
    result = runner.invoke(app, ["data", "convert", str(bad_jsonl), str(dst)])
    assert result.exit_code == ExitCode.DATA
    assert not dst.exists()
    assert f"{bad_jsonl}:2" in flat(result.output)
    assert list(tmp_path.glob(".out.csv.*")) == []


def test_convert_unknown_output_extension(tmp_path):
    src = write_examples(tmp_path / "a.jsonl", ROWS)
    result = runner.invoke(app, ["data", "convert", str(src), str(tmp_path / "a.xlsx")])
    assert result.exit_code == ExitCode.DATA
    assert "unknown data format '.xlsx'" in flat(result.output)


def test_convert_drops_duplicates_with_a_warning(tmp_path):
    src = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD])
    dst = tmp_path / "d.csv"
    result = runner.invoke(app, ["data", "convert", str(src), str(dst)])
    assert result.exit_code == 0
    assert "duplicate of line 1" in flat(result.output)
    assert len(read_examples(dst).examples) == 1


def test_validate_reports_an_empty_file_as_an_error(tmp_path):
    from typer.testing import CliRunner

    from ftctl.cli.main import app

    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("user_input,intent_code\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "validate", str(empty_csv)])
    assert result.exit_code == 3
    assert "no examples" in result.output


def test_validate_names_a_missing_file_once(tmp_path):
    from typer.testing import CliRunner

    from ftctl.cli.main import app

    missing = str(tmp_path / "nope.jsonl")
    result = CliRunner().invoke(app, ["data", "validate", missing])
    assert result.exit_code == 3
    flat = result.output.replace("\n", "")
    assert f"{missing}: file not found" in flat
    assert f"{missing}: {missing}" not in flat


# ------------------------------------------------------------------ the same text, normalised


def test_full_width_and_spacing_variants_are_the_same_text(tmp_path):
    from ftctl.data.textkey import text_key

    assert text_key(" 帮我  打卡？ ") == text_key("帮我 打卡?")
    assert text_key("ＡＢＣ１２３") == text_key("abc123") == "abc123"
    path = write_lines(
        tmp_path / "d.jsonl",
        ['{"text": "帮我打卡？", "label": "CLOCK_IN"}',
         '{"text": "帮我打卡?", "label": "CLOCK_IN"}',
         '{"text": "帮我打卡 ?", "label": "CLOCK_IN"}',
         '{"text": "帮我打卡?", "label": "ATTENDANCE_TODAY"}'],
    )  # fmt: skip
    result = read_examples(path)
    assert [p.message for p in result.problems] == [
        "duplicate of line 1",
        "conflict: same text labelled 'CLOCK_IN' on line 1 ('帮我打卡？') and "
        "'ATTENDANCE_TODAY' here",
    ]
    assert [ex.text for ex in result.examples] == ["帮我打卡？", "帮我打卡 ?"]


def test_reconcile_new_label_wins_and_repeats_keep_one_copy():
    from ftctl.data.reconcile import reconcile

    new = [Example("补卡", "ATTENDANCE_TODAY", file="new.jsonl", line=1),
           Example("查库存", "INVENTORY_QUERY", file="new.jsonl", line=2)]  # fmt: skip
    old = [Example("补卡 ", "CLOCK_IN", file="old.jsonl", line=7),
           Example("查库存", "INVENTORY_QUERY", file="old.jsonl", line=8),
           Example("帮我打卡", "CLOCK_IN", file="old.jsonl", line=9)]  # fmt: skip
    n, o, rec = reconcile(new, old)
    assert n == new and [e.text for e in o] == ["帮我打卡"]
    assert [r.to_dict() for r in rec.relabelled] == [
        {"text": "补卡", "label": "ATTENDANCE_TODAY", "old_label": "CLOCK_IN",
         "new": "new.jsonl:1", "old": "old.jsonl:7"}
    ]  # fmt: skip
    assert rec.to_dict()["duplicates"] == 1
    assert rec.messages() == [
        "1 old row(s) relabelled by the new data (the new label wins), left the replay pool: "
        "'补卡' CLOCK_IN -> ATTENDANCE_TODAY",
        "1 old row(s) repeated in the new data with the same label (one copy kept), left the "
        "replay pool: '查库存' (INVENTORY_QUERY)",
    ]
    many = [Example(f"t{i}", "A") for i in range(8)]
    _, _, rec = reconcile(many, [Example(f"t{i}", "B") for i in range(8)])
    assert rec.messages()[0].endswith("'t4' B -> A; ... 3 more in the manifest")


def test_validate_one_file_says_nothing_about_other_files(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 0 and "across files" not in result.output


def test_validate_across_three_files_names_the_first_occurrence(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [GOOD])
    b = write_lines(tmp_path / "b.csv", ["user_input,intent_code", "查看在产批次,CLOCK_IN"])
    c = write_lines(tmp_path / "c.jsonl", [GOOD])
    result = runner.invoke(app, ["data", "validate", str(a), str(b), str(c), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["across_files"] == {"relabels": 1, "duplicates": 1}
    problems = {f["file"]: f["problems"] for f in doc["files"]}
    assert problems[str(a)] == []
    assert (
        problems[str(b)][0]["line"] == 2
        and "relabelled: 'CLOCK_IN' here" in (problems[str(b)][0]["message"])
    )
    assert problems[str(c)][0]["message"].startswith(f"duplicate of {a}:1 (another file)")
