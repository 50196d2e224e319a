"""Reviewed data is its own source: import-review appends to it (following the target's header,
under a lock, atomically, keeping mode and symlink), generate never touches it and refuses to
replace rows it did not write, train reads it last so a reviewed label wins."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.data.examples import Example, append_examples, read_examples
from ftctl.data.harvest import REVIEW_COLUMNS
from ftctl.data.review import import_review
from ftctl.errors import ExitCode
from tests.helpers import write_jsonl

runner = CliRunner()
LABELS = {"CLOCK_IN", "ATTENDANCE_TODAY", "SHIPMENT_STATS"}


def review_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A harvest review file with the label column filled in as a reviewer would."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(REVIEW_COLUMNS)
    for text, label in rows:
        w.writerow([text, "CLOCK_IN", "0.51", "ATTENDANCE_TODAY", "0.41", "small_margin", 1,
                    label])  # fmt: skip
    path.write_bytes(buf.getvalue().encode("utf-8-sig"))
    return path


# ------------------------------------------------------------------ appends follow the file


@pytest.mark.parametrize(
    ("header", "newline", "bom"),
    [
        ("user_input,intent_code", "\n", False),
        ("intent_code,user_input", "\r\n", False),
        ("id,user_input,intent_code", "\n", True),
        ("intent_code,note,user_input,id", "\r\n", True),
    ],
)
def test_csv_targets_with_each_header_order_read_back_right(tmp_path, header, newline, bom):
    cols = header.split(",")
    first = {"user_input": "帮我打卡", "intent_code": "CLOCK_IN", "id": "a-1", "note": "x"}
    body = newline.join([header, ",".join(first[c] for c in cols)]) + newline
    target = tmp_path / "reviewed.csv"
    target.write_bytes(("\ufeff" if bom else "").encode() + body.encode())
    before = target.read_bytes()
    review = review_file(tmp_path / "r.csv", [("下班了,签退", "CLOCK_IN"),
                                              ("今天几个人上班", "ATTENDANCE_TODAY")])  # fmt: skip
    import_review(review, target, labels=LABELS)
    raw = target.read_bytes()
    assert raw.startswith(before)  # the bytes already there are kept as they are
    assert raw.count(b"\r\n") == (4 if newline == "\r\n" else 0)  # its line ending followed
    got = read_examples(target)
    assert not got.problems
    assert [(e.text, e.label) for e in got.examples] == [
        ("帮我打卡", "CLOCK_IN"),
        ("下班了,签退", "CLOCK_IN"),
        ("今天几个人上班", "ATTENDANCE_TODAY"),
    ]
    if "id" in cols:  # the id column is filled: review file and row
        assert [e.id for e in got.examples[1:]] == ["r:2", "r:3"]


def test_a_csv_target_without_the_columns_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "reviewed.csv"
    target.write_text("text,label\n帮我打卡,CLOCK_IN\n", encoding="utf-8")
    before = target.read_bytes()
    with pytest.raises(Exception, match="cannot append: the CSV header has no user_input"):
        append_examples(target, [Example("下班", "CLOCK_IN")])
    assert target.read_bytes() == before


def test_the_append_keeps_the_files_mode_and_symlink(tmp_path):
    real = write_jsonl(tmp_path / "store" / "reviewed.jsonl", [("帮我打卡", "CLOCK_IN")])
    os.chmod(real, 0o640)
    link = tmp_path / "reviewed.jsonl"
    link.symlink_to(real)
    append_examples(link, [Example("下班了", "CLOCK_IN")])
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real.stat().st_mode & 0o777) == 0o640
    assert [e.text for e in read_examples(link).examples] == ["帮我打卡", "下班了"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["reviewed.jsonl"]  # no temp left


def test_a_jsonl_target_with_ids_gets_ids(tmp_path):
    target = tmp_path / "reviewed.jsonl"
    target.write_text('{"id": "x1", "text": "帮我打卡", "label": "CLOCK_IN"}\n', encoding="utf-8")
    import_review(review_file(tmp_path / "r.csv", [("下班了", "CLOCK_IN")]), target,
                  labels=LABELS)  # fmt: skip
    assert json.loads(target.read_text().splitlines()[1]) == {
        "id": "r:2", "text": "下班了", "label": "CLOCK_IN"}  # fmt: skip


_IMPORTER = """
import sys
from pathlib import Path
from ftctl.data.review import import_review
labels = {"CLOCK_IN", "ATTENDANCE_TODAY"}
for review in sys.argv[2:]:
    import_review(Path(review), Path(sys.argv[1]), labels=labels)
