"""The go-live on the server a user really has: an older python3 (3.6), a health endpoint that
answers garbage, a go-live killed (SIGKILL, SIGTERM) after the swap, two deployers at once, no
renameat2, a 200-file release, a full disk under the status file, a bad remote_python.

Real sshds (one whose sessions' `python3` is pyenv's 3.6.15), a real supervisord running
`ftctl serve`, real processes killed with real signals. Each test ends with the service on a
checked model and the lock free."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.deploy import deploy
from ftctl.deploy.program import program
from ftctl.errors import DeployError, ExitCode, RollbackFailed
from ftctl.manifest import model_digest, write_manifest
from tests.integration.ssh_fixtures import lock_free, wait_until

pytestmark = pytest.mark.integration
runner = CliRunner()
PY27 = "/root/.pyenv/versions/2.7.18/bin/python"
AFTER_SWAP = ("restart", "health")  # steps of a restart-path go-live past its swap


@pytest.fixture(params=["py3.6", "default"])
def server(request, deploy_target, sshd_py36):
    """The deploy target reached through an sshd whose python3 is 3.6.15, or the usual one."""
    if request.param == "default":
        return deploy_target
    return deploy_target.through(sshd_py36)


@pytest.fixture
def server36(deploy_target, sshd_py36):
    return deploy_target.through(sshd_py36)


def _deploy(t, model, cfg=None):
    cfg = cfg or t.cfg
    return deploy(model, cfg, t.specs(), t.connect(cfg))


def _restart_path(t, **kw):
    return t.with_(reload_cmd=None, health_timeout=60.0, **kw)


def _after_swap(t) -> dict:
    return wait_until(
        lambda: (d := t.status_doc()).get("step") in AFTER_SWAP and d, 120, "past the swap", 0.005
    )


def _killed_past_the_swap(t, model, tmp_path) -> dict:
    """A restart-path deploy whose client and go-live are both SIGKILLed past the swap (the
    deploying machine gone, then the OOM killer): the dead go-live's status."""
    proc = t.client(model, tmp_path / "client.log", cfg=_restart_path(t))
    doc = _after_swap(t)
    proc.kill()
    proc.wait(30)
    os.kill(doc["pid"], signal.SIGKILL)
    wait_until(lambda: lock_free(t.remote_dir), 10, "the kernel releases the dead one's lock")
    return doc


def _ends_good(t, digest: str) -> None:
    t.wait_serving(digest)
    wait_until(lambda: lock_free(t.remote_dir), 15, "the lock free")
    assert not (t.remote_dir / ".ftctl" / "journal.json").exists()


class GarbageHealth:
    """/health on its own port. While `final` points at the release tagged ``bad`` it answers
    garbage: ``raw`` bytes that are not HTTP at all, or (``nonint``) HTTP 200 whose reload
    counter is not a number. Otherwise it relays the real service's /health."""

    def __init__(self, t, bad: str, mode: str) -> None:
        self.t, self.bad, self.mode = t, bad, mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/health"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
            data += chunk
        final = self.t.remote_dir / "final"
        live = os.readlink(final) if final.is_symlink() else ""
        if live.endswith(self.bad) and self.mode == "raw":
            conn.sendall(b"\x00\x01 this is not HTTP \xff\xfe\r\n\r\n")
            return
        if live.endswith(self.bad):
            body = json.dumps({"status": "ok", "reloads": "many"}).encode()
        else:
            with urllib.request.urlopen(self.t.health_url, timeout=10) as resp:
                body = resp.read()
        head = f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        conn.sendall(head.encode() + b"\r\n\r\n" + body)

    def __enter__(self) -> GarbageHealth:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- Python 3.6


