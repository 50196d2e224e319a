"""`ftctl deploy` sending model.safetensors as a tensor delta (issue #23), against a real sshd
and a real supervisord running `ftctl serve`, each test twice: through an sshd whose sessions'
`python3` is pyenv's 3.6.15, and through the usual one.

The server starts in the seed's state: a real final/ directory, here holding a model with its
manifest (as `ftctl train` writes it); the model deployed is a fine-tune of it whose manifest
names it as its base model, the way `ftctl train` does. Each test ends with the service on a
checked model and the lock free."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.deploy import Hooks, deploy
from ftctl.errors import DeployError, ExitCode, RollbackFailed
from ftctl.fsutil import sha256_file
from ftctl.manifest import model_digest, write_manifest
from tests.helpers import INTENTS, damage_keeping_crc32, fine_tune_of, make_tiny_model
from tests.integration.ssh_fixtures import lock_free, wait_until

pytestmark = pytest.mark.integration
runner = CliRunner()
WEIGHTS = "model.safetensors"


@pytest.fixture(params=["py3.6", "default"])
def server(request, deploy_target, sshd_py36):
    """The deploy target, reached through an sshd whose python3 is 3.6.15 or the usual one."""
    return deploy_target.through(sshd_py36) if request.param == "py3.6" else deploy_target


def _local_base(deploy_models, tmp_path) -> Path:
    """Model A with the manifest `ftctl train` would have written (the same content)."""
    base = tmp_path / "base" / "final"
    shutil.copytree(deploy_models["a"], base)
    write_manifest(base, {"kind": "test"})
    return base


@pytest.fixture
def base(server, deploy_models, tmp_path) -> Path:
    """The live model (server's final/, a real directory) and this machine's copy of it, both
    with its manifest (the same content as model A, which the service already serves)."""
    base = _local_base(deploy_models, tmp_path)
    final = server.remote_dir / "final"
    shutil.rmtree(final)
    shutil.copytree(base, final)
    server.wait_serving(model_digest(base))
    return base


def _deploy(t, model, cfg=None, hooks=None):
    cfg = cfg or t.cfg
    return deploy(model, cfg, t.specs(), t.connect(cfg), hooks=hooks)


def _parts(t) -> list[Path]:
    """Temporary files of a tensor delta's apply anywhere under remote_dir."""
    return [p for p in t.remote_dir.rglob("*.tdelta-*.part")]


def _ends_good(t, digest: str) -> None:
    t.wait_serving(digest)
    wait_until(lambda: lock_free(t.remote_dir), 15, "the lock free")
    assert _parts(t) == []


def test_a_fine_tune_goes_as_a_tensor_delta_and_arrives_byte_identical(server, base, tmp_path):
    t = server
    tuned, changed = fine_tune_of(base, tmp_path / "ft" / "final", from_base=True)
    r = runner.invoke(app, ["deploy", "--model", str(tuned), *t.cli_args(), "--dry-run"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "model.safetensors: tensor delta" in x)
    assert "against final/model.safetensors" in line and "base model (manifest)" in line
    counted = float(line.rsplit(": ", 1)[1].split(" MB")[0])
    assert "manifest.json: rsync, whole" in r.output
    r = runner.invoke(app, ["deploy", "--model", str(tuned), *t.cli_args(), "--json"])
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)["hosts"][0]
    sent = h["methods"]["tensor-delta"]
    assert h["method"] == "tensor-delta+rsync" and sent["files"] == 1
    assert sent["bytes"] < changed and round(sent["bytes"] / 1e6, 1) == counted
    assert h["methods"]["rsync"]["files"] == 1 and h["fallbacks"] == {}
    assert h["backup"] and h["linked_files"] >= 3
    got = t.remote_dir / "releases" / h["release"] / WEIGHTS
    assert got.read_bytes() == (tuned / WEIGHTS).read_bytes()
    entry = t.log_lines()[-1]
    assert entry["ok"] and entry["methods"]["tensor-delta"]["bytes"] == sent["bytes"]
    _ends_good(t, model_digest(tuned))


@pytest.mark.parametrize("damage", ["crc32", "sha256"])
def test_a_damaged_basis_on_the_server_is_caught_and_the_file_goes_by_rsync(
    server, base, tmp_path, damage
):
    """The server's copy of the live weights rots after it was indexed. A flipped bit is
    caught by the apply's CRC-32 of the first range it reads; one that keeps that range's
    CRC-32 (crafted) by the sha256 of the rebuilt file, before anything is renamed. Either way
    no file is left, and the file goes by rsync instead (the new release is verified by
    sha256 as always, so nothing is lost by it and the fine-tune still goes live). The damage
    is named in the warning and in deploys.log."""
    t = server
    tuned, _ = fine_tune_of(base, tmp_path / "ft" / "final", from_base=True)
    live = t.remote_dir / "final" / WEIGHTS
    if damage == "crc32":
        raw = bytearray(live.read_bytes())
        raw[len(raw) // 2] ^= 0x20
        live.write_bytes(bytes(raw))
    else:
        damage_keeping_crc32(live, "bert.embeddings.word_embeddings.weight")
    damaged = sha256_file(live)
    seen = {}

    def before_go_live(_conn, incoming: str) -> None:
        seen["parts"] = _parts(t)
        seen["live"] = sha256_file(t.remote_dir / "final" / WEIGHTS)
        seen["new"] = sha256_file(Path(incoming) / WEIGHTS)

    res = _deploy(t, tuned, hooks=Hooks(after_upload=before_go_live))
    assert res.ok, res.error
    h = res.hosts[0]
    caught = "CRC-32 mismatch" if damage == "crc32" else "the rebuilt file's sha256"
    assert caught in h.fallbacks[WEIGHTS], h.fallbacks
    assert damage == "sha256" or "final/model.safetensors" in h.fallbacks[WEIGHTS]
    assert any("tensor delta failed" in w for w in h.warnings)
    assert h.methods["tensor-delta"]["files"] == 0 and h.methods["rsync"]["files"] == 2
    assert seen == {"parts": [], "live": damaged, "new": sha256_file(tuned / WEIGHTS)}
    original = t.remote_dir / "releases" / h.backup / WEIGHTS
    assert sha256_file(original) == damaged  # the apply never wrote to it
    assert t.log_lines()[-1]["fallbacks"][WEIGHTS] == h.fallbacks[WEIGHTS]
    _ends_good(t, model_digest(tuned))


def test_a_file_changed_after_the_apply_fails_verify_and_the_live_model_stays(
    server, base, tmp_path
):
    """The verify uses the hash the apply took while writing only for the very file it wrote:
    one changed since (here, on purpose, after the upload) is hashed again and refused."""
    t = server
    tuned, _ = fine_tune_of(base, tmp_path / "ft" / "final", from_base=True)
    live_ino = (t.remote_dir / "final" / WEIGHTS).stat().st_ino

    def tamper(_conn, incoming: str) -> None:
        path = Path(incoming) / WEIGHTS
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x01
        path.write_bytes(bytes(raw))

    res = _deploy(t, tuned, hooks=Hooks(after_upload=tamper))
    assert isinstance(res.error, DeployError) and not isinstance(res.error, RollbackFailed)
    assert res.error.exit_code == ExitCode.DEPLOY
    assert "do not match their sha256: model.safetensors" in res.error.message
    assert res.hosts[0].methods["tensor-delta"]["files"] == 1
    assert (t.remote_dir / "final" / WEIGHTS).stat().st_ino == live_ino
    assert [r for r in t.releases() if not r.endswith("-original")] == []
    assert not list(t.remote_dir.glob(".incoming-*"))
    entry = t.log_lines()[-1]
    assert not entry["ok"] and entry["methods"]["tensor-delta"]["files"] == 1
    _ends_good(t, model_digest(base))


def test_a_head_of_another_shape_goes_by_rsync_and_the_plan_says_why(server, base, tmp_path):
    t = server
    wider = make_tiny_model(tmp_path / "wider" / "final", [*INTENTS, "NEW_INTENT"])
    write_manifest(wider, {"kind": "test", "base_model": {"path": str(base)}})
    res = _deploy(t, wider)
    assert res.ok, res.error
    h = res.hosts[0]
    assert h.method == "rsync" and "tensor-delta" not in h.methods
    why = "no tensor delta: tensor 'classifier.bias': shape [21] here, [20] in the basis"
    assert any(x.startswith("model.safetensors: rsync") and why in x for x in h.plan)
    got = t.remote_dir / "releases" / h.release / WEIGHTS
    assert got.read_bytes() == (wider / WEIGHTS).read_bytes()
    _ends_good(t, model_digest(wider))


def test_a_deployer_killed_mid_stream_leaves_no_temp_file_and_the_live_model(
    server, base, tmp_path
):
    """kill -9 of `ftctl deploy` while the delta streams (held to 64 KiB/s): its ssh dies
    with it, the server's apply reads the end of its stdin, removes its temp file and ends;
    the live model is untouched, the lock comes free, and the next deploy goes through."""
    t = server
    tuned, _ = fine_tune_of(base, tmp_path / "ft" / "final", from_base=True, changed=("",))
    proc = t.client(tuned, tmp_path / "client.log", "--bwlimit", "64")
    try:
        wait_until(lambda: _parts(t), 60, "the apply writing its temp file", 0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    wait_until(lambda: not _parts(t), 20, "the apply removing its temp file")
    wait_until(lambda: lock_free(t.remote_dir), 20, "the lock free")
    assert t.health()["sha256"] == model_digest(base)
    assert sha256_file(t.remote_dir / "final" / WEIGHTS) == sha256_file(base / WEIGHTS)
    res = _deploy(t, tuned)
    assert res.ok, res.error
    assert res.hosts[0].methods["tensor-delta"]["files"] == 1
    assert not list(t.remote_dir.glob(".incoming-*")), os.listdir(t.remote_dir)
    _ends_good(t, model_digest(tuned))


@pytest.fixture
def small_disk(deploy_target, deploy_models, tmp_path):
    """A 5 MiB tmpfs as remote_dir, holding the live model in a real final/ (3.7 MB): the new
    weights (3.2 MB) do not fit. No service: the disk fills before any go-live. Through the
    usual sshd only: the 3.6 one lives in a private mount namespace, which does not see a
    mount made after it started."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "ftctl-tdelta-test", d], check=True)
    try:
        shutil.copytree(_local_base(deploy_models, tmp_path), d / "final")
        yield deploy_target.with_(remote_dir=str(d), restart_cmd="true", reload_cmd=None,
                           health_url=None, health_settle=0.0, min_free_factor=0.0)  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_during_the_apply_fails_clearly_and_leaves_no_file(
    deploy_target, small_disk, tmp_path
):
    t, cfg = deploy_target, small_disk
    d = Path(cfg.remote_dir)
    tuned, _ = fine_tune_of(tmp_path / "base" / "final", tmp_path / "ft" / "final", from_base=True)
    live = sha256_file(d / "final" / WEIGHTS)
    res = _deploy(t, tuned, cfg)
    assert isinstance(res.error, DeployError) and res.error.exit_code == ExitCode.DEPLOY
    h = res.hosts[0]
    assert "No space left on device" in h.fallbacks[WEIGHTS]  # the apply's, then rsync's too
    assert "the live model is untouched" in (res.error.hint or "")
    assert sha256_file(d / "final" / WEIGHTS) == live
    assert not list(d.rglob("*.tdelta-*.part")) and not list(d.glob(".incoming-*"))
    wait_until(lambda: lock_free(d), 15, "the lock free")
