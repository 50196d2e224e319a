"""The tensor delta inside `ftctl deploy`, its own logic on this machine: the plan's choice per
file and its --dry-run figure, the stream's bandwidth cap, the server's `tdelta` command (run as
the shipped program, fed a real delta on stdin), the verify that trusts its hash only for the
very file it wrote. The same code against real sshds: tests/integration/test_deploy_tdelta.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftctl.config import DeployConfig, check
from ftctl.deploy import load_local_model, tdsend
from ftctl.deploy import tensordelta as td
from ftctl.deploy.plan import RemoteState, make_plan, plan_lines
from ftctl.deploy.program import program
from ftctl.deploy.server import channel, holder, upload
from ftctl.deploy.server.shared import Frames, decode, frame
from ftctl.deploy.transfer import Sent
from ftctl.errors import ConfigError
from ftctl.fsutil import sha256_file
from ftctl.manifest import write_manifest
from tests.helpers import fine_tune_of, make_tiny_model

LIVE = "20261129051300-0badc0de"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(base, a fine-tune of it whose manifest names it as its base model)."""
    root = tmp_path_factory.mktemp("tdelta-models")
    base = make_tiny_model(root / "base" / "final", seed=3)
    write_manifest(base, {"kind": "test"})
    tuned, _ = fine_tune_of(base, root / "tuned" / "final", from_base=True)
    return base, tuned


def _live_is(base: Path) -> RemoteState:
    """The server's state when ``base`` is its live release (indexed as verify indexes it)."""
    m = load_local_model(base)
    index = {rel: [sha, m.sizes[rel]] for rel, sha in m.expected.items()}
    return RemoteState(link="link", live=LIVE, releases=[LIVE], index={LIVE: index}, has_rsync=True)


def test_a_fine_tune_goes_as_a_tensor_delta_against_the_live_release(models):
    base, tuned = models
    model = load_local_model(tuned)
    plan = make_plan(model, _live_is(base), DeployConfig(), local_conn=False)
    step = plan.step("model.safetensors")
    assert step.action == "tensor-delta" and step.source == f"releases/{LIVE}/model.safetensors"
    assert step.local_basis == str(base / "model.safetensors") and not step.exact
    assert "base model (manifest)" in step.note
    assert plan.step("manifest.json").action == "send"  # the rest: rsync, as before
    assert plan.bases["model.safetensors"] == step.source  # rsync's basis, if the delta fails
    assert plan.links["vocab.txt"] == f"releases/{LIVE}/vocab.txt"


def test_the_dry_run_counts_the_delta_exactly_and_shows_each_file(models):
    base, tuned = models
    model = load_local_model(tuned)
    st = _live_is(base)
    plan = make_plan(model, st, DeployConfig(), local_conn=False, count=True)
    step = plan.step("model.safetensors")
    stream = td.encode(tuned / "model.safetensors", base / "model.safetensors", td.CountingSink())
    assert step.exact and step.expect == stream.delta_bytes < step.size / 3
    lines = plan_lines(DeployConfig(), st, model, plan)
    mine = [x for x in lines if x.startswith("model.safetensors: tensor delta against")]
    assert len(mine) == 1 and f"{step.expect / 1e6:.1f} MB of" in mine[0]
    assert any(x.startswith("manifest.json: rsync, whole:") for x in lines)
    assert any(x.startswith("hard-link 4 unchanged files") and "vocab.txt" in x for x in lines)


@pytest.mark.parametrize("transfer", ["rsync", "sftp"])
def test_rsync_or_sftp_named_sends_no_tensor_delta(models, transfer):
    base, tuned = models
    model = load_local_model(tuned)
    cfg = DeployConfig(transfer=transfer)
    plan = make_plan(model, _live_is(base), cfg, local_conn=False)
    assert plan.tensor_deltas == []
    lines = plan_lines(cfg, _live_is(base), model, plan)
    assert any(f"no tensor delta (transfer = {transfer})" in x for x in lines)


def test_transfer_auto_is_a_valid_setting_and_others_are_not():
    check(DeployConfig(transfer="auto"))
    with pytest.raises(ConfigError, match="auto, rsync or sftp"):
        check(DeployConfig(transfer="tensor-delta"))
    with pytest.raises(ConfigError, match="auto, rsync or sftp"):
        check(DeployConfig(transfer="xor"))


def test_without_the_base_model_here_the_plan_says_why(models, tmp_path):
    base, tuned = models
    moved = tmp_path / "tuned"
    shutil.copytree(tuned, moved)
    other = tmp_path / "elsewhere"
    shutil.copytree(base, other)
    (other / "model.safetensors").write_bytes(b"not the same bytes")  # our copy differs
    man = (moved / "manifest.json").read_text().replace(str(base), str(other))
    (moved / "manifest.json").write_text(man)
    plan = make_plan(load_local_model(moved), _live_is(base), DeployConfig(), local_conn=False)
    step = plan.step("model.safetensors")
    assert step.action == "send" and step.note.startswith("no tensor delta: no local copy")


