"""`--docker` runs that last, against a real Docker engine and the real training image.

A real `ftctl train --docker` process gets real signals (SIGINT as from Ctrl-C, SIGTERM as
from a CI timeout); a client with a short read timeout follows a run that stays silent longer
than that; GPUs, the OOM killer, a dropped log connection and the user's paths are checked on
the containers the engine really makes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.errors import ContainerKilled, ExitCode
from ftctl.image import container as container_mod
from ftctl.image.container import Mount, RunSpec, create_container, gpu_plan, run_in_image
from tests.integration.docker_fixtures import REPO, UID, chown_tree, readable_copy, small_data

pytestmark = [pytest.mark.integration, pytest.mark.docker]

runner = CliRunner()


@pytest.fixture
def proj(tmp_path, tiny_model_dir, monkeypatch):
    """(project root owned by UID with data/new.jsonl + data/old.jsonl, base model outside)."""
    tmp_path.chmod(0o755)
    root = tmp_path / "proj"
    (root / "models").mkdir(parents=True)
    small_data(root / "data" / "new.jsonl", per_label=8)
    small_data(root / "data" / "old.jsonl", per_label=8, source="original_training_data")
    shutil.copy(REPO / "data" / "incremental_samples.yaml", root / "data")
    chown_tree(root)
    model = readable_copy(tiny_model_dir, tmp_path / "outside" / "base")
    monkeypatch.chdir(root)
    monkeypatch.setenv("FTCTL_DOCKER_USER", f"{UID}:{UID}")
    monkeypatch.delenv("FTCTL_CONFIG", raising=False)
    return root, model


def _train_args(model: Path, out: str, *more: str) -> list[str]:
    return [
        "train",
        "--new-data",
        "data/new.jsonl",
        "--old-data",
        "data/old.jsonl",
        "--model-path",
        str(model),
        "--output-path",
        out,
        *more,
    ]


def _in_image(root: Path, model: Path, out: str, *more: str) -> tuple[list[str], list[Mount]]:
    """Train arguments and mounts for :func:`run_in_image` (what --docker would make)."""
    args = [
        "train",
        "--new-data", "/workspace/data/new.jsonl",
        "--old-data", "/workspace/data/old.jsonl",
        "--model-path", "/mnt/base",
        "--output-path", f"/workspace/models/{out}",
        *more,
    ]  # fmt: skip
    mounts = [
        Mount(root / "data", "/workspace/data", read_only=True),
        Mount(root / "models", "/workspace/models", read_only=False),
        Mount(model, "/mnt/base", read_only=True),
    ]
    return args, mounts


def _containers_for(client, marker: str) -> list:
    """Containers (any state) whose command mentions ``marker``."""
    return [
        c
        for c in client.containers.list(all=True, filters={"label": "ftctl.command"})
        if marker in c.labels.get("ftctl.command", "")
    ]


# --------------------------------------------------------------------------- signals


def _start_long_training(root: Path, model: Path, image: str, out: str, logs: Path):
    """A real `ftctl train --docker` process that trains for a long time (no early stop)."""
    cmd = [
        sys.executable, "-m", "ftctl",
        *_train_args(model, out, "--epochs", "500", "--patience", "0", "--freeze-layers", "0"),
        "--docker", "--image", image,
    ]  # fmt: skip
    env = {**os.environ, "FTCTL_DOCKER_USER": f"{UID}:{UID}"}
    return subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=(logs / "out").open("wb"),
        stderr=(logs / "err").open("wb"),
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )


def _ctrl_c_as_at_a_terminal() -> None:
    """A job a shell script starts in the background (`.ci/run &`, some CI runners) inherits
    SIGINT ignored, and Python then keeps ignoring it; ftctl at a terminal has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint files (not the hidden temporary file of one being written)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def _wait_for_checkpoint(proc, checkpoints: Path, logs: Path, timeout: float = 300) -> None:
    """Until the first epoch has ended inside the container (its checkpoint is on the host)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _checkpoints(checkpoints):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no checkpoint in time; stderr:\n{(logs / 'err').read_text()[-3000:]}")


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [
        (signal.SIGINT, ExitCode.INTERRUPTED, "interrupted"),
        (signal.SIGTERM, ExitCode.TERMINATED, "terminated (SIGTERM)"),
    ],
)
def test_a_signal_to_ftctl_reaches_the_inner_train_which_keeps_its_checkpoint(
    proj, ftctl_image, docker_engine, tmp_path, sig, code, said
):
    """Ctrl-C (SIGINT) or SIGTERM to the client: SIGINT reaches the inner train (it says how
    to resume), its checkpoint is on the host, the container is gone, ftctl exits 130/143."""
    root, model = proj
    out = f"models/sig-{sig.name.lower()}-{os.getpid()}"
    proc = _start_long_training(root, model, ftctl_image, out, tmp_path)
    try:
        _wait_for_checkpoint(proc, root / out / "checkpoints", tmp_path)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    except BaseException:  # the test failed: leave no client nor container behind
        proc.kill()
        for leftover in _containers_for(docker_engine, out.split("/")[-1]):
            leftover.remove(force=True)
        raise
    err = (tmp_path / "err").read_text()
    assert rc == code, err[-3000:]
    assert "sent SIGINT to the container" in err
    assert "--resume" in err  # the inner train's own words: it got SIGINT, not SIGKILL
    assert said in err
    assert _checkpoints(root / out / "checkpoints")
    assert not (root / out / "final").exists()
    assert _containers_for(docker_engine, out.split("/")[-1]) == []


# --------------------------------------------------------------------------- long silence


def _run_timed(cmd: list[str], cwd: Path) -> tuple[int, bytes, bytes, float]:
    """Run ``cmd``; (exit code, stdout, stderr, longest silence between output chunks)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    stamps: list[float] = [started]
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def pump(name: str, stream) -> None:
        while data := stream.read1(65536):
            stamps.append(time.monotonic())
            chunks[name].append(data)

    threads = [
        threading.Thread(target=pump, args=("out", proc.stdout)),
        threading.Thread(target=pump, args=("err", proc.stderr)),
    ]
    for t in threads:
        t.start()
    rc = proc.wait(timeout=600)
    for t in threads:
        t.join()
    stamps.sort()
    silence = max(b - a for a, b in itertools.pairwise(stamps))
    return rc, b"".join(chunks["out"]), b"".join(chunks["err"]), silence


