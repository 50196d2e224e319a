"""The service's parts driven directly: predictor, holder, batcher, prediction log, request
parsing, settings. (tests/integration/test_serve.py drives the real process.)"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from ftctl.config import ServeConfig, check
from ftctl.errors import ConfigError
from ftctl.manifest import model_digest
from ftctl.serve import (
    Batcher,
    Limits,
    ModelHolder,
    Overloaded,
    Prediction,
    PredictionLog,
    load_predictor,
    prediction_log_path,
)
from ftctl.serve.app import HTTPError, parse_request, read_body
from ftctl.serve.server import bind, inherited_sockets, no_delay
from tests.helpers import INTENTS, make_tiny_model

TEXTS = ["帮我打卡", "查看在产批次的详细情况和负责人", "发货", "今天出勤了多少人？", "库存"]


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    import torch

    torch.set_num_threads(1)
    return load_predictor(tiny_model_dir, device="cpu", batch_size=2)


# --------------------------------------------------------------------------- predictor


def test_predictor_gives_top2_in_input_order_whatever_the_batching(predictor):
    together = predictor.predict(TEXTS)  # 3 length-sorted passes of at most 2 texts
    alone = [predictor.predict([t])[0] for t in TEXTS]
    for a, b in zip(together, alone, strict=True):
        assert a.label == b.label and a.runner_up == b.runner_up
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.label in INTENTS and a.runner_up in INTENTS and a.runner_up != a.label
        assert 0 < a.runner_up_score <= a.score <= 1


def test_predictor_keeps_the_model_on_its_device(predictor):
    before = next(predictor.model.parameters()).data_ptr()
    predictor.predict(TEXTS)
    assert next(predictor.model.parameters()).data_ptr() == before  # never copied or moved


def test_a_one_label_model_has_no_runner_up(tmp_path):
    p = load_predictor(make_tiny_model(tmp_path / "one", labels=["ONLY"]), device="cpu")
    (pred,) = p.predict(["随便"])
    assert pred.label == "ONLY" and pred.score == pytest.approx(1.0)
    assert pred.runner_up is None and pred.runner_up_score is None


# --------------------------------------------------------------------------- holder


@pytest.fixture
def link(tmp_path, tiny_model_dir):
    rel = tmp_path / "rel1"
    shutil.copytree(tiny_model_dir, rel)
    (tmp_path / "final").symlink_to(rel)
    return tmp_path / "final"


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name("final.tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_holder_reload_follows_the_link_and_a_broken_model_keeps_the_old(link, tmp_path):
    events: list[dict] = []
    holder = ModelHolder(link, device="cpu", log=events.append)
    old = holder.current.sha256
    rel2 = make_tiny_model(tmp_path / "rel2", seed=7)
    new = model_digest(rel2)
    _point(link, rel2)
    assert holder.reload()
    assert holder.current.sha256 == new != old
    h = holder.health()
    assert h["reload"]["state"] == "ok" and h["reload"]["sha256"] == new
    (rel2 / "config.json").write_text("{broken", encoding="utf-8")
    assert not holder.reload()
    h = holder.health()
    assert h["sha256"] == new  # still serving the one that loaded
    assert h["reload"]["state"] == "failed" and h["reload"]["model_dir"] == str(rel2)
    assert "config.json" in h["last_reload_error"]
    assert (h["reload_attempts"], h["reloads"], h["reload_failures"]) == (2, 1, 1)
    assert [e["event"] for e in events] == ["reloaded", "reload_failed"]


def test_reload_requests_while_one_runs_coalesce_into_one_more(link):
    holder = ModelHolder(link, device="cpu")
    for _ in range(5):
        holder.request_reload()
    assert holder.health()["reloading"]
    holder.wait_reloads(60)
    assert holder.reload_attempts == 2 and holder.reloads == 2
    assert not holder.health()["reloading"]


# --------------------------------------------------------------------------- batcher


class _Holder:
    def __init__(self, predictor):
        self.current = predictor


class _Recorder:
    """A stand-in predictor that records each call (a unit test of the batching logic)."""

    sha256 = "f" * 64

    def __init__(self, fail_on: str | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.delay = delay

    def predict(self, texts):
        self.calls.append(list(texts))
        time.sleep(self.delay)
        if self.fail_on in texts:
            raise ValueError(f"cannot take {self.fail_on}")
        return [Prediction(f"L-{t}", 0.9, "R", 0.1) for t in texts]


def test_concurrent_requests_become_one_batch_with_each_answer_in_place(predictor):
    logged: list = []
    b = Batcher(_Holder(predictor), max_wait=0.3,
                on_batch=lambda t, p, s: logged.append((t, p, s))).start()  # fmt: skip
    try:
        futures = [b.submit([t]) for t in TEXTS[:3]] + [b.submit(TEXTS[3:])]
        answers = [f.result(30) for f in futures]
    finally:
        b.stop(10)
    assert b.stats()["batches"] == 1 and b.stats()["largest_batch"] == len(TEXTS)
    alone = predictor.predict(TEXTS)
    got = [p for a in answers for p in a.predictions]
    assert [p.label for p in got] == [p.label for p in alone]
    assert all(a.sha256 == predictor.sha256 for a in answers)
    assert logged[0][0] == TEXTS and logged[0][2] == predictor.sha256


def test_under_load_the_queue_is_taken_without_waiting_and_split_at_max_batch():
    rec = _Recorder(delay=0.2)
    b = Batcher(_Holder(rec), max_batch=4, max_wait=0.0).start()
    try:
        first = b.submit(["a"])
        time.sleep(0.05)  # the model is busy with "a"; these queue up meanwhile
        rest = [b.submit([t]) for t in "bcdefg"]
        for f in [first, *rest]:
            f.result(10)
    finally:
        b.stop(10)
    assert rec.calls == [["a"], ["b", "c", "d", "e"], ["f", "g"]]


def test_a_full_queue_is_refused_at_once():
    b = Batcher(_Holder(_Recorder()), max_pending=3)  # not started: nothing drains it
    b.submit(["a", "b"])
    with pytest.raises(Overloaded, match="2 texts are waiting"):
        b.submit(["c", "d"])
    b.submit(["c"])


def test_one_failing_request_does_not_fail_the_others_of_its_batch():
    rec = _Recorder(fail_on="BOOM")
    errors: list[dict] = []
    b = Batcher(_Holder(rec), max_wait=0.3, on_error=errors.append).start()
    try:
        good, bad = b.submit(["ok"]), b.submit(["BOOM"])
        assert good.result(10).predictions[0].label == "L-ok"
        with pytest.raises(ValueError, match="BOOM"):
            bad.result(10)
    finally:
        b.stop(10)
    assert rec.calls == [["ok", "BOOM"], ["ok"], ["BOOM"]]
    assert errors and errors[0]["event"] == "predict_failed"


def test_a_cancelled_request_is_not_computed_and_stop_answers_what_is_queued():
    rec = _Recorder()
    b = Batcher(_Holder(rec), max_wait=0.0)
    gone, kept = b.submit(["gone"]), b.submit(["kept"])
    assert gone.cancel()
    b.start()
    b.stop(10)
    assert kept.result(0).predictions[0].label == "L-kept"
    assert rec.calls == [["kept"]]
    with pytest.raises(Overloaded, match="shutting down"):
        b.submit(["late"])


def test_a_log_that_fails_does_not_fail_the_answer():
    def broken_log(*_):
        raise OSError("disk full")

    errors: list[dict] = []
    b = Batcher(_Holder(_Recorder()), on_batch=broken_log, on_error=errors.append).start()
    try:
        assert b.submit(["x"]).result(10).predictions[0].label == "L-x"
    finally:
        b.stop(10)
    assert errors[0]["event"] == "log_failed" and "disk full" in errors[0]["error"]


# --------------------------------------------------------------------------- prediction log

P = Prediction("CLOCK_IN", 0.91234567, "ATTENDANCE_TODAY", 0.05)


def test_prediction_log_lines_and_rotation(tmp_path):
    path = tmp_path / "logs" / "predictions.jsonl"
    log = PredictionLog(path, max_bytes=600, backups=2)
    for i in range(12):
        log.write([f"帮我打卡{i}"], [P], "a" * 64)
    log.close()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["predictions.jsonl", "predictions.jsonl.1", "predictions.jsonl.2"]
    rec = json.loads(path.read_text(encoding="utf-8").splitlines()[-1])
    assert rec["text"] == "帮我打卡11" and rec["score"] == 0.9123 and rec["runner_up_score"] == 0.05
    assert rec["label"] == "CLOCK_IN" and rec["runner_up"] == "ATTENDANCE_TODAY"
    assert all(p.stat().st_size <= 600 for p in path.parent.iterdir())


def test_prediction_log_without_texts_and_without_backups(tmp_path):
    path = tmp_path / "p.jsonl"
    log = PredictionLog(path, log_texts=False, max_bytes=300, backups=0)
    for _ in range(5):
        log.write(["秘密"], [P], "a" * 64)
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]
    rec = json.loads(path.read_text().splitlines()[0])
    assert "text" not in rec and rec["chars"] == 2


def test_prediction_log_survives_its_directory_being_removed(tmp_path):
    errors: list[dict] = []
    path = tmp_path / "logs" / "p.jsonl"
    log = PredictionLog(path, max_bytes=200, on_error=errors.append)
    log.write(["a"], [P], "a" * 64)
    shutil.rmtree(tmp_path / "logs")
    for _ in range(3):
        log.write(["b"], [P], "a" * 64)  # rotation fails: reported once, never raised
    assert len(errors) == 1 and "cannot rotate" in errors[0]["error"]
    assert not (tmp_path / "logs").exists()  # nothing recreated behind the deployer's back
    log.reopen()  # SIGHUP: a fresh file
    log.write(["c"], [P], "a" * 64)
    assert json.loads(path.read_text())["text"] == "c"


def test_prediction_log_path_defaults_beside_the_link(tmp_path):
    cfg = ServeConfig(model_path=tmp_path / "srv" / "final")
    assert prediction_log_path(cfg) == str(tmp_path / "srv" / "logs" / "predictions.jsonl")
    assert prediction_log_path(ServeConfig(model_path=Path("x"), prediction_log="off")) is None
    assert prediction_log_path(ServeConfig(model_path=Path("x"), prediction_log="/l.j")) == "/l.j"


# --------------------------------------------------------------------------- requests

LIM = Limits(max_texts=3, max_chars=10, max_body=100, body_timeout=0.2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (b'"text"', "expected"),
        (b'{"text": "a", "texts": ["b"]}', "expected"),
        (b'{"text": null}', '"text" must be a string, got NoneType'),
        (b'{"text": ""}', '"text" is empty'),
        (b'{"text": "12345678901"}', "11 characters, over 10"),
        (b'{"text": "\\udc80"}', "lone surrogate at character 0"),
        (b'{"texts": ["a", "b", "c", "d"]}', "list of 1 to 3"),
        (b'{"texts": ["a", 2]}', '"texts[1]" must be a string, got int'),
    ],
)
def test_parse_request_names_the_problem(body, message):
    with pytest.raises(HTTPError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        parse_request(body, LIM)
    assert info.value.status == 400


def test_parse_request_accepts_both_forms():
    assert parse_request(b'{"text": "a"}', LIM) == (["a"], True)
    assert parse_request('{"texts": ["甲", "乙"]}'.encode(), LIM) == (["甲", "乙"], False)


def _receive(chunks, *, stall: bool = False):
    queue = list(chunks)

    async def receive():
        if not queue:
            if stall:
                await asyncio.sleep(10)
            return {"type": "http.disconnect"}
        body = queue.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(queue) or stall}

    return receive


def _scope(length: int | None):
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"headers": headers}


def test_read_body_drains_an_oversized_body_then_413():
    chunks = [b"x" * 60] * 5  # 300 bytes, limit 100: all of it read, then refused
    receive = _receive(chunks)
    with pytest.raises(HTTPError) as info:
        asyncio.run(read_body(receive, _scope(None), LIM))
    assert info.value.status == 413 and info.value.close


def test_read_body_refuses_a_huge_declared_length_without_reading():
    with pytest.raises(HTTPError) as info:
        asyncio.run(read_body(_receive([]), _scope(10**9), LIM))
    assert info.value.status == 413


def test_read_body_times_out_with_408():
    t0 = time.monotonic()
    with pytest.raises(HTTPError) as info:
        asyncio.run(read_body(_receive([b"{"], stall=True), _scope(50), LIM))
    assert info.value.status == 408 and time.monotonic() - t0 < 1.0


def test_read_body_returns_the_body():
    assert asyncio.run(read_body(_receive([b'{"te', b'xt": 1}']), _scope(12), LIM)) == (
        b'{"text": 1}'
    )


# --------------------------------------------------------------------------- settings


def test_serve_settings_are_validated_together():
    with pytest.raises(ConfigError) as info:
        check(ServeConfig(port=70000, device="tpu", batch_size=0, batch_wait_ms=-1))
    fields = {p.field for p in info.value.problems}
    assert fields == {"serve.port", "serve.device", "serve.batch_size", "serve.batch_wait_ms"}


def test_no_inherited_socket_unless_listen_pid_is_ours(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert inherited_sockets() == []
    assert os.environ["LISTEN_FDS"] == "1"  # not ours: left for whom it is meant


def test_sighup_handler_only_sets_a_flag():
    import signal

    from ftctl.serve.server import PendingSignal

    before = signal.getsignal(signal.SIGHUP)
    try:
        early = PendingSignal(signal.SIGHUP).install()
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not early.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert early.pending
    finally:
        signal.signal(signal.SIGHUP, before)


def test_reload_from_many_threads_is_safe(link):
    holder = ModelHolder(link, device="cpu")
    threads = [threading.Thread(target=holder.request_reload) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    holder.wait_reloads(60)
    assert 1 <= holder.reload_attempts <= 2 and holder.reload_failures == 0


def test_accepted_connections_get_tcp_nodelay():
    """A socket from socket.create_server (proto 0) is one asyncio leaves with Nagle on: the
    service's protocol (connection_made) turns it off for every connection it accepts."""
    import socket

    listener = bind("127.0.0.1", 0, 8)
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        assert conn.proto == 0  # what asyncio checks before it sets TCP_NODELAY itself
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        no_delay(conn)
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    finally:
        client.close()
        conn.close()
        listener.close()
