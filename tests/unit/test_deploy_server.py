"""The server program's own logic, on this machine: framing, the shipped zip and its loader,
the flock lock, the journal's recovery, the systemd settle watch, the import boundary and the
Python floor (vermin). The same code against real sshds: tests/integration/test_deploy_golive.py.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ftctl.deploy.program import program
from ftctl.deploy.server import golive, journal, recovery, shared
from ftctl.deploy.server.lock import Lock, holder, is_held, proc_start
from ftctl.deploy.server.shared import Frames, decode, frame, frame_bytes

SERVER = Path(__file__).resolve().parents[2] / "ftctl" / "deploy" / "server"
# the client modules that drive a deploy (the lead's list, and what ships the program)
CLIENT = [SERVER.parent / f"{m}.py" for m in ("plan", "history", "host", "fleet", "session",
          "program", "transfer", "tdsend", "results", "local", "__init__")] + list(
    (SERVER.parents[1] / "cli").glob("*.py"))  # fmt: skip


def test_frames_survive_any_split_and_any_size():
    msgs = [
        {"a": 1},
        {"text": "帮我打卡" * 3000},
        {"files": {f"f{i}": "x" * 64 for i in range(300)}},
    ]
    stream = b"".join(frame(m) for m in msgs)
    assert len(stream) > 4096 * 8  # far over the old 4 KiB line
    for step in (1, 3, 4095, 65536):
        frames, got = Frames(), []
        for i in range(0, len(stream), step):
            payloads, noise = frames.feed(stream[i : i + step])
            assert noise == b""
            got += [decode(p) for p in payloads]
        assert got == msgs


def test_text_before_a_frame_is_noise_not_a_message():
    payloads, noise = Frames().feed(b"Welcome to the panel!\n" + frame({"ok": True}) + b"bye")
    assert [decode(p) for p in payloads] == [{"ok": True}]
    assert noise == b"Welcome to the panel!\nbye"


def test_a_magic_split_across_reads_is_not_lost():
    data = frame({"x": 1})
    frames = Frames()
    assert frames.feed(b"noise" + data[:2]) == ([], b"noise")
    assert [decode(p) for p in frames.feed(data[2:])[0]] == [{"x": 1}]


def _run_boot(sha: str, sub: str, req: dict, python: str = sys.executable):
    p = program()
    cmd = p.command(python, sub).replace(p.sha256, sha)
    return subprocess.run(cmd, shell=True, input=p.stdin(req), capture_output=True, timeout=60)


def test_the_program_is_every_server_file_and_boot_checks_its_sha256(tmp_path):
    import io
    import zipfile

    p = program()
    names = set(zipfile.ZipFile(io.BytesIO(p.data)).namelist())
    assert names == {f"ftctl_server/{f.name}" for f in SERVER.glob("*.py")}
    assert p.sha256 == __import__("hashlib").sha256(p.data).hexdigest()
    req = {"remote_dir": str(tmp_path), "link": "final"}
    ok = _run_boot(p.sha256, "probe", req)
    assert ok.returncode == 0, ok.stderr
    (answer,), noise = Frames().feed(ok.stdout)
    assert decode(answer)["link"] == "missing" and noise == b""
    bad = _run_boot("0" * 64, "probe", req)
    assert bad.returncode == shared.EXIT_BAD_PROGRAM and b"does not match its sha256" in bad.stderr
    assert bad.stdout == b""


def test_an_exception_in_the_server_program_reaches_stderr(tmp_path):
    res = _run_boot(program().sha256, "probe", {"link": "final"})  # no remote_dir
    assert res.returncode == 1 and b"KeyError: 'remote_dir'" in res.stderr


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
    return out


def test_client_code_imports_only_shared_from_the_server_program():
    for path in CLIENT:
        server = {m for m in _imports(path) if m.startswith("ftctl.deploy.server")}
        allowed = {"ftctl.deploy.server.shared"}
        assert {m for m in server if not m.startswith("ftctl.deploy.server.shared")} == set(), path
        assert all(m.startswith(tuple(allowed)) for m in server), path


def test_the_server_program_imports_nothing_of_the_client():
    for path in SERVER.glob("*.py"):
        assert not [m for m in _imports(path) if m.startswith(("ftctl", "typer", "fabric"))], path


def test_the_server_program_runs_on_python_3_6_says_vermin():
    res = subprocess.run(
        [str(Path(sys.executable).parent / "vermin"), "-t=3.6-", "--violations", "--no-tips",
         "--eval-annotations", str(SERVER)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    first = Lock.take(str(tmp_path))
    assert first is not None and is_held(str(tmp_path))
    first.write_owner({"owner": "root@ci-3", "pid": os.getpid(), "start": proc_start(os.getpid())})
    assert Lock.take(str(tmp_path), wait=0.2) is None  # another open file: refused
    assert holder(str(tmp_path))["owner"] == "root@ci-3"
    assert stat.S_IMODE((tmp_path / shared.LOCK).stat().st_mode) == 0o600
    first.release()
    assert not is_held(str(tmp_path)) and holder(str(tmp_path)) is None
    assert (tmp_path / shared.LOCK).exists()  # never removed: that would break the lock
    again = Lock.take(str(tmp_path), wait=0)
    assert again is not None
    again.release()


def test_a_lock_file_replaced_by_a_symlink_is_refused(tmp_path):
    (tmp_path / shared.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        Lock.take(str(tmp_path))
    assert not (tmp_path / "elsewhere").exists()


def _job(d: Path, **kw) -> dict:
    job = {
        "id": "d1", "run": "r1", "action": "deploy", "remote_dir": str(d), "link": "final",
        "release": "20261201000001-bbbbbbbb", "previous": "20261201000000-original",
        "restart_cmd": f"echo restarted >> {d}/restarts", "reload_cmd": None,
        "health_url": None, "health_cmd": None, "health_timeout": 5, "health_settle": 0,
        "command_timeout": 30, "smoke": [],
    }  # fmt: skip
    job.update(kw)
    return job


def _releases(d: Path, job: dict) -> None:
    for name in (job["previous"], job["release"]):
        (d / "releases" / name).mkdir(parents=True)


def test_recovery_puts_back_the_last_checked_release_after_a_kill_past_the_swap(tmp_path):
    d = tmp_path
    job = _job(d)
    _releases(d, job)
    os.symlink(f"releases/{job['release']}", d / "final")  # swapped, then killed
    journal.write(str(d), {"op": "golive", "phase": "swap", "job": job})
    st = golive.Status(str(d), job)
    st.step("restart", job["restart_cmd"])
    rep = recovery.finish_dead(str(d), {"owner": "ops@laptop"})
    assert (
        rep["state"] == "rolled_back" and "put back" in rep["did"] and rep["died_at"] == "restart"
    )
    assert os.readlink(d / "final") == f"releases/{job['previous']}"
    assert (d / "restarts").read_text() == "restarted\n"
    assert journal.read(str(d)) is None
    (entry,) = [json.loads(x) for x in (d / shared.LOG).read_text().splitlines()]
    assert (
        entry["rolled_back"] and entry["run"] == "r1" and entry["recovered"]["by"] == "ops@laptop"
    )
    assert json.loads((d / ".ftctl" / shared.STATUS).read_text())["state"] == "rolled_back"
    assert stat.S_IMODE((d / shared.LOG).stat().st_mode) == 0o640
    assert stat.S_IMODE((d / ".ftctl").stat().st_mode) == 0o700
    assert recovery.finish_dead(str(d), {}) is None  # done once


def test_recovery_changes_nothing_when_the_go_live_died_before_its_swap(tmp_path):
    d = tmp_path
    job = _job(d)
    _releases(d, job)
    os.symlink(f"releases/{job['previous']}", d / "final")
    journal.write(str(d), {"op": "golive", "phase": "swap", "job": job})
    rep = recovery.finish_dead(str(d), {})
    assert rep["state"] == "failed" and "nothing changed" in rep["did"]
    assert not (d / "restarts").exists()  # the service was not touched


def test_recovery_without_a_previous_release_rechecks_the_live_one(tmp_path):
    d = tmp_path
    job = _job(d, previous=None, health_cmd="false", health_timeout=0.5)
    (d / "releases" / job["release"]).mkdir(parents=True)
    os.symlink(f"releases/{job['release']}", d / "final")
    journal.write(str(d), {"op": "golive", "phase": "swap", "job": job})
    rep = recovery.finish_dead(str(d), {})
    assert rep["state"] == "rollback_failed" and "fails its checks" in rep["did"]


def test_a_backup_killed_between_its_two_renames_is_completed(tmp_path):
    d = tmp_path
    (d / "releases" / "20261201000000-original").mkdir(parents=True)  # final/ moved here
    tmp = d / ".final.tmp-abc"
    os.symlink("releases/20261201000000-original", tmp)
    journal.write(str(d), {"op": "backup", "link": "final", "backup": "20261201000000-original",
                           "tmp": str(tmp)})  # fmt: skip
    rep = recovery.finish_dead(str(d), {})
    assert rep["ok"] and "finished the first deploy's backup" in rep["did"]
    assert os.readlink(d / "final") == "releases/20261201000000-original" and not tmp.exists()


FAKE_SYSTEMCTL = """#!/bin/sh
# `systemctl show` of a unit whose process is replaced after N calls (a crash loop)
n=$(cat "$0.count" 2>/dev/null || echo 0); echo $((n + 1)) > "$0.count"
if [ "$n" -ge "$CRASH_AFTER" ]; then pid=200; restarts=1; else pid=100; restarts=0; fi
echo "MainPID=$pid"; echo "NRestarts=$restarts"; echo "ActiveState=active"
"""


@pytest.mark.parametrize("crash_after", [2, 1000], ids=["crash-loop", "steady"])
def test_settle_fails_a_unit_whose_main_process_changes(tmp_path, monkeypatch, crash_after):
    fake = tmp_path / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    monkeypatch.setenv("CRASH_AFTER", str(crash_after))
    if crash_after == 2:
        with pytest.raises(golive.Failure, match=r"did not stay up.*MainPID 100 -> 200"):
            golive.settle(str(fake), "python-services", 3.0)
    else:
        got = golive.settle(str(fake), "python-services", 1.0)
        assert got["ActiveState"] == "active" and got["MainPID"] == "100"


def test_the_status_file_and_the_journal_are_never_written_through_a_symlink(tmp_path):
    d = tmp_path
    (d / ".ftctl").mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / ".ftctl" / shared.STATUS).symlink_to(victim)
    golive.Status(str(d), _job(d)).write()
    assert victim.read_text() == "precious"
    assert not (d / ".ftctl" / shared.STATUS).is_symlink()
    assert stat.S_IMODE((d / ".ftctl" / shared.STATUS).stat().st_mode) == 0o600


def test_frame_bytes_carries_the_program_itself():
    data = bytes(range(256)) * 100 + shared.MAGIC  # binary, even with MAGIC inside
    (got,), noise = Frames().feed(frame_bytes(data))
    assert got == data and noise == b""