def test_a_run_silent_longer_than_the_read_timeout_returns_its_whole_log_and_json(
    proj, ftctl_image, tmp_path_factory
):
    """[image] read_timeout = 1 s; a --quiet --json run prints nothing until its document
    (imports and training take several seconds); the document still arrives whole, in host
    paths. The old data comes from ftctl.toml as a path relative to the file: inside, it means
    the same file."""
    root, model = proj
    (root / "ftctl.toml").write_text(
        '[image]\nread_timeout = 1\n[train]\nold_data = "data/old.jsonl"\n'
    )
    dest = tmp_path_factory.mktemp("dk")  # outside the project, like the issue's /tmp/dk
    chown_tree(dest)  # the caller's own directory
    args = _train_args(model, str(dest), "--epochs", "4", "--freeze-layers", "0", "--json")
    i = args.index("--old-data")
    del args[i : i + 2]
    cmd = [
        sys.executable, "-m", "ftctl", "--quiet",  # --json alone keeps the log on stderr
        *args, "--docker", "--image", ftctl_image,
    ]  # fmt: skip
    env_user = os.environ.get("FTCTL_DOCKER_USER")
    assert env_user == f"{UID}:{UID}"
    rc, out, err, silence = _run_timed(cmd, root)
    log = err.decode()
    assert rc == 0, log[-3000:]
    assert silence > 2.0, f"the run was never silent for 2 read timeouts ({silence:.1f} s)"
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["final_dir"] == str(dest / "final")  # the host path, not /mnt/host/...
    assert (dest / "final" / "model.safetensors").is_file()
    assert "/mnt/host" not in log and "/workspace" not in log
    manifest = json.loads((dest / "final" / "manifest.json").read_text())
    assert manifest["data"]["old"]["path"] == str(root / "data" / "old.jsonl")


@pytest.fixture
def dropped_engine_connections(monkeypatch):
    """drop(): shut down every connection the docker SDK opened to the engine (a request in
    flight fails as on an engine restart; the SDK reconnects for the next one). Returns the
    failures the runner saw while waiting on the container."""
    from docker.transport import unixconn

    opened: list = []
    real_connect = unixconn.UnixHTTPConnection.connect

    def connect(self):
        real_connect(self)
        opened.append(self.sock)

    monkeypatch.setattr(unixconn.UnixHTTPConnection, "connect", connect)
    failures: list[Exception] = []
    real_unanswered = container_mod._State._unanswered

    def unanswered(self, exc, wait):
        failures.append(exc)
        return real_unanswered(self, exc, wait)

    monkeypatch.setattr(container_mod._State, "_unanswered", unanswered)

    def drop() -> int:
        n = 0
        for sock in list(opened):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                n += 1
        return n

    return drop, failures


