"""ftctl harvest: reading logs (ours and another service's), picking, the review file."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import SEED_PAIRS, HarvestConfig
from ftctl.data.harvest import (
    REVIEW_COLUMNS,
    LocalFiles,
    ReadStats,
    from_cell,
    harvest,
    log_files,
    parse_since,
    pick,
    read_log,
    review_csv,
    to_cell,
)
from ftctl.errors import DataError, ExitCode

runner = CliRunner()
CFG = HarvestConfig()


def line(text, label, score, runner_up="SCHEDULE_QUERY", second=0.05, t="2026-11-30T08:00:00Z"):
    rec = {"time": t, "text": text, "label": label, "score": score, "runner_up": runner_up,
           "runner_up_score": second, "sha256": "a" * 64}  # fmt: skip
    return json.dumps(rec, ensure_ascii=False)


def write_log(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def entries(tmp_path, lines, cfg=CFG, since=None):
    log = write_log(tmp_path / "p.jsonl", lines)
    stats = ReadStats()
    return list(read_log(LocalFiles(), str(log), cfg, stats, since)), stats


def test_doubtful_answers_are_picked_for_their_reasons(tmp_path):
    es, _ = entries(tmp_path, [
        line("确定的", "CLOCK_IN", 0.97, second=0.01),  # confident: not picked
        line("分数低", "CLOCK_IN", 0.41, second=0.10),  # low score
        line("两个接近", "ORDER_QUERY", 0.70, second=0.62),  # small margin
        line("打卡的人数", "CLOCK_IN", 0.65, "ATTENDANCE_TODAY", 0.30),  # confused pair
        line("别的对", "CLOCK_IN", 0.65, "ORDER_QUERY", 0.30),  # not a pair: margin 0.35 is ok
    ])  # fmt: skip
    res = pick(es, CFG, SEED_PAIRS)
    got = {c.entry.text: c.reasons for c in res.rows}
    assert got == {
        "分数低": {"low_score"},
        "两个接近": {"small_margin"},
        "打卡的人数": {"confused_pair"},
    }


def test_duplicates_keep_the_most_doubtful_and_count_and_a_label_change_is_a_reason(tmp_path):
    es, _ = entries(tmp_path, [
        line("帮我打卡", "CLOCK_IN", 0.5, second=0.3),
        line("帮我打卡 ", "CLOCK_IN", 0.45, second=0.44),  # same text (spaces), more doubtful
        line("帮我打卡", "CLOCK_IN", 0.9, second=0.05),
        line("今天几个人", "ATTENDANCE_TODAY", 0.95, second=0.01),
        line("今天几个人", "CLOCK_IN", 0.95, second=0.01),  # another model said otherwise
    ])  # fmt: skip
    res = pick(es, CFG, SEED_PAIRS)
    by_text = {c.entry.text.strip(): c for c in res.rows}
    assert by_text["帮我打卡"].seen == 3 and by_text["帮我打卡"].entry.score == 0.45
    assert by_text["今天几个人"].reasons == {"inconsistent"}
    assert res.distinct == 2 and res.doubtful == 2


def test_the_cap_is_shared_across_intents_most_doubtful_first(tmp_path):
    lines = [line(f"打卡{i}", "CLOCK_IN", 0.3 + i / 100, second=0.2) for i in range(20)]
    lines += [line(f"订单{i}", "ORDER_QUERY", 0.3 + i / 100, second=0.2) for i in range(3)]
    es, _ = entries(tmp_path, lines)
    res = pick(es, HarvestConfig(limit=8), SEED_PAIRS)
    assert res.per_intent == {"CLOCK_IN": 5, "ORDER_QUERY": 3}
    kept = [c.entry.text for c in res.rows if c.entry.label == "CLOCK_IN"]
    assert kept == [f"打卡{i}" for i in range(5)]  # the closest margins


def test_texts_already_in_the_data_are_left_out(tmp_path):
    es, _ = entries(tmp_path, [line("帮我打卡", "CLOCK_IN", 0.4), line("查库存", "CLOCK_IN", 0.4)])
    res = pick(es, CFG, SEED_PAIRS, exclude={"帮我打卡"})
    assert [c.entry.text for c in res.rows] == ["查库存"] and res.excluded == 1


def test_another_services_log_with_configured_fields(tmp_path):
    cfg = HarvestConfig(text_field="request.query", label_field="result.intent",
                        scores_field="result.probs", time_field="ts")  # fmt: skip
    rec = {
        "ts": "2026-11-30T01:00:00",
        "request": {"query": "发货统计"},
        "result": {
            "intent": "SHIPMENT_STATS",
            "probs": {"SHIPMENT_STATS": 0.48, "MATERIAL_BATCH_QUERY": 0.40, "X": 0.1},
        },
    }
    es, stats = entries(tmp_path, [json.dumps(rec, ensure_ascii=False), "{cut", "[1]"], cfg)
    (e,) = es
    assert (e.text, e.label, e.score, e.runner_up) == ("发货统计", "SHIPMENT_STATS", 0.48,
                                                       "MATERIAL_BATCH_QUERY")  # fmt: skip
    assert e.runner_up_score == 0.40 and stats.bad_lines == 2
    res = pick(es, cfg, SEED_PAIRS)
    assert res.rows[0].reasons == {"low_score", "small_margin", "confused_pair"}


def test_rotated_and_gzipped_files_are_read_oldest_first(tmp_path):
    log = write_log(tmp_path / "logs" / "p.jsonl", [line("新", "CLOCK_IN", 0.4)])
    write_log(tmp_path / "logs" / "p.jsonl.1", [line("中", "CLOCK_IN", 0.4)])
    (tmp_path / "logs" / "p.jsonl.2.gz").write_bytes(
        gzip.compress((line("旧", "CLOCK_IN", 0.4) + "\n").encode())
    )
    (tmp_path / "logs" / "other.jsonl").write_text("x")
    files = log_files(LocalFiles(), str(log))
    assert [Path(f).name for f in files] == ["p.jsonl.2.gz", "p.jsonl.1", "p.jsonl"]
    stats = ReadStats()
    got = read_log(LocalFiles(), str(log), CFG, stats, None)
    assert [e.text for e in got] == ["旧", "中", "新"]


def test_since_filters_by_time(tmp_path):
    lines = [line("早", "CLOCK_IN", 0.4, t="2026-10-01T00:00:00Z"),
             line("晚", "CLOCK_IN", 0.4, t="2026-11-29T00:00:00Z")]  # fmt: skip
    es, stats = entries(tmp_path, lines, since=parse_since("2026-11-01"))
    assert [e.text for e in es] == ["晚"] and stats.before_since == 1
    assert parse_since("7d", now=86400 * 10) == "1970-01-04T00:00:00"
    with pytest.raises(DataError, match="not a duration"):
        parse_since("last week")


def test_a_log_without_texts_says_why_nothing_can_be_reviewed(tmp_path):
    rec = {"time": "t", "chars": 4, "label": "CLOCK_IN", "score": 0.3}
    log = write_log(tmp_path / "p.jsonl", [json.dumps(rec)])
    with pytest.raises(DataError, match="none of the 1 logged answers has a text") as info:
        harvest([(LocalFiles(), str(log))], CFG, SEED_PAIRS)
    assert "--no-log-texts" in info.value.hint
    with pytest.raises(DataError, match="no log at"):
        harvest([(LocalFiles(), str(tmp_path / "none.jsonl"))], CFG, SEED_PAIRS)


def test_review_file_opens_in_excel_utf8_bom_crlf_and_formulas_escaped(tmp_path):
    es, _ = entries(tmp_path, [line("=1+1 帮我打卡", "CLOCK_IN", 0.4),
                               line('含,逗号和"引号"', "CLOCK_IN", 0.3)])  # fmt: skip
    data = review_csv(pick(es, CFG, SEED_PAIRS).rows)
    assert data.startswith(b"\xef\xbb\xbf") and b"\r\n" in data
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    assert tuple(rows[0]) == REVIEW_COLUMNS and rows[0][-1] == "label"
    texts = [r[0] for r in rows[1:]]
    assert "'=1+1 帮我打卡" in texts and '含,逗号和"引号"' in texts
    assert all(r[-1] == "" for r in rows[1:])
    assert from_cell(to_cell("=1+1")) == "=1+1" and from_cell("'abc") == "'abc"


def _log(tmp_path) -> Path:
    doubtful = line("查一下打卡人数", "CLOCK_IN", 0.52, "ATTENDANCE_TODAY", 0.41)
    return write_log(tmp_path / "p.jsonl", [doubtful, line("好的", "CLOCK_IN", 0.99, second=0.0)])


def test_cli_harvest_of_a_local_log_and_no_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "review.csv"
    args = ["harvest", "--log", str(_log(tmp_path)), "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rows"] == 1 and doc["per_reason"] == {"confused_pair": 1, "low_score": 1,
                                                       "small_margin": 1}  # fmt: skip
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")
    again = runner.invoke(app, args)
    assert again.exit_code == ExitCode.DATA and "exists" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_cli_harvest_writes_a_timestamped_file_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["harvest", "--log", str(_log(tmp_path))])
    assert result.exit_code == 0, result.output
    (made,) = (tmp_path / "data").glob("review-*.csv")
    assert "ftctl data import-review" in result.output and made.name in result.output


def test_cli_help_has_examples():
    for cmd in (["harvest"], ["data", "import-review"]):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0 and "xample" in result.output


# ------------------------------------------------------------------ streaming


def test_lines_split_on_newline_only_and_a_bad_line_is_counted_not_fatal(tmp_path):
    odd = "换行\u2028分隔\u0085也在文本里"  # str.splitlines would cut the line at both
    es, stats = entries(tmp_path, [
        line(odd, "CLOCK_IN", 0.4),
        '{"text": "大数", "label": "CLOCK_IN", "score": ' + "9" * 4400 + "}",  # int() refuses
        '{"text": "断了", "label": "CLO',  # cut by a rotation
        "[" * 100_000 + "]" * 100_000,  # nested too deep
        line("好的", "CLOCK_IN", 0.3),
    ])  # fmt: skip
    assert [e.text for e in es] == [odd, "好的"]
    assert stats.bad_lines == 3 and stats.lines == 5 and ":2: not JSON" in stats.first_bad


def test_a_line_longer_than_the_cap_is_skipped_without_holding_it(tmp_path):
    from ftctl.data.harvest import split_lines

    data = b"a\n" + b"x" * 5000 + b"\nb\n" + b"y" * 5000
    assert list(split_lines(io.BytesIO(data), max_line=1000)) == [b"a", None, b"b", None]


_MEASURE = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
out = proc.stdout.read()
_pid, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
                  "doc": json.loads(out)}))
"""