def test_a_head_of_another_shape_falls_back_and_names_the_tensor(models, tmp_path):
    base, _ = models
    from tests.helpers import INTENTS

    wider = make_tiny_model(tmp_path / "wider", [*INTENTS, "NEW_INTENT"], seed=3)
    write_manifest(wider, {"base_model": {"path": str(base)}})
    plan = make_plan(load_local_model(wider), _live_is(base), DeployConfig(), local_conn=False)
    step = plan.step("model.safetensors")
    assert step.action == "send"
    assert (
        step.note == "no tensor delta: tensor 'classifier.bias': shape [21] here, [20] in the basis"
    )


def test_the_stream_is_held_to_bwlimit(monkeypatch):
    clock = {"t": 100.0}
    slept = []
    monkeypatch.setattr(tdsend.time, "monotonic", lambda: clock["t"])

    def sleep(s):
        slept.append(s)
        clock["t"] += s

    monkeypatch.setattr(tdsend.time, "sleep", sleep)
    got = []
    sink = tdsend.Sink(got.append, kbps=100)  # 102,400 bytes/s
    for _ in range(40):
        sink.write(b"x" * 25_600)  # 1,024,000 bytes in all, written "at once"
    sink.flush()
    assert b"".join(got) == b"x" * 1_024_000 and sink.bytes == 1_024_000
    assert clock["t"] - 100.0 == pytest.approx(10.0, rel=0.01)  # 1,024,000 / 102,400
    assert all(len(c) >= tdsend.CHUNK for c in got[:-1])


