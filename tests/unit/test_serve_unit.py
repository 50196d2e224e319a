"""The service's parts driven directly: predictor, holder, batcher, prediction log, request
parsing, settings. (tests/integration/test_serve.py drives the real process.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
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
    EventLog,
    Limits,
    ModelHolder,
    Overloaded,
    Prediction,
    PredictionLog,
    load_predictor,
    prediction_log_path,
)
from ftctl.serve.app import HTTPError, parse_request, read_body
from ftctl.serve.server import bind, inherited_sockets
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


def test_a_reload_whose_log_raises_still_finishes_and_the_next_one_works(link, tmp_path):
    """stderr on a full disk: reload_failed cannot be written. The thread must not die with
    `reloading` stuck: the next SIGHUP loads the next release."""

    def broken_stderr(_event):
        raise OSError(28, "No space left on device")

    holder = ModelHolder(link, device="cpu", log=broken_stderr)
    broken = tmp_path / "broken"
    shutil.copytree(link, broken)
    (broken / "config.json").write_text("{", encoding="utf-8")
    _point(link, broken)
    holder.request_reload()
    holder.wait_reloads(60)
    h = holder.health()
    assert h["reload"]["state"] == "failed" and not h["reloading"]
    good = make_tiny_model(tmp_path / "good", seed=7)
    _point(link, good)
    holder.request_reload()
    holder.wait_reloads(60)
    assert holder.health()["sha256"] == model_digest(good) and holder.failure() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_reload_thread_that_dies_anyway_is_reported(link, monkeypatch):
    class Fatal(BaseException):
        pass

    holder = ModelHolder(link, device="cpu")

    def die():
        raise Fatal("injected")

    monkeypatch.setattr(holder, "reload", die)
    holder.request_reload()
    for thread in threading.enumerate():  # ended, its exception reported (within this test)
        if thread.name == "ftctl-reload":
            thread.join(10)
    assert "the reload thread died: Fatal: injected" in holder.failure()
    assert not holder.health()["reloading"]


# --------------------------------------------------------------------------- batcher


class _Holder:
    def __init__(self, predictor):
        self.current = predictor
        self.batch_lock = threading.Lock()


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
    b = Batcher(_Holder(predictor), on_batch=lambda t, p, s: logged.append((t, p, s)))
    try:
        futures = [b.submit([t]) for t in TEXTS[:3]] + [b.submit(TEXTS[3:])]
        b.start()  # all four are queued when the model thread first looks
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
    b = Batcher(_Holder(rec), on_error=errors.append)
    try:
        good, bad = b.submit(["ok"]), b.submit(["BOOM"])
        b.start()
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


def test_the_model_thread_survives_an_on_error_that_raises():
    """stderr on a full disk: every report raises. The failing request gets its error, the
    thread goes on, and the next request is answered."""

    def broken_stderr(_event):
        raise OSError(28, "No space left on device")

    rec = _Recorder(fail_on="BOOM")
    b = Batcher(_Holder(rec), on_error=broken_stderr, on_batch=lambda *a: 1 / 0).start()
    try:
        with pytest.raises(ValueError, match="BOOM"):
            b.submit(["BOOM"]).result(10)
        assert b.submit(["after"]).result(10).predictions[0].label == "L-after"
        assert b.failure() is None
    finally:
        b.stop(10)


class _Raising(_Holder):
    """A holder whose model cannot even be read: a bug outside predict()."""

    def __init__(self, predictor, error):
        super().__init__(predictor)
        self._error, self.raise_next = error, False

    @property
    def current(self):
        if self.raise_next:
            self.raise_next = False
            raise self._error
        return self._predictor

    @current.setter
    def current(self, value):
        self._predictor = value


def test_a_batch_that_fails_outside_predict_answers_its_requests_and_serving_goes_on():
    errors: list[dict] = []
    holder = _Raising(_Recorder(), RuntimeError("a bug"))
    b = Batcher(holder, on_error=errors.append)
    holder.raise_next = True
    first = b.submit(["x"])
    b.start()
    try:
        with pytest.raises(RuntimeError, match="a bug"):
            first.result(10)
        assert b.submit(["y"]).result(10).predictions[0].label == "L-y"
    finally:
        b.stop(10)
    assert errors[0]["event"] == "batch_failed" and b.failure() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_model_thread_that_dies_anyway_fails_what_waits_and_says_so():
    class Fatal(BaseException):
        pass

    holder = _Raising(_Recorder(delay=0.2), Fatal("injected"))
    b = Batcher(holder)
    holder.raise_next = True
    running = b.submit(["x"])
    b.start()
    with pytest.raises(RuntimeError, match="the model thread died: Fatal: injected"):
        running.result(10)
    b._thread.join(10)  # ended, its exception reported (within this test)
    assert "the model thread died: Fatal: injected" in b.failure()
    with pytest.raises(Overloaded, match="the model thread died"):
        b.submit(["late"])  # refused at once, not left to time out


def test_admission_refuses_at_once_what_cannot_be_answered_in_time():
    """The measured rate x predict_timeout bounds the queue; a refusal says when to retry;
    a request that finds the queue empty is always taken."""
    b = Batcher(_Holder(_Recorder()), max_batch=4, max_pending=1000, predict_timeout=2.0)
    b.rate.add(10, 1.0)  # measured: 10 texts/s, so 2 s x 0.8 -> 16 texts may wait
    assert b.admit_limit() == 16
    b.submit(["t"] * 10)
    b.submit(["t"] * 6)
    with pytest.raises(Overloaded, match=r"16 texts are waiting .* 1\.6 s of work") as info:
        b.submit(["t"] * 5)
    assert info.value.retry_after == 1  # (16 + 5 - 16) / 10 texts/s, rounded up
    with pytest.raises(Overloaded) as info:
        b.submit(["t"] * 40)
    assert info.value.retry_after == 4
    assert b.stats()["refused"] == 2 and b.pending == 16
    alone = Batcher(_Holder(_Recorder()), max_pending=1000, predict_timeout=0.001)
    alone.rate.add(1, 10.0)
    alone.submit(["t"] * 200)  # more than fits in time, but nothing waits before it


def test_a_cancelled_request_leaves_the_queue_at_once():
    b = Batcher(_Holder(_Recorder()), max_pending=10)
    gone = b.submit(["a"] * 8)
    assert b.pending == 8
    assert gone.cancel()  # the client left, or its time ran out
    assert b.pending == 0 and b.stats()["cancelled"] == 1
    b.submit(["b"] * 10)  # room again


def test_one_client_never_waits_for_company_but_many_are_gathered():
    """max_wait is huge here: a lone client that waited would time out. After a batch of 3
    requests, the next 3 arriving one by one are gathered into one batch."""
    rec = _Recorder()
    b = Batcher(_Holder(rec), max_wait=30.0).start()
    try:
        for t in "abc":
            b.submit([t]).result(5)  # one at a time: no wait
        batch = [b.submit([t]) for t in "xyz"]  # the system held 3 requests ...
        [f.result(5) for f in batch]
        later = []
        for t in "123":  # ... so the next ones, arriving apart, are waited for
            later.append(b.submit([t]))
            time.sleep(0.05)
        [f.result(35) for f in later]
    finally:
        b.stop(10)
    assert rec.calls[:3] == [["a"], ["b"], ["c"]]
    assert rec.calls[-1] == ["1", "2", "3"]


class _Slow:
    """The real predictor, slower, under another name."""

    def __init__(self, predictor, sha256: str, delay: float) -> None:
        self._p, self.sha256, self.delay, self.calls = predictor, sha256, delay, []

    def __getattr__(self, name: str):
        return getattr(self._p, name)

    def predict(self, texts):
        self.calls.append(list(texts))
        time.sleep(self.delay)
        return self._p.predict(texts)


def test_the_swap_waits_for_the_batch_so_health_names_the_model_answering(link):
    holder = ModelHolder(link, device="cpu")
    old, new = _Slow(holder.current, "d" * 64, 0.5), _Slow(holder.current, "e" * 64, 0.0)
    holder.current = old
    b = Batcher(holder).start()
    try:
        answer = b.submit(["x"])
        _until(lambda: old.calls)  # the batch runs on the old model
        swapper = threading.Thread(target=holder.swap, args=(new,))
        swapper.start()
        time.sleep(0.1)
        assert holder.health()["sha256"] == old.sha256  # not swapped under a running batch
        assert answer.result(10).sha256 == old.sha256
        swapper.join(10)
        assert holder.health()["sha256"] == new.sha256
        assert b.submit(["y"]).result(10).sha256 == new.sha256
    finally:
        b.stop(10)


# --------------------------------------------------------------------------- prediction log

P = Prediction("CLOCK_IN", 0.91234567, "ATTENDANCE_TODAY", 0.05)


def test_prediction_log_lines_and_rotation(tmp_path):
    path = tmp_path / "logs" / "predictions.jsonl"
    log = PredictionLog(path, max_bytes=600, backups=2)
    for i in range(12):
        log.write([f"帮我打卡{i}"], [P], "a" * 64)
    log.close()
    assert log.status() == "ok" and log.dropped == 0
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


def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _texts(path: Path) -> list[str]:
    return [json.loads(x)["text"] for x in path.read_text(encoding="utf-8").splitlines()]


def test_prediction_log_waits_for_its_directory_and_writes_once_reopened(tmp_path):
    """A removed directory: nothing is written into an unlinked file, nothing recreated
    behind the deployer's back; the lines wait, /health's status says so, SIGHUP's reopen
    makes the directory and the lines are written."""
    errors: list[dict] = []
    path = tmp_path / "logs" / "p.jsonl"
    log = PredictionLog(path, on_error=errors.append, retry=(0.02, 0.05))
    log.write(["a"], [P], "a" * 64)
    assert log.flush(10)
    shutil.rmtree(tmp_path / "logs")
    log.write(["b"], [P], "a" * 64)
    _until(lambda: log.status().startswith("failing since"))
    assert "cannot open" in log.status() and "No such file" in log.status()
    assert [e["event"] for e in errors] == ["prediction_log_error"]
    time.sleep(0.2)  # retried meanwhile, reported once
    assert len(errors) == 1 and not (tmp_path / "logs").exists()
    log.reopen()  # SIGHUP
    assert log.flush(10) and log.status() == "ok"
    assert _texts(path) == ["b"]
    assert errors[-1]["event"] == "prediction_log_ok" and errors[-1]["dropped"] == 0
    log.close()


def test_prediction_log_retries_a_failed_rotation(tmp_path):
    """The rotation fails (here: path.1 is a directory, as a disk full at a rotation would):
    the lines are kept and the rotation tried again until it works."""
    path = tmp_path / "p.jsonl"
    log = PredictionLog(path, max_bytes=300, backups=1, retry=(0.02, 0.05))
    log.write(["一"], [P], "a" * 64)
    assert log.flush(10)
    (tmp_path / "p.jsonl.1").mkdir()
    log.write(["二"], [P], "a" * 64)  # over 300 bytes: rotate, which fails
    _until(lambda: "cannot rotate" in log.status())
    (tmp_path / "p.jsonl.1").rmdir()
    assert log.flush(10) and log.status() == "ok"
    log.close()
    assert _texts(tmp_path / "p.jsonl.1") == ["一"] and _texts(path) == ["二"]


def test_prediction_log_trims_a_short_write_to_whole_lines_and_writes_the_rest(
    tmp_path, monkeypatch
):
    """The disk fills up mid-write: the cut line is trimmed away, the rest written later."""
    import ftctl.serve.predlog as predlog

    real_write, calls = os.write, []

    def short_once(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2 + 7])  # stops mid-line
        return real_write(fd, data)

    monkeypatch.setattr(predlog.os, "write", short_once)
    path = tmp_path / "p.jsonl"
    log = PredictionLog(path, retry=(0.02, 0.05))
    log.write(["甲", "乙", "丙", "丁"], [P] * 4, "a" * 64)
    assert log.flush(10) and log.status() == "ok"
    log.close()
    assert _texts(path) == ["甲", "乙", "丙", "丁"]  # every line whole, none twice
    assert len(calls) == 2


def test_prediction_log_never_blocks_the_caller_and_drops_past_its_bound(tmp_path, monkeypatch):
    import ftctl.serve.predlog as predlog

    real_write, release = os.write, threading.Event()

    def stuck(fd, data):
        release.wait(30)
        return real_write(fd, data)

    monkeypatch.setattr(predlog.os, "write", stuck)
    path = tmp_path / "p.jsonl"
    log = PredictionLog(path, max_queued=3)
    log.write(["一"], [P], "a" * 64)
    _until(lambda: not log._queue)  # the writer took it and is stuck in write()
    caller = threading.Thread(target=lambda: [log.write([t], [P], "a" * 64) for t in "二三四五"])
    caller.start()
    caller.join(10)
    assert not caller.is_alive()  # the model thread is never held up by the disk
    assert log.dropped == 2  # one held by the writer + two queued = the bound of 3
    release.set()
    assert log.flush(10)
    log.close()
    assert _texts(path) == ["一", "二", "三"]


def test_prediction_log_retries_after_enospc_and_reports_both_ends(tmp_path, monkeypatch):
    import errno

    import ftctl.serve.predlog as predlog

    real_write, fails = os.write, [3]

    def full_disk(fd, data):
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(predlog.os, "write", full_disk)
    events: list[dict] = []
    path = tmp_path / "p.jsonl"
    log = PredictionLog(path, on_error=events.append, retry=(0.02, 0.05))
    log.write(["甲"], [P], "a" * 64)
    _until(lambda: log.status() != "ok")
    assert re.match(r"failing since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: cannot write ", log.status())
    log.write(["乙"], [P], "a" * 64)
    assert log.flush(10) and log.status() == "ok"
    log.close()
    assert _texts(path) == ["甲", "乙"]
    assert [e["event"] for e in events] == ["prediction_log_error", "prediction_log_ok"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_prediction_log_writer_that_dies_is_reported(tmp_path, monkeypatch):
    class Fatal(BaseException):
        pass

    def boom(*_args):
        raise Fatal("injected")

    log = PredictionLog(tmp_path / "p.jsonl")
    assert log.failure() is None
    monkeypatch.setattr(log, "_encode", boom)
    log.write(["甲"], [P], "a" * 64)
    log._thread.join(10)  # ended, its exception reported (within this test)
    assert "writer thread died: Fatal: injected" in log.failure()


def test_event_log_never_raises_and_says_since_when_it_fails():
    broken = [True]

    def write(event):
        if broken[0]:
            raise OSError(28, "No space left on device")

    events = EventLog(write)
    events({"event": "x"})
    assert events.status().startswith("failing since ") and "No space left" in events.status()
    broken[0] = False
    events({"event": "y"})
    assert events.status() == "ok" and events.failed == 1


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
        (b'{"text": ' + b"9" * 5000 + b"}", "a value that cannot be read"),
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


def _serve_in_thread(listener):
    """uvicorn's Server with the service's config (a trivial app) on ``listener``, in a
    thread; returns (server, thread) once it accepts."""
    import uvicorn

    from ftctl.serve.server import uvicorn_config

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server = uvicorn.Server(uvicorn_config(app, ServeConfig()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    _until(lambda: server.started)
    return server, thread


@pytest.mark.parametrize("made_by", ["bind", "systemd"])
def test_accepted_connections_get_tcp_nodelay_through_the_real_accept_path(made_by):
    """Through uvicorn's and asyncio's own accept: every connection has TCP_NODELAY (asyncio
    sets it only when the listening socket's protocol says TCP; socket.create_server's
    says 0). systemd's socket is re-made from its fd, as inherited_sockets() does."""
    import socket

    listener = bind("127.0.0.1", 0, 8)
    if made_by == "systemd":
        passed = socket.create_server(("127.0.0.1", 0))  # what another program made: proto 0
        assert passed.proto == 0
        listener.close()
        listener = socket.socket(fileno=os.dup(passed.fileno()))
        passed.close()
    server, thread = _serve_in_thread(listener)
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
            (conn,) = server.server_state.connections
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------- uvicorn pin