"""


def _run_together(target: Path, batches: list[list[Path]]) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _IMPORTER, str(target), *map(str, reviews)])
        for reviews in batches
    ]
    assert [p.wait(120) for p in procs] == [0] * len(procs)


def test_two_concurrent_imports_of_100_rows_each_lose_none(tmp_path):
    target = write_jsonl(tmp_path / "reviewed.jsonl", [("帮我打卡", "CLOCK_IN")])
    reviews = [
        [review_file(tmp_path / f"r{k}.csv", [(f"第{k}批第{i}句", "CLOCK_IN") for i in range(100)])]
        for k in range(2)
    ]
    _run_together(target, reviews)
    got = read_examples(target)
    assert not got.problems and len(got.examples) == 201


def test_many_small_imports_at_once_interleave_under_the_lock_and_lose_none(tmp_path):
    """Two processes, 40 one-row imports each: 80 read-modify-write cycles racing. Without the
    lock, one's rewrite would drop the other's rows."""
    target = write_jsonl(tmp_path / "reviewed.jsonl", [("帮我打卡", "CLOCK_IN")])
    batches = [
        [review_file(tmp_path / f"r{k}-{i}.csv", [(f"进程{k}第{i}句", "ATTENDANCE_TODAY")])
         for i in range(40)]
        for k in range(2)
    ]  # fmt: skip
    _run_together(target, batches)
    got = read_examples(target)
    assert not got.problems and len(got.examples) == 81


# ------------------------------------------------------------------ generate and the reviewed data

TEMPLATES = """
intents:
  CLOCK_IN: [帮我打卡, 上班打卡, 打个卡, 我要打卡, 早上打卡]
  ATTENDANCE_TODAY: [今天出勤多少人, 今天几个人上班, 出勤人数, 今天到岗几人, 到岗情况]
  SHIPMENT_STATS: [发货统计, 本周发货量, 发了多少货, 发货数量, 发货汇总]
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "incremental_samples.yaml").write_text(TEMPLATES, encoding="utf-8")
    return tmp_path


def _generate(*extra: str):
    return runner.invoke(app, ["data", "generate", "--per-intent", "5", *extra])


def test_generate_refuses_to_replace_rows_it_did_not_write_unless_forced(project):
    assert _generate().exit_code == 0
    gen = project / "data" / "incremental_training_data.jsonl"
    assert (project / "data" / "incremental_training_data.generated.json").is_file()
    assert _generate().exit_code == 0  # its own file: replaced
    with gen.open("a", encoding="utf-8") as fh:  # someone appends to the generated file
        fh.write('{"text": "补卡", "label": "CLOCK_IN"}\n')
    before = gen.read_bytes()
    refused = _generate()
    assert refused.exit_code == ExitCode.DATA
    assert "holds 1 row(s) data generate did not write" in refused.output
    assert "'补卡' CLOCK_IN" in refused.output and "--force" in refused.output
    assert gen.read_bytes() == before  # nothing written
    assert _generate("--force").exit_code == 0
    assert b"\xe8\xa1\xa5\xe5\x8d\xa1" not in gen.read_bytes()  # 补卡 replaced, as asked


def test_generate_without_a_record_replaces_a_file_only_if_no_row_is_lost(project):
    gen = project / "data" / "incremental_training_data.jsonl"
    assert _generate("--format", "jsonl").exit_code == 0
    (project / "data" / "incremental_training_data.generated.json").unlink()
    assert _generate("--format", "jsonl").exit_code == 0  # the same rows: nothing lost
    (project / "data" / "incremental_training_data.generated.json").unlink()
    rows = gen.read_text(encoding="utf-8").splitlines()
    gen.write_text("\n".join([*rows[:-1], '{"text": "手写的", "label": "CLOCK_IN"}']) + "\n")
    assert _generate("--format", "jsonl").exit_code == ExitCode.DATA


