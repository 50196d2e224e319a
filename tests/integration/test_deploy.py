"""ftctl deploy / rollback / releases against a real sshd and a real supervisord.

Every fault test ends by checking that the live service still answers with a good model."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.deploy import Hooks, deploy, rollback
from ftctl.errors import DeployError, ExitCode, HostKeyError, RollbackFailed
from ftctl.fsutil import atomic_write_text, sha256_tree
from ftctl.manifest import model_digest
from tests.helpers import fine_tune_of
from tests.integration.ssh_fixtures import lock_free

pytestmark = pytest.mark.integration
runner = CliRunner()


def _deploy(target, model, cfg=None, **kw):
    cfg = cfg or target.cfg
    return deploy(model, cfg, target.specs(), target.connect(cfg), **kw)


def test_first_deploy_backs_up_real_final_and_swaps(deploy_target, deploy_models):
    t = deploy_target
    cfg = t.with_(reload_cmd=None)  # the restart path (supervisorctl restart python-services)
    final, missing, stop = t.remote_dir / "final" / "config.json", [], threading.Event()

    def watch() -> None:  # `final` must resolve at every moment, the backup's included
        while not stop.is_set():
            if not final.exists():
                missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = _deploy(t, deploy_models["b"], cfg)
    finally:
        stop.set()
        watcher.join()
    assert res.ok, res.error
    assert missing == []
    (h,) = res.hosts
    originals = [r for r in t.releases() if r.endswith("-original")]
    assert len(originals) == 1 and h.backup == originals[0]
    assert model_digest(t.remote_dir / "releases" / originals[0]) == model_digest(
        deploy_models["a"]
    )
    digest_b = model_digest(deploy_models["b"])
    assert t.link_target() == f"releases/{h.release}" and h.release.endswith(digest_b[:8])
    assert t.health()["sha256"] == digest_b
    assert h.uploaded_bytes > 0 and h.uploaded_files > 0
    (entry,) = t.log_lines()
    assert entry["ok"] and entry["release"] == h.release and entry["previous"] == h.backup
    assert lock_free(t.remote_dir)


def test_redeploy_of_a_model_the_server_has_uploads_nothing(deploy_target, deploy_models):
    t = deploy_target
    first = _deploy(t, deploy_models["b"]).hosts[0]
    assert _deploy(t, deploy_models["c"]).ok
    again = _deploy(t, deploy_models["b"])
    assert again.ok, again.error
    h = again.hosts[0]
    assert h.reused and h.uploaded_bytes == 0 and h.uploaded_files == 0
    assert h.release == first.release and t.link_target() == f"releases/{first.release}"
    t.wait_serving(model_digest(deploy_models["b"]))
    noop = _deploy(t, deploy_models["b"]).hosts[0]  # already live: nothing to do
    assert noop.ok and noop.uploaded_bytes == 0 and noop.release == first.release


def test_rollback_cli_returns_to_previous_release(deploy_target, deploy_models):
    t = deploy_target
    b = _deploy(t, deploy_models["b"]).hosts[0]
    c = _deploy(t, deploy_models["c"]).hosts[0]
    r = runner.invoke(app, ["rollback", *t.cli_args(), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ok"] and out["hosts"][0]["release"] == b.release
    assert out["hosts"][0]["previous"] == c.release
    assert t.link_target() == f"releases/{b.release}"
    assert t.health()["sha256"] == model_digest(deploy_models["b"])
    assert t.log_lines()[-1]["action"] == "rollback"
    res = rollback(t.cfg, t.specs(), t.connect(), to="original")  # by name suffix
    assert res.ok and res.hosts[0].release.endswith("-original")
    assert t.health()["sha256"] == model_digest(deploy_models["a"])


def test_releases_lists_live_and_manifest_provenance(deploy_target, deploy_models, tmp_path):
    t = deploy_target
    model = tmp_path / "final"
    shutil.copytree(deploy_models["b"], model)
    manifest = {
        "files": sha256_tree(model),
        "base_model": {"path": "base/final", "sha256": "f" * 64},
        "data": {"data/incremental_training_data.jsonl": {"sha256": "e" * 64}},
    }
    atomic_write_text(model / "manifest.json", json.dumps(manifest))
    atomic_write_text(model / "eval_report.json", json.dumps({"passed": True, "accuracy": 0.97}))
    rel = _deploy(t, model).hosts[0].release
    r = runner.invoke(
        app,
        ["releases", "--host", t.host, "--identity", str(t.cfg.identity), "--known-hosts",
         str(t.cfg.known_hosts), "--remote-dir", t.cfg.remote_dir, "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["hosts"][t.host]
    live = [x for x in rows if x["live"]]
    assert [x["name"] for x in live] == [rel]
    assert live[0]["manifest"]["base_model"] == "f" * 64
    assert live[0]["manifest"]["data"] == {"data/incremental_training_data.jsonl": "e" * 64}
    assert live[0]["eval_report"] == {"passed": True, "accuracy": 0.97}
    assert [x["previous"] for x in rows if x["name"].endswith("-original")] == [True]


def test_retention_keeps_n_and_the_live_and_previous(deploy_target, deploy_models):
    t = deploy_target
    cfg = t.with_(keep_releases=2)
    rels = [_deploy(t, deploy_models[m], cfg).hosts[0] for m in "bca"]
    assert all(h.ok for h in rels)
    original = rels[0].backup
    assert t.releases() == sorted([original, rels[1].release, rels[2].release])
    assert rels[2].pruned == [rels[0].release]  # *-original, live and previous are kept
    t.wait_serving(model_digest(deploy_models["a"]))


def test_connection_cut_mid_upload_keeps_live_model_and_next_deploy_works(
    deploy_target, deploy_models
):
    t = deploy_target

    def cut(conn, sent):
        if sent > 200_000:
            conn.client.get_transport().close()  # the SSH session dies mid-file

    sftp = t.with_(transfer="sftp")  # the SFTP path (rsync's own cut: test_deploy_resilience)
    res = _deploy(t, deploy_models["b"], sftp, hooks=Hooks(on_upload_bytes=cut))
    assert isinstance(res.error, DeployError) and "upload failed" in res.error.message
    assert t.health()["sha256"] == model_digest(deploy_models["a"])
    assert not any(r.endswith(model_digest(deploy_models["b"])[:8]) for r in t.releases())
    assert lock_free(t.remote_dir)  # released over a fresh session
    again = _deploy(t, deploy_models["b"])
    assert again.ok, again.error
    assert not list(t.remote_dir.glob(".incoming-*"))
    t.wait_serving(model_digest(deploy_models["b"]))


def test_corrupted_upload_is_refused_by_checksum(deploy_target, deploy_models):
    t = deploy_target

    def corrupt(conn, incoming):
        conn.run(
            f"printf 'XXXXXXXX' | dd of={incoming}/model.safetensors bs=1 seek=4096 "
            "conv=notrunc 2>/dev/null",
            hide=True,
            in_stream=False,
        )

    res = _deploy(t, deploy_models["b"], hooks=Hooks(after_upload=corrupt))
    assert isinstance(res.error, DeployError) and "model.safetensors" in res.error.message
    assert not list(t.remote_dir.glob(".incoming-*"))
    assert [r for r in t.releases() if not r.endswith("-original")] == []
    assert t.health()["sha256"] == model_digest(deploy_models["a"])
    assert t.predict("帮我打卡")["label"]


def test_failing_health_after_restart_rolls_back(deploy_target, deploy_models):
    t = deploy_target
    cfg = t.with_(reload_cmd=None, health_timeout=25.0)  # restart; broken config.json
    res = _deploy(t, deploy_models["broken"], cfg)
    assert isinstance(res.error, DeployError) and not isinstance(res.error, RollbackFailed)
    assert res.error.exit_code == ExitCode.DEPLOY and "rolled back" in res.error.message
    assert t.link_target().endswith("-original")
    t.wait_serving(model_digest(deploy_models["a"]), timeout=30)
    entry = t.log_lines()[-1]
    assert not entry["ok"] and entry["rolled_back"]


def test_too_little_disk_is_refused_in_preflight(deploy_target, deploy_models):
    t = deploy_target
    res = _deploy(t, deploy_models["b"], t.with_(min_free_factor=1e9))
    assert isinstance(res.error, DeployError) and "free" in res.error.message
    assert (t.remote_dir / "final").is_dir() and not (t.remote_dir / "final").is_symlink()
    assert lock_free(t.remote_dir)
    assert t.health()["sha256"] == model_digest(deploy_models["a"])


def test_unknown_host_key_is_refused_with_fingerprint_then_accepted(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    known = tmp_path / "known_hosts"
    atomic_write_text(known, "")
    res = _deploy(t, deploy_models["b"], t.with_(known_hosts=known))
    assert isinstance(res.error, HostKeyError)
    fp = res.error.hint.split("--accept-host-key ")[1].split()[0]
    assert fp.startswith("SHA256:") and fp in res.error.message
    args = t.cli_args()
    args[args.index("--known-hosts") + 1] = str(known)
    r = runner.invoke(
        app,
        ["deploy", "--model", str(deploy_models["b"]), *args, "--accept-host-key", fp,
         "--dry-run", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["hosts"][0]["plan"]
    assert any("back up" in line for line in plan)
    assert f"[127.0.0.1]:{t.sshd.port} ssh-ed25519" in known.read_text()
    assert (t.remote_dir / "final").is_dir() and not (t.remote_dir / "final").is_symlink()


def test_cli_deploy_failure_exits_5_with_json(deploy_target, deploy_models):
    t = deploy_target
    r = runner.invoke(
        app,
        ["deploy", "--model", str(deploy_models["b"]), *t.cli_args(),
         "--smoke", "帮我打卡=NO_SUCH_LABEL", "--health-timeout", "20", "--json"],
    )  # fmt: skip
    assert r.exit_code == int(ExitCode.DEPLOY), r.output
    out = json.loads(r.stdout)
    assert not out["ok"] and "smoke" in out["error"]["message"]
    assert out["hosts"][0]["rolled_back"]
    t.wait_serving(model_digest(deploy_models["a"]))


def test_reload_deploy_under_load_fails_zero_requests(deploy_target, deploy_models):
    t = deploy_target
    url = f"http://127.0.0.1:{t.port}/predict"
    stop = threading.Event()
    ok, failed, shas = [0], [], set()

    def loop():
        deadline = time.monotonic() + 90
        for _ in range(3000):  # bounded count and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            req = urllib.request.Request(
                url, data=json.dumps({"text": "查看在产批次"}).encode(), method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    shas.add(json.loads(resp.read())["sha256"])
                    ok[0] += 1
            except Exception as exc:
                failed.append(repr(exc))

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        time.sleep(0.5)
        res = _deploy(t, deploy_models["b"])
        time.sleep(0.5)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert res.ok, res.error
    assert failed == []
    assert ok[0] > 10
    assert shas == {model_digest(deploy_models["a"]), model_digest(deploy_models["b"])}


def test_rollback_after_redeploying_an_older_release_returns_to_the_one_that_was_live(
    deploy_target, deploy_models
):
    t = deploy_target
    b = _deploy(t, deploy_models["b"]).hosts[0]
    c = _deploy(t, deploy_models["c"]).hosts[0]
    again = _deploy(t, deploy_models["b"]).hosts[0]  # the older release goes live again
    assert again.reused and again.release == b.release and again.previous == c.release
    res = rollback(t.cfg, t.specs(), t.connect())
    assert res.ok, res.error
    assert res.hosts[0].release == c.release  # not b's predecessor in name order (original)
    assert t.link_target() == f"releases/{c.release}"
    t.wait_serving(model_digest(deploy_models["c"]))


def test_a_delta_upload_sends_only_the_changed_bytes(deploy_target, deploy_models, tmp_path):
    t = deploy_target
    first = _deploy(t, deploy_models["b"]).hosts[0]
    assert first.ok and first.method == "rsync"
    model, changed = fine_tune_of(deploy_models["b"], tmp_path / "ft" / "final")
    size = (model / "model.safetensors").stat().st_size
    res = _deploy(t, model)
    assert res.ok, res.error
    h = res.hosts[0]
    assert h.method == "rsync" and h.linked_files >= 3  # tokenizer, vocab, ... hard-linked
    assert any("model.safetensors: rsync delta" in line for line in h.plan)
    assert h.uploaded_bytes < changed + 0.05 * size  # rsync's literal data
    assert h.wire_bytes < changed + 0.10 * size + 50_000  # everything rsync sent
    new = t.remote_dir / "releases" / h.release
    old = t.remote_dir / "releases" / first.release
    assert (new / "vocab.txt").stat().st_ino == (old / "vocab.txt").stat().st_ino
    t.wait_serving(model_digest(model))


def test_without_a_health_check_the_result_says_unchecked(deploy_target, deploy_models):
    t = deploy_target
    cfg = t.with_(reload_cmd=None, health_url=None)  # the seed's way: just the restart
    r = runner.invoke(
        app,
        ["deploy", "--model", str(deploy_models["b"]), "--host", t.host, "--identity",
         str(cfg.identity), "--known-hosts", str(cfg.known_hosts), "--remote-dir",
         cfg.remote_dir, "--restart-cmd", cfg.restart_cmd],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert "health: unchecked" in last
    entry = t.log_lines()[-1]
    assert entry["health"] == "unchecked" and entry["checks"]["exit"] == 0
    t.wait_serving(model_digest(deploy_models["b"]))


def test_a_failed_reload_is_a_failure_at_once(deploy_target, deploy_models):
    t = deploy_target
    cfg = t.with_(health_timeout=60.0)  # reload path; the broken model does not load
    t0 = time.monotonic()
    res = _deploy(t, deploy_models["broken"], cfg)
    took = time.monotonic() - t0
    assert isinstance(res.error, DeployError) and "failed reload" in res.error.message
    assert took < 30, took  # not the 60 s health timeout
    assert res.hosts[0].rolled_back
    t.wait_serving(model_digest(deploy_models["a"]))


UNIT = """[Unit]
Description=ftctl deploy test service (starts only on a model that carries ok-to-start)
[Service]
Type=simple
ExecStart=/bin/sh -c 'test -f {final}/ok-to-start && exec sleep 600'
"""


@pytest.fixture
def systemctl(tmp_path):
    """A real `systemctl` (docker-systemctl-replacement) over a unit file in its own root."""
    import sys

    binary = Path(sys.executable).parent / "systemctl3"
    bindir, root = tmp_path / "bin", tmp_path / "sysroot"
    bindir.mkdir()
    (bindir / "systemctl").symlink_to(binary)
    cmd = f"{bindir / 'systemctl'} --root={root}"
    yield root, cmd
    subprocess.run(f"{cmd} stop ftctl-deploy-svc", shell=True, capture_output=True)


def test_systemctl_restart_is_checked_with_is_active_and_settle(deploy_target, deploy_models,
                                                                tmp_path, systemctl):  # fmt: skip
    t = deploy_target
    root, systemctl_cmd = systemctl
    remote = tmp_path / "srv"
    unit = root / "etc" / "systemd" / "system" / "ftctl-deploy-svc.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(UNIT.format(final=remote / "final"))
    good, bad = tmp_path / "good" / "final", tmp_path / "bad" / "final"
    shutil.copytree(deploy_models["b"], good)
    (good / "ok-to-start").write_text("1")
    shutil.copytree(deploy_models["c"], bad)
    cfg = t.with_(remote_dir=str(remote), restart_cmd=f"{systemctl_cmd} restart ftctl-deploy-svc",
                  reload_cmd=None, health_url=None, health_settle=1.0)  # fmt: skip
    res = _deploy(t, good, cfg)
    assert res.ok, res.error
    h = res.hosts[0]
    assert h.health == "settled (no health URL)" and res.health == h.health
    assert h.checks["is_active"]["state"] == "active"
    assert h.checks["settle"]["ActiveState"] == "active" and h.checks["settle"]["seconds"] == 1
    assert "is-active ftctl-deploy-svc" in h.checks["is_active"]["command"]
    res = _deploy(t, bad, cfg)  # the service does not start on this model
    assert isinstance(res.error, DeployError) and res.hosts[0].rolled_back, res.error
    state = subprocess.run(f"{systemctl_cmd} is-active ftctl-deploy-svc", shell=True,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert state == "active" and (remote / "final" / "ok-to-start").is_file()


def test_status_shows_the_last_go_live_from_any_machine(deploy_target, deploy_models):
    t = deploy_target
    plan = _deploy(t, deploy_models["b"], dry_run=True).hosts[0]
    assert plan.method == "rsync" and plan.expected_bytes > 0
    assert any(line.startswith("expect ~") for line in plan.plan)
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    args = ["status", "--host", t.host, "--identity", str(t.cfg.identity), "--known-hosts",
            str(t.cfg.known_hosts), "--remote-dir", t.cfg.remote_dir]  # fmt: skip
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)["hosts"][t.host]
    assert st["live"] == res.hosts[0].release and st["lock"] is None
    assert st["status"]["id"] == res.id and st["status"]["state"] == "ok"
    assert st["log"][-1]["id"] == res.id
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and f"-> {res.hosts[0].release}: ok" in r.output