def _fed(monkeypatch, seconds_per_chunk: float, kbps: int = 0) -> tdsend.Sink:
    """A Sink fed 16 MiB through a pipe that takes ``seconds_per_chunk`` to accept each chunk
    (a fake clock: nothing sleeps)."""
    clock = {"t": 0.0}
    monkeypatch.setattr(tdsend.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(tdsend.time, "sleep", lambda s: clock.update(t=clock["t"] + s))

    def write(_chunk):
        clock["t"] += seconds_per_chunk

    sink = tdsend.Sink(write, kbps)
    assert sink.level() == td.LEVEL  # nothing measured yet: compress
    for _ in range(64):
        sink.write(b"x" * tdsend.CHUNK)
    return sink


def test_a_fast_link_gets_the_planes_stored_a_thin_one_compressed(monkeypatch):
    fast = _fed(monkeypatch, tdsend.CHUNK / 100e6)  # ssh takes 100 MB/s
    assert fast.link_rate() == pytest.approx(100e6) and fast.level() == 0
    thin = _fed(monkeypatch, tdsend.CHUNK / 6.25e6)  # 50 Mbit/s
    assert thin.link_rate() == pytest.approx(6.25e6) and thin.level() == td.LEVEL
    capped = _fed(monkeypatch, 0.0, kbps=10_000)  # instant pipe, but --bwlimit 10000
    assert capped.link_rate() == pytest.approx(10_240_000, rel=0.05)
    assert capped.level() == td.LEVEL


def test_the_encoder_asks_for_the_level_block_by_block(models):
    base, tuned = models
    asked = []

    def level():  # the link's measure changing its mind every block
        asked.append(1)
        return len(asked) % 2

    st = td.encode(tuned / "model.safetensors", base / "model.safetensors", td.CountingSink(),
                   level=level, block=4096)  # fmt: skip
    stored = td.encode(tuned / "model.safetensors", base / "model.safetensors",
                       td.CountingSink(), level=0, block=4096)  # fmt: skip
    assert len(asked) > 10 and st.planes["zlib"] > 0
    assert st.delta_bytes < stored.delta_bytes


def test_a_failed_delta_says_whether_this_machine_s_copy_of_the_basis_changed(models):
    base, tuned = models
    step = make_plan(load_local_model(tuned), _live_is(base), DeployConfig(), False).tensor_deltas[
        0
    ]
    assert tdsend._basis_changed(step) == ""  # the server's copy, then, is the one that differs
    step.basis_sha = "0" * 64
    assert "this machine's copy" in tdsend._basis_changed(step)
    why = tdsend._why({"error": "basis x: bytes 8..16 differ (CRC-32 mismatch)"}, None, 1, "")
    assert why == "the server: basis x: bytes 8..16 differ (CRC-32 mismatch)"
    assert (
        tdsend._why(None, None, 137, "Killed") == "the server's tdelta exited 137 without an "
        "answer: Killed"
    )


def test_bytes_sent_add_up_per_method():
    out = Sent("rsync")
    out.add(Sent("tensor-delta", 1, 700, 700), 1.5)
    out.add(Sent("rsync", 1, 20, 90), 0.2)
    out.add(Sent("rsync", 1, 3000, 3100), 0.5)  # a failed delta, sent again by rsync
    assert out.method == "tensor-delta+rsync" and out.files == 3 and out.file_bytes == 3720
    assert out.by_method["rsync"] == {"files": 2, "bytes": 3020, "seconds": 0.7}


# --------------------------------------------------------------------------- the server's side


def _server_dir(tmp_path: Path, base: Path) -> tuple[Path, str]:
    """A server: releases/LIVE/ holding ``base``, an empty upload directory."""
    d = tmp_path / "srv"
    shutil.copytree(base, d / "releases" / LIVE)
    (d / ".incoming-x").mkdir()
    return d, f"releases/{LIVE}/model.safetensors"


def _tdelta(d: Path, basis: str, stream: bytes, python: str = sys.executable):
    """The shipped program's `tdelta`, as ssh runs it: (exit status, answer, stderr)."""
    req = {"remote_dir": str(d), "incoming": ".incoming-x",
           "files": [{"rel": "model.safetensors", "basis": basis}]}  # fmt: skip
    p = program()
    res = subprocess.run(p.command(python, "tdelta"), shell=True, input=p.stdin(req) + stream,
                         capture_output=True, timeout=120)  # fmt: skip
    (answer,), _noise = Frames().feed(res.stdout)
    return res.returncode, decode(answer), res.stderr.decode()


def _delta(new: Path, basis: Path) -> bytes:
    """The tensor delta of the weights of model directory ``new`` against ``basis``'s."""
    import io

    buf = io.BytesIO()
    td.encode(new / "model.safetensors", basis / "model.safetensors", buf)
    return buf.getvalue()


@pytest.mark.parametrize("python", [sys.executable, "/root/.pyenv/versions/3.6.15/bin/python3.6"])
def test_the_server_rebuilds_the_file_and_answers_its_hash(models, tmp_path, python):
    base, tuned = models
    d, basis = _server_dir(tmp_path, base)
    rc, ans, err = _tdelta(d, basis, _delta(tuned, base), python)
    out = d / ".incoming-x" / "model.safetensors"
    assert rc == 0, err
    got = ans["files"]["model.safetensors"]
    assert got["sha256"] == sha256_file(out) == sha256_file(tuned / "model.safetensors")
    assert got["identity"] == list(upload._identity(os.stat(out)))


def test_a_damaged_basis_is_refused_and_leaves_nothing(models, tmp_path):
    base, tuned = models
    d, basis = _server_dir(tmp_path, base)
    stream = _delta(tuned, base)
    damaged = d / basis
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # bit rot in the server's copy, after it was indexed
    damaged.write_bytes(bytes(raw))
    rc, ans, _err = _tdelta(d, basis, stream)
    assert rc == 1 and ans["failed"] == "model.safetensors" and ans["files"] == {}
    assert "CRC-32 mismatch" in ans["error"] and LIVE in ans["error"]
    assert list((d / ".incoming-x").iterdir()) == []


def test_the_request_is_read_to_its_last_byte_and_no_further():
    r, w = os.pipe()
    os.write(w, frame({"files": ["model.safetensors"]}) + b"FTTD\x01\r\n\x00rest")
    os.close(w)
    chan = channel.Channel(rfd=r)
    assert chan.recv_exact() == {"files": ["model.safetensors"]}
    assert os.read(r, 100) == b"FTTD\x01\r\n\x00rest"  # the stream is the command's
    os.close(r)


def test_the_lock_holder_refuses_a_command_that_reads_stdin():
    sent = []

    class Chan:
        def send(self, obj):
            sent.append(obj)

    holder.serve_call(Chan(), "tdelta", {})
    assert sent == [{"reply": {"error": "unknown command tdelta"}, "rc": 2}]


def test_verify_trusts_the_apply_hash_only_for_the_very_file_it_wrote(models, tmp_path):
    base, tuned = models
    d, basis = _server_dir(tmp_path, base)
    rc, ans, err = _tdelta(d, basis, _delta(tuned, base))
    assert rc == 0, err
    got = ans["files"]["model.safetensors"]
    sha, size = got["sha256"], (tuned / "model.safetensors").stat().st_size
    req = {"remote_dir": str(d), "incoming": ".incoming-x", "release": "20261129051400-aaaaaaaa",
           "expected": {"model.safetensors": [sha, size]}, "received": ["model.safetensors"],
           "hashed": {"model.safetensors": [sha, got["identity"]]}}  # fmt: skip
    out = d / ".incoming-x" / "model.safetensors"
    raw = bytearray(out.read_bytes())
    raw[-5] ^= 0x01  # changed after the apply hashed it: its identity (mtime, ctime) moved
    out.write_bytes(bytes(raw))
    assert upload.cmd_verify(dict(req)) == (1, {"bad": ["model.safetensors"]})
    shutil.rmtree(d / ".incoming-x", ignore_errors=True)
    (d / ".incoming-x").mkdir()
    rc, ans, err = _tdelta(d, basis, _delta(tuned, base))
    assert rc == 0, err
    req["hashed"] = {"model.safetensors": [sha, ans["files"]["model.safetensors"]["identity"]]}
    assert upload.cmd_verify(req)[0] == 0
    assert (d / "releases" / "20261129051400-aaaaaaaa" / "model.safetensors").is_file()