def test_generate_never_writes_the_reviewed_data(project):
    result = _generate("--name", "reviewed", "--format", "jsonl")
    assert result.exit_code == ExitCode.USAGE
    assert "is the reviewed data ([data] reviewed): generate never writes it" in result.output


def test_import_review_refuses_a_file_generate_writes(project):
    assert _generate().exit_code == 0
    review = review_file(project / "r.csv", [("补卡", "CLOCK_IN")])
    gen = project / "data" / "incremental_training_data.jsonl"
    result = runner.invoke(app, ["data", "import-review", str(review), "--to", str(gen)])
    assert result.exit_code == ExitCode.USAGE
    assert "`ftctl data generate` writes that file" in result.output


def test_generate_runs_after_import_review_and_the_reviewed_label_is_learned(
    project, tiny_model_dir
):
    """The loop: generate, import a review that relabels generated texts and adds a new one,
    generate again (the reviewed rows stay), train (the reviewed data goes last and wins), and
    the model answers the reviewed texts it trained on as reviewed."""
    from ftctl.config import TrainConfig
    from ftctl.model.files import load_classifier
    from ftctl.model.inference import predict
    from ftctl.train.inputs import prepare_inputs
    from ftctl.train.mix import mix_data

    assert _generate().exit_code == 0
    reviewed_rows = [("出勤人数", "CLOCK_IN"), ("发货汇总", "CLOCK_IN"), ("钉钉签到", "CLOCK_IN")]
    review = review_file(project / "review.csv", reviewed_rows)
    imported = runner.invoke(app, ["data", "import-review", str(review), "--json"])
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["target"] == "data/reviewed.jsonl"
    reviewed = project / "data" / "reviewed.jsonl"
    before = reviewed.read_bytes()
    assert _generate().exit_code == 0  # generate after the import: the reviewed rows stay
    assert reviewed.read_bytes() == before
    gen = read_examples(project / "data" / "incremental_training_data.jsonl").examples
    assert ("出勤人数", "ATTENDANCE_TODAY") in {(e.text, e.label) for e in gen}

    args = ["train", "--new-data", "data/incremental_training_data.jsonl",
            "--model-path", str(tiny_model_dir), "--output-path", "out", "--epochs", "12",
            "--lr", "0.02", "--freeze-layers", "0", "--patience", "0", "--batch-size", "4",
            "--val-ratio", "0.2", "--device", "cpu"]  # fmt: skip
    trained = runner.invoke(app, args)
    assert trained.exit_code == 0, trained.output
    assert "2 row(s) relabelled by a later --new-data file" in trained.output
    assert "data/incremental_training_data.jsonl < data/reviewed.jsonl" in trained.output
    manifest = json.loads((project / "out" / "final" / "manifest.json").read_text())
    assert manifest["data"]["new_2"]["path"] == "data/reviewed.jsonl"
    assert manifest["new_data_overlap"]["relabelled"] == 2

    # what it trained on: every reviewed text with the reviewed label, none with the old one
    cfg = TrainConfig(new_data=(Path("data/incremental_training_data.jsonl"), reviewed),
                      model_path=tiny_model_dir, freeze_layers=0)  # fmt: skip
    inputs = prepare_inputs(cfg, lambda _message: None)
    mix = mix_data(inputs.new, inputs.old, replay_ratio=0.5, val_ratio=0.2, seed=42)
    rows = {(e.text, e.label) for e in [*mix.train, *mix.val]}
    assert set(reviewed_rows) <= rows and ("出勤人数", "ATTENDANCE_TODAY") not in rows
    learned = [r for r in reviewed_rows if r in {(e.text, e.label) for e in mix.train}]
    assert len(learned) >= 2
    model, tok = load_classifier(project / "out" / "final")
    labels, _scores = predict(model, tok, [t for t, _ in learned], 8, 32)
    assert labels == [lab for _, lab in learned]

    no_reviewed = runner.invoke(app, [*args[:-2], "--no-reviewed", "--output-path", "out2",
                                      "--epochs", "1", "--device", "cpu"])  # fmt: skip
    assert no_reviewed.exit_code == 0, no_reviewed.output
    manifest = json.loads((project / "out2" / "final" / "manifest.json").read_text())
    assert "new_2" not in manifest["data"]