@pytest.mark.slow
def test_harvest_of_a_200_mb_log_stays_under_100_mb_rss(tmp_path):
    """Memory is constant as the log grows: a 200 MB log (10,000 distinct texts, each seen
    about 100 times, with bad lines among them) is harvested by a child `ftctl harvest` whose
    peak RSS (ru_maxrss) stays under 100 MB."""
    import subprocess
    import sys

    block = "".join(
        line(f"第{i}号批次{'查' * (i % 7)}的情况", "PROCESSING_BATCH_LIST", 0.3 + (i % 60) / 100,
             "MATERIAL_BATCH_QUERY", 0.2, t=f"2026-11-30T08:{i % 60:02d}:00Z") + "\n"
        for i in range(10_000)
    ).encode() + b'{"broken\n' + b'{"n": ' + b"7" * 4400 + b"}\n"  # fmt: skip
    log = tmp_path / "big.jsonl"
    with log.open("wb") as fh:
        while fh.tell() < 200 * 2**20:
            fh.write(block)
    size, repeats = log.stat().st_size, log.stat().st_size // len(block)
    cmd = [sys.executable, "-m", "ftctl", "harvest", "--log", str(log), "--out",
           str(tmp_path / "r.csv"), "--json", "--limit", "50"]  # fmt: skip
    res = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True,
                         timeout=1200, check=True)  # fmt: skip
    got = json.loads(res.stdout)
    assert got["rc"] == 0, res.stderr
    assert size >= 200 * 2**20 and got["doc"]["answers"] == 10_000 * repeats
    assert got["doc"]["bad_lines"] == 2 * repeats and got["doc"]["distinct"] == 10_000
    assert got["maxrss_kb"] < 100 * 1024, f"peak RSS {got['maxrss_kb'] / 1024:.0f} MB"


def test_cli_harvest_closes_the_first_host_when_the_second_cannot_be_reached(tmp_path, monkeypatch):
    from ftctl.cli import ssh
    from ftctl.errors import EnvironmentProblem

    monkeypatch.chdir(tmp_path)
    closed = []

    class Conn:
        def close(self):
            closed.append("web1")

    def connector(cfg, accept_host_key, accept_new):
        def connect(spec):
            if spec.host == "web2":
                raise EnvironmentProblem("cannot reach web2", hint="check the network")
            return Conn()

        return connect

    monkeypatch.setattr(ssh, "connector", connector)
    hosts = ["--host", "deploy@web1", "--host", "deploy@web2"]
    result = runner.invoke(app, ["harvest", *hosts, "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == ExitCode.ENVIRONMENT, result.output
    assert "cannot reach web2" in result.output
    assert closed == ["web1"]
    assert not (tmp_path / "r.csv").exists()
