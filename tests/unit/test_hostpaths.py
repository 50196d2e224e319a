"""Container paths back to host paths (ftctl/hostpaths.py). The real engine runs the same code
in tests/integration/test_docker_runs.py."""

from __future__ import annotations

import io
import json

import pytest

from ftctl.hostpaths import (
    ENV_VAR,
    HostPathJsonWriter,
    HostPathWriter,
    PathTable,
    record_host_paths,
)

TABLE = PathTable.of(
    {
        "/workspace/data": "/home/u/项目/data",
        "/workspace/models": "/home/u/项目/models",
        "/mnt/host/1-dk": "/tmp/dk",
        "/mnt/host/11-dk": "/srv/other dk",
        "/mnt/host/0-my.toml": '/etc/we"ird\\cfg.toml',
    }
)


@pytest.mark.parametrize(
    ("inner", "shown"),
    [
        ("wrote /mnt/host/1-dk/final  (best epoch 1)", "wrote /tmp/dk/final  (best epoch 1)"),
        ("/mnt/host/11-dk/final", "/srv/other dk/final"),
        ("error: /workspace/data/bad.jsonl:3: x", "error: /home/u/项目/data/bad.jsonl:3: x"),
        ("hint: `ftctl train --output-path /mnt/host/1-dk --resume`",
         "hint: `ftctl train --output-path /tmp/dk --resume`"),
        ("'/workspace/models/a b'", "'/home/u/项目/models/a b'"),
        ("(/workspace/data)", "(/home/u/项目/data)"),
        ("--new-data=/workspace/data/x", "--new-data=/home/u/项目/data/x"),
        # not under a mount: a path made inside the container, or a user's text: as it is
        ("cache in /tmp/huggingface/x", None),
        ("/workspace/datax/a", None),
        ("/workspace/out", None),
        ("'/help' 请打开 /home 查看", None),
        # already a host path of the table: left alone
        ("see /tmp/dk/final", "see /tmp/dk/final"),
        # not paths
        ("12.5 it/s, 3/4 done, http://host:8000/predict, a / b", None),
    ],
)  # fmt: skip
def test_text_maps_paths_under_a_mount_and_nothing_else(inner, shown):
    assert TABLE.rewrite_text(inner) == (inner if shown is None else shown)


def test_host_path_is_exact_and_prefers_the_longest_mount():
    table = PathTable.of({"/workspace": "/p", "/workspace/data": "/d"})
    assert table.host_path("/workspace/data/x.jsonl") == "/d/x.jsonl"
    assert table.host_path("/workspace/models") == "/p/models"
    assert table.host_path("/workspace-2/x") is None
    assert TABLE.host_path("/mnt/host/1-dk") == "/tmp/dk"


def test_writer_rewrites_lines_split_anywhere_even_inside_a_utf8_character():
    text = "写入 /workspace/data/新.jsonl\n第二行 /mnt/host/1-dk\n没有换行的尾 /mnt/host/1-dk/f"
    data = text.encode()
    for size in (1, 2, 3, 5, 7):
        sink = io.BytesIO()
        writer = HostPathWriter(TABLE, sink)
        for i in range(0, len(data), size):
            writer.write(data[i : i + size])
        writer.close()
        assert sink.getvalue().decode() == (
            "写入 /home/u/项目/data/新.jsonl\n第二行 /tmp/dk\n没有换行的尾 /tmp/dk/f"
        )


def test_writer_passes_bytes_that_are_not_utf8_through_unchanged():
    sink = io.BytesIO()
    writer = HostPathWriter(TABLE, sink)
    writer.write(b"\xff\xfe /workspace/data/x\n")
    writer.close()
    assert sink.getvalue() == b"\xff\xfe /home/u/\xe9\xa1\xb9\xe7\x9b\xae/data/x\n"


def test_writer_waits_for_the_end_of_a_line_but_not_forever():
    sink = io.BytesIO()
    writer = HostPathWriter(TABLE, sink)
    writer.write(b"no newline yet /mnt/host/1-dk")
    assert sink.getvalue() == b""
    writer.write(b" " + b"x" * (1 << 17))
    assert sink.getvalue().startswith(b"no newline yet /tmp/dk")


def test_json_document_maps_its_path_fields_and_stays_valid():
    doc = {
        "final_dir": "/mnt/host/1-dk/final",
        "config": "/mnt/host/0-my.toml",
        "report_dir": "/opt/x",
        "made": "/opt/x",
        "warnings": ["see /workspace/data/a.jsonl:2"],
    }
    sink = io.BytesIO()
    writer = HostPathJsonWriter(TABLE, sink)
    raw = json.dumps(doc).encode()
    writer.write(raw[:10])
    writer.write(raw[10:])
    writer.close()
    back = json.loads(sink.getvalue())
    assert back["final_dir"] == "/tmp/dk/final"
    assert back["config"] == '/etc/we"ird\\cfg.toml'  # a quote and a backslash: still JSON
    assert back["report_dir"] == "container:/opt/x"  # a path ftctl wrote, made inside
    assert back["made"] == "/opt/x"  # not a path field: as it is
    assert back["warnings"] == ["see /home/u/项目/data/a.jsonl:2"]  # ftctl's message: as the log


