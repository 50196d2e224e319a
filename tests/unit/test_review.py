"""ftctl data import-review: every kind of bad row with its row number; appends atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import read_examples
from ftctl.data.harvest import REVIEW_COLUMNS
from ftctl.data.review import import_review
from ftctl.errors import DataError, ExitCode
from tests.helpers import write_jsonl

runner = CliRunner()
LABELS = {"CLOCK_IN", "ATTENDANCE_TODAY", "SHIPMENT_STATS", "MATERIAL_BATCH_QUERY"}


def review_file(path: Path, rows: list[tuple[str, str]], *, encoding="utf-8-sig") -> Path:
    """A review file as harvest writes it, with (text, label) filled in as a reviewer would."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(REVIEW_COLUMNS)
    for text, label in rows:
        w.writerow([text, "CLOCK_IN", "0.5100", "ATTENDANCE_TODAY", "0.4100", "small_margin",
                    1, label])  # fmt: skip
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    rows = [("帮我打卡", "CLOCK_IN"), ("今天出勤多少人", "ATTENDANCE_TODAY")]
    return write_jsonl(tmp_path / "incremental.jsonl", rows)


def test_reviewed_rows_are_appended_and_unreviewed_left_out(tmp_path, data):
    before = data.read_bytes()
    review = review_file(tmp_path / "r.csv", [
        ("查一下打卡人数", "ATTENDANCE_TODAY"),
        ("没看的", ""),
        ("帮我打卡", "CLOCK_IN"),  # already there, same label: skipped
        ("'=打卡", "CLOCK_IN"),  # harvest escaped a leading = for Excel
        ("查一下打卡人数", "ATTENDANCE_TODAY"),  # twice in the review: once in the data
    ])  # fmt: skip
    res = import_review(review, data, labels=LABELS)
    assert (res.rows, res.reviewed, res.already, res.repeated) == (5, 4, 1, 1)
    assert [(e.text, e.label) for e in res.added] == [
        ("查一下打卡人数", "ATTENDANCE_TODAY"), ("=打卡", "CLOCK_IN")]  # fmt: skip
    assert data.read_bytes().startswith(before)  # existing bytes kept as they were
    got = read_examples(data)
    assert not got.problems and len(got.examples) == 4


def test_every_bad_row_is_reported_with_its_row_and_nothing_is_written(tmp_path, data):
    old = write_jsonl(tmp_path / "original.jsonl", [("发货统计", "SHIPMENT_STATS")])
    before = data.read_bytes()
    review = review_file(tmp_path / "r.csv", [
        ("好的一行", "CLOCK_IN"),  # row 2: fine
        ("", "CLOCK_IN"),  # row 3: empty text
        ("查库存", "INVENTROY_QUERY"),  # row 4: unknown label
        ("帮我打卡", "ATTENDANCE_TODAY"),  # row 5: conflicts with the incremental data
        ("发货统计", "MATERIAL_BATCH_QUERY"),  # row 6: conflicts with --against
        ("原料批次", "MATERIAL_BATCH_QUERY"),  # row 7: fine ...
        ("原料批次", "SHIPMENT_STATS"),  # row 8: ... but labelled otherwise here
        ("字" * 200, "CLOCK_IN"),  # row 9: too long
        ("小写标签", "clock_in"),  # row 10: unknown, with a suggestion
    ])  # fmt: skip
    with pytest.raises(DataError) as info:
        import_review(review, data, labels=LABELS | {"INVENTORY_QUERY"}, against=[old])
    rows = {p.line: p.message for p in info.value.problems}
    assert sorted(rows) == [3, 4, 5, 6, 8, 9, 10]
    assert "empty text" in rows[3]
    assert "unknown label 'INVENTROY_QUERY' (did you mean INVENTORY_QUERY?)" in rows[4]
    assert f"but CLOCK_IN in {data}:1" in rows[5]
    assert f"but SHIPMENT_STATS in {old}:1" in rows[6]
    assert "but MATERIAL_BATCH_QUERY in row 7" in rows[8]
    assert "200 characters, over 128" in rows[9]
    assert "did you mean CLOCK_IN?" in rows[10]
    assert all(p.file == str(review) for p in info.value.problems)
    assert data.read_bytes() == before


def test_a_review_with_no_label_filled_in_is_an_error(tmp_path, data):
    review = review_file(tmp_path / "r.csv", [("甲", ""), ("乙", " ")])
    with pytest.raises(DataError, match="no row has a label"):
        import_review(review, data, labels=LABELS)


def test_a_file_saved_by_excel_on_chinese_windows_gb18030_is_read(tmp_path, data):
    review = review_file(tmp_path / "r.csv", [("查一下打卡人数", "ATTENDANCE_TODAY")],
                         encoding="gb18030")  # fmt: skip
    res = import_review(review, data, labels=LABELS)
    assert res.encoding == "gb18030" and res.added[0].text == "查一下打卡人数"


def test_a_csv_target_keeps_its_header_and_gets_rows(tmp_path):
    target = tmp_path / "inc.csv"
    target.write_bytes("user_input,intent_code\r\n帮我打卡,CLOCK_IN\r\n".encode())
    review = review_file(tmp_path / "r.csv", [("下班了,签退", "CLOCK_IN")])
    import_review(review, target, labels=LABELS)
    got = read_examples(target)
    assert [(e.text, e.label) for e in got.examples] == [("帮我打卡", "CLOCK_IN"),
                                                         ("下班了,签退", "CLOCK_IN")]  # fmt: skip
    new = tmp_path / "new.jsonl"  # a target that does not exist yet
    import_review(review, new, labels=LABELS)
    assert json.loads(new.read_text()) == {"text": "下班了,签退", "label": "CLOCK_IN"}


def test_default_labels_are_those_of_the_data_and_the_predicted_column(tmp_path, data):
    review = review_file(tmp_path / "r.csv", [("甲", "CLOCK_IN"), ("乙", "NEW_INTENT")])
    with pytest.raises(DataError) as info:
        import_review(review, data)
    assert [p.line for p in info.value.problems] == [3]


def test_a_file_that_is_not_a_review(tmp_path, data):
    bad = tmp_path / "r.csv"
    bad.write_text("user_input,intent_code\n甲,CLOCK_IN\n", encoding="utf-8")
    with pytest.raises(DataError, match="'text' and 'label' columns"):
        import_review(bad, data, labels=LABELS)


def test_cli_import_review_json_and_exit_3_on_bad_rows(tmp_path, data):
    good = review_file(tmp_path / "good.csv", [("查一下打卡人数", "ATTENDANCE_TODAY")])
    result = runner.invoke(app, ["data", "import-review", str(good), "--to", str(data), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["added"] == 1 and doc["target"] == str(data)
    bad = review_file(tmp_path / "bad.csv", [("帮我打卡", "ATTENDANCE_TODAY")])
    result = runner.invoke(app, ["data", "import-review", str(bad), "--to", str(data)])
    assert result.exit_code == ExitCode.DATA
    assert "row(s) with problems; nothing imported" in result.output
    assert f"{bad}:2 [label]" in result.output


def test_cli_import_review_labels_from_a_model_directory(tmp_path, data, tiny_model_dir):
    review = review_file(tmp_path / "r.csv", [("查库存还剩多少", "INVENTORY_QUERY")])
    args = ["data", "import-review", str(review), "--to", str(data)]
    assert runner.invoke(app, args).exit_code == ExitCode.DATA  # not a label of the data
    result = runner.invoke(app, [*args, "--labels", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "added 1 reviewed rows" in result.output