class _Sink(io.BytesIO):
    """A byte stream another thread may watch."""

    def text(self) -> str:
        return self.getvalue().decode(errors="replace")


def test_the_log_survives_dropped_engine_connections_without_a_lost_or_repeated_line(
    proj, ftctl_image, docker_engine, dropped_engine_connections
):
    """The command inside writes its log to files in a mounted folder, followed by offset:
    the engine's connections are shut down three times while it trains, the waits in flight
    fail and are retried, and every line arrives exactly once."""
    drop, failures = dropped_engine_connections
    root, model = proj
    out, err = _Sink(), _Sink()
    args, mounts = _in_image(root, model, "drop", "--epochs", "3")
    dropped: list[int] = []

    def dropper() -> None:
        deadline = time.monotonic() + 300
        while "checking inputs" not in err.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(3):
            dropped.append(drop())
            time.sleep(1.0)

    thread = threading.Thread(target=dropper, daemon=True)
    thread.start()
    code = run_in_image(
        args,
        image=ftctl_image,
        mounts=mounts,
        user=f"{UID}:{UID}",
        stdout=out,
        stderr=err,
        client=docker_engine,
    )
    thread.join(10)
    log = err.text()
    assert code == 0, log[-3000:]
    assert sum(dropped) >= 3 and failures, (dropped, failures)  # it really dropped, and was seen
    assert log.count("checking inputs") == 1 and log.count("writing the model") == 1
    for epoch in (1, 2, 3):
        assert log.count(f"epoch {epoch}: train_loss") == 1
    last = out.text().strip().splitlines()[-1]
    assert last.startswith("wrote /workspace/models/drop/final  (best epoch")


@pytest.mark.parametrize(
    ("shm_size", "ipc", "processes", "shm_bytes", "ipc_mode"),
    [
        ("auto", "private", 2, 2 << 30, "private"),  # NCCL's room: 1g per process
        ("auto", "private", 1, 64 << 20, "private"),  # one process: docker's default
        ("512m", "private", 4, 512 << 20, "private"),
        ("auto", "host", 2, None, "host"),
    ],
)
def test_the_container_gets_the_shm_size_ipc_grace_and_log_folder_asked_for(
    ftctl_image, docker_engine, monkeypatch, shm_size, ipc, processes, shm_bytes, ipc_mode
):
    """What the engine made, read back with `docker inspect` while the container runs:
    HostConfig.ShmSize / IpcMode, $FTCTL_STOP_GRACE, the log folder mounted read-write; and
    the command's output (`ftctl --version`) came through the log file."""
    seen: dict = {}
    real = container_mod.supervise

    def inspecting(client, container, *rest):
        seen.update(client.api.inspect_container(container.id))
        return real(client, container, *rest)

    monkeypatch.setattr(container_mod, "supervise", inspecting)
    out = io.BytesIO()
    code = run_in_image(
        ["--version"], image=ftctl_image, gpus="none", gpus_used=processes,
        shm_size=shm_size, ipc=ipc, stop_grace=45, stdout=out, client=docker_engine,
    )  # fmt: skip
    assert code == 0 and out.getvalue().decode().startswith("ftctl")
    host = seen["HostConfig"]
    assert host["IpcMode"] == ipc_mode
    if shm_bytes is not None:
        assert host["ShmSize"] == shm_bytes
    assert "FTCTL_STOP_GRACE=45" in seen["Config"]["Env"]
    (log_mount,) = [m for m in seen["Mounts"] if m["Destination"] == container_mod.LOG_MOUNT]
    assert log_mount["RW"] is True
    assert not Path(log_mount["Source"]).exists()  # removed with the container


# --------------------------------------------------------------------------- GPUs


@pytest.fixture
def nvidia_all_image(docker_engine, ftctl_image):
    """The project image with the CUDA base's ``NVIDIA_VISIBLE_DEVICES=all`` in its env."""
    tag = "ftctl-docker-test:nvidia-env"
    dockerfile = f"FROM {ftctl_image}\nENV NVIDIA_VISIBLE_DEVICES=all\n"
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    yield tag
    docker_engine.images.remove(tag, force=True)