UTTERANCES = ["/help", "请打开 /home", "/workspace/data", "打开 /mnt/host/1-dk 文件夹", "/tmp"]


def test_json_leaves_user_texts_alone_even_in_eval_flips_and_errors():
    """Utterances are data, whatever they look like: in an evaluation's flips, in rows, in a
    data error's problems; only the path fields and ftctl's messages are touched."""
    doc = {
        "ok": False,
        "flips": {"broke": [{"text": t, "expected": "HELP", "base": "HELP", "candidate": "X"}
                            for t in UTTERANCES]},
        "rows": [{"text": t, "label": "/label"} for t in UTTERANCES],
        "problems": [{"file": "/workspace/data/bad.jsonl", "line": 3, "message": "no label"}],
        "history": [{"epoch": 1, "note": "/workspace/data/a.jsonl"}],
    }  # fmt: skip
    back = TABLE.rewrite_json(doc)
    assert back["flips"] == doc["flips"] and back["rows"] == doc["rows"]
    assert back["history"] == doc["history"]
    assert back["problems"][0]["file"] == "/home/u/项目/data/bad.jsonl"
    sink = io.BytesIO()
    writer = HostPathJsonWriter(TABLE, sink)
    writer.write(json.dumps(doc, ensure_ascii=False).encode())
    writer.close()
    assert json.loads(sink.getvalue())["flips"] == doc["flips"]


@pytest.mark.parametrize("text", [*UTTERANCES[:2], "请打开 /home 和 /help"])
def test_the_log_leaves_utterances_alone(text):
    """A warning quoting a user's text (e.g. a row dropped as all-[UNK]) keeps it whole."""
    line = f"warning: 1 text(s) are all [UNK] (first: /workspace/data/n.jsonl:4 '{text}')\n"
    sink = io.BytesIO()
    writer = HostPathWriter(TABLE, sink)
    writer.write(line.encode())
    writer.close()
    assert sink.getvalue().decode() == line.replace("/workspace/data", "/home/u/项目/data")


def test_json_writer_falls_back_to_text_when_the_output_is_not_json():
    sink = io.BytesIO()
    writer = HostPathJsonWriter(TABLE, sink)
    writer.write(b"Traceback: /workspace/data/x\n")
    writer.close()
    assert sink.getvalue() == "Traceback: /home/u/项目/data/x\n".encode()


def test_manifest_payload_records_host_paths_from_the_environment(monkeypatch):
    payload = {
        "base_model": {"path": "/mnt/host/1-dk/base", "sha256": "ab"},
        "data": {"new": {"path": "/workspace/data/new.jsonl"}, "old": None},
        "hyperparameters": {"new_data": "/workspace/data/new.jsonl", "lr": 5e-6},
        "data_overlap": {"relabelled_rows": [
            {"text": "/workspace/data", "label": "A", "new": "/workspace/data/new.jsonl:2"}
        ]},
        "device": "cpu",
        "note": "text with /workspace/data inside is not a path value",
    }  # fmt: skip
    assert record_host_paths(payload, None) == payload  # outside --docker: unchanged
    monkeypatch.setenv(ENV_VAR, TABLE.to_env())
    recorded = record_host_paths(payload)
    assert recorded["base_model"] == {"path": "/tmp/dk/base", "sha256": "ab"}
    assert recorded["data"]["new"]["path"] == "/home/u/项目/data/new.jsonl"
    assert recorded["note"] == payload["note"]
    assert recorded["hyperparameters"]["new_data"] == "/home/u/项目/data/new.jsonl"
    (row,) = recorded["data_overlap"]["relabelled_rows"]
    assert row["text"] == "/workspace/data"  # a user's text that is exactly a mount: as it is
    assert row["new"] == "/home/u/项目/data/new.jsonl:2"
    assert PathTable.from_env() == TABLE
    monkeypatch.setenv(ENV_VAR, "not json")
    assert PathTable.from_env() is None


def test_write_manifest_records_host_paths(tmp_path, monkeypatch):
    from ftctl.manifest import read_manifest, write_manifest

    monkeypatch.setenv(ENV_VAR, TABLE.to_env())
    (tmp_path / "w.bin").write_bytes(b"x")
    write_manifest(tmp_path, {"data": {"new": {"path": "/workspace/data/n.jsonl"}}})
    assert read_manifest(tmp_path)["data"]["new"]["path"] == "/home/u/项目/data/n.jsonl"