def test_a_deploy_to_a_server_whose_python3_is_3_6(server36, deploy_models):
    t = server36
    r = runner.invoke(
        app, ["deploy", "--model", str(deploy_models["b"]), *t.cli_args(), "--dry-run", "--json"]
    )
    assert r.exit_code == 0, r.output
    host = json.loads(r.stdout)["hosts"][0]
    assert host["python"] == "/root/.pyenv/shims/python3 3.6.15 (remote_python = python3)"
    assert host["plan"][0] == f"server python: {host['python']}"
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    assert res.hosts[0].python.endswith("3.6.15 (remote_python = python3)")
    assert t.log_lines()[-1]["ok"]
    r = runner.invoke(app, ["status", *t.ssh_args(), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["hosts"][t.host]["python"]["version"] == "3.6.15"
    _ends_good(t, model_digest(deploy_models["b"]))


@pytest.mark.parametrize(
    "python, words",
    [("/nonexistent/python3", "cannot be run on the server"), (PY27, "is Python 2.7.18")],
    ids=["missing", "python2"],
)
def test_a_missing_or_too_old_remote_python_is_named_exit_7(
    deploy_target, deploy_models, python, words
):
    t = deploy_target
    args = [*t.cli_args(), "--remote-python", python]
    r = runner.invoke(app, ["deploy", "--model", str(deploy_models["b"]), *args])
    assert r.exit_code == int(ExitCode.ENVIRONMENT), r.output
    assert f"remote_python = '{python}'" in r.output and words in r.output
    assert "--remote-python" in r.output  # the hint names the setting
    assert (t.remote_dir / "final").is_dir() and not (t.remote_dir / "final").is_symlink()


def test_every_line_the_server_program_writes_to_stderr_reaches_the_user(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    noisy = tmp_path / "python-noisy"
    noisy.write_text('#!/bin/sh\necho "noisy: a line on stderr from the server" >&2\n'
                     'exec python3 "$@"\n')  # fmt: skip
    noisy.chmod(0o755)
    args = [*t.cli_args(), "--remote-python", str(noisy), "--dry-run"]
    r = runner.invoke(app, ["deploy", "--model", str(deploy_models["b"]), *args])
    assert r.exit_code == 0, r.output
    assert "server: noisy: a line on stderr from the server" in r.output


# --------------------------------------------------------------------------- garbage health


def test_a_health_endpoint_answering_non_http_bytes_swaps_back(server, deploy_models):
    t = server
    bad = model_digest(deploy_models["b"])[:8]
    with GarbageHealth(t, bad, "raw") as g:
        res = _deploy(t, deploy_models["b"], t.with_(health_url=g.url, health_timeout=4.0))
    assert isinstance(res.error, DeployError) and not isinstance(res.error, RollbackFailed)
    assert res.error.exit_code == ExitCode.DEPLOY and "BadStatusLine" in res.error.message
    assert res.hosts[0].rolled_back and t.link_target().endswith("-original")
    entry = t.log_lines()[-1]
    assert entry["rolled_back"] and not entry["ok"] and entry["state"] == "rolled_back"
    _ends_good(t, model_digest(deploy_models["a"]))


def test_a_non_integer_health_field_is_an_exception_that_swaps_back(deploy_target, deploy_models):
    t = deploy_target  # the reload path: /health's reload counter must move
    bad = model_digest(deploy_models["b"])[:8]
    with GarbageHealth(t, bad, "nonint") as g:
        res = _deploy(t, deploy_models["b"], t.with_(health_url=g.url))
    assert isinstance(res.error, DeployError) and not isinstance(res.error, RollbackFailed)
    assert "ValueError" in res.error.message and res.hosts[0].rolled_back
    assert t.link_target().endswith("-original") and t.log_lines()[-1]["rolled_back"]
    _ends_good(t, model_digest(deploy_models["a"]))


# --------------------------------------------------------------------------- killed go-lives


def test_a_go_live_killed_after_the_swap_is_finished_by_ftctl_status(
    server, deploy_models, tmp_path
):
    t = server
    doc = _killed_past_the_swap(t, deploy_models["b"], tmp_path)
    assert t.link_target() == f"releases/{doc['release']}"  # the unchecked release is live
    assert (t.remote_dir / ".ftctl" / "journal.json").exists()
    r = runner.invoke(app, ["status", *t.ssh_args()])
    assert r.exit_code == 0, r.output
    assert "recovered: a job that died under the lock was finished now" in r.output
    assert f"put back {doc['previous']} (the last checked release)" in r.output
    assert t.link_target() == f"releases/{doc['previous']}"
    entry = t.log_lines()[-1]
    assert entry["run"] == doc["run"] and entry["rolled_back"] and entry["state"] == "rolled_back"
    assert "the go-live died at step" in entry["error"] and entry["recovered"]["did"]
    assert t.status_doc()["state"] == "rolled_back"
    _ends_good(t, model_digest(deploy_models["a"]))
    r = runner.invoke(app, ["status", *t.ssh_args(), "--json"])  # nothing left to finish
    assert r.exit_code == 0 and json.loads(r.stdout)["hosts"][t.host]["recovered"] is None
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    assert res.hosts[0].recovered is None and res.hosts[0].previous == doc["previous"]
    _ends_good(t, model_digest(deploy_models["b"]))


def test_a_go_live_killed_after_the_swap_is_finished_by_the_next_deploy(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    doc = _killed_past_the_swap(t, deploy_models["b"], tmp_path)
    res = _deploy(t, deploy_models["c"])  # from "another machine": it finishes the job first
    assert res.ok, res.error
    h = res.hosts[0]
    assert h.recovered["state"] == "rolled_back" and h.recovered["run"] == doc["run"]
    assert any(f"put back {doc['previous']}" in w for w in h.warnings)
    assert h.previous == doc["previous"]  # not the unchecked release
    dead, new = t.log_lines()[-2:]
    assert dead["run"] == doc["run"] and dead["recovered"] and new["ok"]
    _ends_good(t, model_digest(deploy_models["c"]))


@pytest.mark.parametrize(
    "sig, says, logged",
    [
        (signal.SIGKILL, "killed by signal 9", "the go-live died at step"),
        (signal.SIGTERM, "interrupted by SIGTERM", "interrupted by SIGTERM"),
    ],
    ids=["sigkill", "sigterm"],
)
def test_a_go_live_signalled_after_the_swap_ends_on_the_previous_release(
    deploy_target, deploy_models, tmp_path, sig, says, logged
):
    """SIGTERM: the go-live swaps back itself. SIGKILL: the client that follows it sees it
    die and finishes its job at once, as the next ftctl command anywhere would."""
    t = deploy_target
    log = tmp_path / "client.log"
    proc = t.client(deploy_models["b"], log, cfg=_restart_path(t))
    doc = _after_swap(t)
    os.kill(doc["pid"], sig)
    assert proc.wait(180) == int(ExitCode.DEPLOY), log.read_text()
    assert says in log.read_text()
    entry = t.log_lines()[-1]
    assert entry["rolled_back"] and logged in entry["error"]
    assert bool(entry.get("recovered")) == (sig == signal.SIGKILL)
    assert t.status_doc()["state"] == "rolled_back"
    assert t.link_target() == f"releases/{doc['previous']}"
    _ends_good(t, model_digest(deploy_models["a"]))


def test_the_lock_holder_killed_after_the_hand_over_leaves_the_go_live_its_lock(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    owner = t.remote_dir / ".deploy.lock.owner"
    proc = t.client(deploy_models["b"], tmp_path / "client.log", cfg=_restart_path(t))
    session = wait_until(
        lambda: (o := _json(owner)).get("holder") == "session" and o, 60, "the lock holder"
    )
    doc = _after_swap(t)
    assert _json(owner)["holder"] == "golive" and _json(owner)["pid"] == doc["pid"]
    os.kill(session["pid"], signal.SIGTERM)  # its handler once removed the go-live's lock
    wait_until(lambda: not Path(f"/proc/{session['pid']}").exists(), 10, "the holder gone")
    if t.status_doc().get("state") == "running":
        assert not lock_free(t.remote_dir)  # the go-live still holds it
    proc.wait(180)
    final = wait_until(lambda: t.status_doc().get("state") not in (None, "running"), 120, "end")
    assert final and t.status_doc()["state"] == "ok"
    _ends_good(t, model_digest(deploy_models["b"]))


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- the lock


def test_two_deployers_at_once_one_proceeds_the_other_names_the_holder(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    cfg = _restart_path(t)
    logs = {m: tmp_path / f"{m}.log" for m in "bc"}
    procs = {m: t.client(deploy_models[m], logs[m], cfg=cfg) for m in "bc"}
    codes = {m: p.wait(300) for m, p in procs.items()}
    assert sorted(codes.values()) == [0, int(ExitCode.DEPLOY)], codes
    winner = next(m for m, c in codes.items() if c == 0)
    loser = next(m for m, c in codes.items() if c != 0)
    text = logs[loser].read_text()
    assert "another deploy holds the lock: held by" in text and " since " in text
    assert [e["ok"] for e in t.log_lines()] == [True]  # one deploy went live, once
    _ends_good(t, model_digest(deploy_models[winner]))


# --------------------------------------------------------------------------- no renameat2


def test_without_renameat2_the_first_deploy_moves_final_in_two_renames(
    server, deploy_models, monkeypatch
):
    t = server
    inode = (t.remote_dir / "final").stat().st_ino
    monkeypatch.setenv("FTCTL_NO_RENAMEAT2", "1")
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    backup = t.remote_dir / "releases" / res.hosts[0].backup
    assert backup.stat().st_ino == inode  # the directory itself, renamed (no copy)
    assert model_digest(backup) == model_digest(deploy_models["a"])
    assert (t.remote_dir / ".ftctl" / "index" / f"{backup.name}.json").exists()
    _ends_good(t, model_digest(deploy_models["b"]))


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_command(
    server, deploy_models, tmp_path
):
    t = server
    env = {"FTCTL_NO_RENAMEAT2": "1", "FTCTL_TEST_PAUSE_AT": "backup-renames"}
    proc = t.client(deploy_models["b"], tmp_path / "client.log", env=env)
    marker = t.remote_dir / ".ftctl" / "paused-backup-renames"
    pid = int(wait_until(lambda: marker.exists() and marker.read_text(), 120, "the pause"))
    assert not os.path.lexists(t.remote_dir / "final")  # the window: between two renames
    os.kill(pid, signal.SIGKILL)  # the server's process, mid-backup
    proc.kill()
    proc.wait(30)
    wait_until(lambda: lock_free(t.remote_dir), 10, "the lock released")
    r = runner.invoke(app, ["status", *t.ssh_args()])
    assert r.exit_code == 0, r.output
    assert "finished the first deploy's backup: final -> releases/" in r.output
    target = t.link_target()
    assert target.startswith("releases/") and target.endswith("-original")
    assert model_digest(t.remote_dir / target) == model_digest(deploy_models["a"])
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    assert f"releases/{res.hosts[0].previous}" == target
    _ends_good(t, model_digest(deploy_models["b"]))


# --------------------------------------------------------------------------- sizes, disks


def test_a_release_of_200_files(deploy_target, deploy_models, tmp_path):
    t = deploy_target
    model = tmp_path / "many" / "final"
    shutil.copytree(deploy_models["b"], model)
    (model / "manifest.json").unlink(missing_ok=True)
    for i in range(200):
        (model / "extra" / f"part-{i:03d}-of-a-long-file-name.txt").parent.mkdir(exist_ok=True)
        (model / "extra" / f"part-{i:03d}-of-a-long-file-name.txt").write_text(f"{i}\n")
    write_manifest(model, {"kind": "test"})
    res = _deploy(t, model)
    assert res.ok, res.error
    h = res.hosts[0]
    assert h.uploaded_files >= 200
    assert len(list((t.remote_dir / "releases" / h.release / "extra").iterdir())) == 200
    _ends_good(t, model_digest(model))


@pytest.fixture
def full_state_disk(deploy_target):
    """A 1 MiB tmpfs under <remote_dir>/.ftctl (the status file, the journal, the indexes)
    and the shell words that fill it."""
    state = deploy_target.remote_dir / ".ftctl"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "ftctl-deploy-test", state],
                   check=True)  # fmt: skip
    try:
        yield f"head -c 4M /dev/zero > {state}/filler 2>/dev/null; "
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_full_disk_under_the_status_file_after_the_swap_swaps_back(
    deploy_target, deploy_models, full_state_disk
):
    t = deploy_target  # the reload fills the disk: the next status write fails (ENOSPC)
    cfg = t.with_(reload_cmd=full_state_disk + t.cfg.reload_cmd)
    res = _deploy(t, deploy_models["b"], cfg)
    assert isinstance(res.error, DeployError) and not isinstance(res.error, RollbackFailed)
    assert "No space left on device" in res.error.message and res.hosts[0].rolled_back
    assert t.link_target().endswith("-original")
    entry = t.log_lines()[-1]
    assert entry["rolled_back"] and "No space left on device" in entry["error"]
    _ends_good(t, model_digest(deploy_models["a"]))


def test_a_go_live_done_within_one_poll_is_a_success(deploy_target, deploy_models):
    t = deploy_target
    cfg = t.with_(reload_cmd=None, restart_cmd="true", health_url=None)
    r = runner.invoke(app, ["deploy", "--model", str(deploy_models["b"]), *t.cli_args(cfg)])
    assert r.exit_code == 0, r.output
    assert "health: unchecked" in r.stdout.strip().splitlines()[-1]
    assert t.log_lines()[-1]["ok"]


# --------------------------------------------------------------------------- the state dir


def test_the_state_directory_is_root_only_and_nothing_in_it_is_run(
    deploy_target, deploy_models, tmp_path
):
    t = deploy_target
    state = t.remote_dir / ".ftctl"
    state.mkdir(mode=0o755)  # as an older ftctl (or the web user) left it
    ran, victim = tmp_path / "ran", tmp_path / "victim"
    # what an older ftctl ran as root without a hash check, planted by whoever could write here
    planted = f"open({str(ran)!r}, 'w').write('ran')\n"
    (state / f"golive-{program().sha256[:8]}.py").write_text(planted)
    victim.write_text("precious")
    (state / "status.json").symlink_to(victim)
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    assert not ran.exists() and victim.read_text() == "precious"
    assert not (state / "status.json").is_symlink()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for f in [p for p in state.rglob("*") if p.is_file() and not p.name.startswith("golive-")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE((t.remote_dir / "deploys.log").stat().st_mode) == 0o640
    assert stat.S_IMODE((t.remote_dir / ".deploy.lock").stat().st_mode) == 0o600
    _ends_good(t, model_digest(deploy_models["b"]))