@pytest.mark.parametrize(
    ("gpus", "used", "env", "request_"),
    [
        ("none", 0, "void", None),
        ("auto", 0, "void", None),  # data generate: uses none
        ("0,2", 0, "all", {"DeviceIDs": ["0", "2"], "Count": 0}),
        ("auto", 2, "all", {"DeviceIDs": None, "Count": 2}),  # train --nproc 2
        ("all", 0, "all", {"DeviceIDs": None, "Count": -1}),
    ],
)
def test_gpus_become_the_right_container_settings(
    docker_engine, nvidia_all_image, gpus, used, env, request_
):
    img = docker_engine.images.get(nvidia_all_image)
    spec = RunSpec(argv=("--version",), environment={})
    created = create_container(docker_engine, img.id, spec, gpu_plan(gpus, used))
    try:
        attrs = docker_engine.api.inspect_container(created.id)
        visible = [e for e in attrs["Config"]["Env"] if e.startswith("NVIDIA_VISIBLE_DEVICES=")]
        assert visible == [f"NVIDIA_VISIBLE_DEVICES={env}"]
        requests = attrs["HostConfig"]["DeviceRequests"]
        if request_ is None:
            assert not requests
        else:
            (req,) = requests
            assert req["Capabilities"] == [["gpu"]]
            assert req["Count"] == request_["Count"]
            assert (req["DeviceIDs"] or None) == request_["DeviceIDs"]
    finally:
        created.remove(force=True)


def test_gpus_none_runs_where_the_image_asks_for_all_gpus(proj, nvidia_all_image):
    res = runner.invoke(
        app, ["data", "generate", "--per-intent", "2", "--docker", "--gpus", "none",
              "--image", nvidia_all_image],
    )  # fmt: skip
    assert res.exit_code == 0, res.output


def test_gpu_ids_on_an_engine_without_gpus_are_a_clear_error(proj, ftctl_image):
    res = runner.invoke(
        app, ["data", "generate", "--docker", "--gpus", "0,2", "--image", ftctl_image]
    )
    assert res.exit_code == ExitCode.ENVIRONMENT, res.output
    assert "no GPU support" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------- killed


def test_an_oom_kill_is_explained(proj, ftctl_image, docker_engine):
    root, model = proj
    (root / "ftctl.toml").write_text('[image]\nmemory = "96m"\n')
    res = runner.invoke(
        app, [*_train_args(model, "models/oom"), "--docker", "--image", ftctl_image, "--json"]
    )
    assert res.exit_code == 137, res.output
    assert "ran out of memory" in res.output and "[image] memory" in res.output
    assert json.loads(res.stdout)["error"] == "ContainerKilled"
    assert _containers_for(docker_engine, "models/oom") == []


def test_a_sigkill_from_outside_is_explained(proj, ftctl_image, docker_engine):
    root, model = proj
    args, mounts = _in_image(root, model, "killed", "--epochs", "500", "--patience", "0")

    def kill_when_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for c in _containers_for(docker_engine, "/workspace/models/killed"):
                if c.status == "running":
                    c.kill()
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    try:
        with pytest.raises(ContainerKilled) as info:
            run_in_image(
                args,
                image=ftctl_image,
                mounts=mounts,
                user=f"{UID}:{UID}",
                stderr=io.BytesIO(),
                client=docker_engine,
            )
    finally:
        killer.join()
    assert "SIGKILL" in info.value.message and info.value.exit_code == 137


# --------------------------------------------------------------------------- the user's paths


def test_a_data_error_under_docker_names_the_host_file_and_line(proj, ftctl_image):
    root, model = proj
    bad = root / "data" / "bad.jsonl"
    bad.write_text(
        '{"text": "帮我打卡", "label": "CLOCK_IN"}\n'
        '{"text": "今天出勤", "label": "ATTENDANCE_TODAY"}\n'
        '{"text": "没有标签"}\n',
        encoding="utf-8",
    )
    args = [
        "train", "--new-data", "data/bad.jsonl", "--model-path", str(model),
        "--docker", "--image", ftctl_image,
    ]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == ExitCode.DATA, res.output
    assert f"{bad}:3" in res.output
    assert f"ftctl data validate {bad}" in res.output  # the hint, in host paths too
    assert "/workspace" not in res.output
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert doc["problems"][0]["file"] == str(bad) and doc["problems"][0]["line"] == 3