UVICORN = "0.54.0"
# uvicorn's H11Protocol methods that ftctl.serve.server.Protocol overrides, and those whose
# behaviour it relies on (they close through transport.close(), which GracefulTransport turns
# into a graceful close; they set the cycle and h11 states the hooks read): the first 16 hex
# digits of the sha256 of their source, as reviewed with uvicorn 0.54.0.
OVERRIDDEN = {
    "H11Protocol.connection_made": "6efb565ff3d36b91",
    "H11Protocol.connection_lost": "dbb688fa2b386000",
    "H11Protocol.data_received": "e03b145518ca44aa",
    "H11Protocol.shutdown": "aaa6d607648bad7d",
}
RELIED_ON = {
    "H11Protocol.handle_events": "e63a9d1492e3efe7",
    "H11Protocol.send_400_response": "56937b748fc59d92",
    "H11Protocol.on_response_complete": "1fbb8f48c6a1afc4",
    "H11Protocol.timeout_keep_alive_handler": "fcd7338529fe645e",
    "H11Protocol.eof_received": "5652627579a02369",
    "RequestResponseCycle.send": "76b4bcb0998bed0e",
    "RequestResponseCycle.receive": "2d138e9944fff369",
    "RequestResponseCycle.run_asgi": "0f33f2449a444bc2",
}


def test_uvicorn_is_pinned_and_the_hooks_overridden_are_the_ones_reviewed():
    """Fails when uvicorn changes a method the service's protocol overrides or relies on:
    review ftctl/serve/server.py against the new source, then update the digests and the
    pins (pyproject.toml, .ci/setup, docker/constraints.txt) together."""
    import hashlib
    import inspect

    import uvicorn
    from uvicorn.protocols.http import h11_impl

    from ftctl.serve.server import Protocol

    assert uvicorn.__version__ == UVICORN
    ours = {f"H11Protocol.{n}" for n, v in vars(Protocol).items()
            if callable(v) and hasattr(h11_impl.H11Protocol, n)}  # fmt: skip
    assert ours == set(OVERRIDDEN), "an override was added or removed: list it above"
    for name, digest in {**OVERRIDDEN, **RELIED_ON}.items():
        cls, method = name.split(".")
        source = inspect.getsource(getattr(getattr(h11_impl, cls), method))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, f"{name} changed"


def test_uvicorn_is_pinned_to_the_same_version_everywhere():
    root = Path(__file__).resolve().parents[2]
    pin = f"uvicorn=={UVICORN}"
    assert f'"{pin}"' in (root / "pyproject.toml").read_text(encoding="utf-8")
    assert pin in (root / ".ci" / "setup").read_text(encoding="utf-8")
    constraints = (root / "docker" / "constraints.txt").read_text(encoding="utf-8")
    assert pin in constraints.splitlines()


# --------------------------------------------------------------------------- failures, signals


def test_health_turns_503_once_a_thread_of_the_service_has_died():
    from ftctl.serve import ServeApp

    class _Dead(Batcher):
        def failure(self):
            return "the model thread died: Fatal: injected"

    class _Fine:
        def health(self):
            return {"status": "ok", "sha256": "a" * 64}

        def failure(self):
            return None

    app = ServeApp(_Fine(), _Dead(_Holder(_Recorder())))
    status, body = app.health()
    assert status == 503 and body["status"] == "failed" and "Fatal" in body["error"]
    assert body["sha256"] == "a" * 64  # the rest is still there
    ok = ServeApp(_Fine(), Batcher(_Holder(_Recorder())))
    assert ok.health()[0] == 200


def test_stop_signal_stops_a_load_at_once_and_a_server_gracefully():
    import signal

    from ftctl.serve.server import Stop, StopSignal

    before = {sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS}
    try:
        stop = StopSignal().install()
        with pytest.raises(Stop):  # while loading: at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        stop = StopSignal().install()
        stop.loaded()
        os.kill(os.getpid(), signal.SIGTERM)  # loaded, no server yet: remembered
        _until(lambda: stop.requested)

        class _Server:
            should_exit = False

        server = _Server()
        stop.attach(server)  # passed on: no moment loses it
        assert server.should_exit
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
