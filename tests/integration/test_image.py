"""The training image against a real Docker engine (started by fixtures if none answers).

The CUDA base cannot be pulled here, so the SAME Dockerfile is built on a local stand-in base
(debootstrap bookworm + Python 3.11 + the torch 2.13.0 CPU wheel): see docker_fixtures.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl import __version__
from ftctl.cli.main import app
from ftctl.errors import ExitCode, ImageError
from ftctl.image import Mount, build_image, run_in_image
from tests.helpers import write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REPO = Path(__file__).resolve().parents[2]
UID = 1234  # a non-root caller: what the container writes must belong to it
runner = CliRunner()


def _chown_tree(root: Path, uid: int) -> None:
    for p in [root, *root.rglob("*")]:
        os.chown(p, uid, uid)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project directory (data/ with the shipped templates, models/) owned by UID."""
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(REPO / "data" / "incremental_samples.yaml", root / "data")
    _chown_tree(root, UID)
    tmp_path.chmod(0o755)
    monkeypatch.chdir(root)
    monkeypatch.setenv("FTCTL_DOCKER_USER", f"{UID}:{UID}")
    monkeypatch.delenv("FTCTL_CONFIG", raising=False)
    return root


def test_image_builds_with_the_contract(docker_engine, ftctl_image):
    img = docker_engine.images.get(ftctl_image)
    cfg = img.attrs["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert cfg["Entrypoint"] == ["ftctl"]
    assert cfg["WorkingDir"] == "/workspace"
    assert cfg["User"] == "1000"  # non-root by default
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert env["PYTHONHASHSEED"] == "0"
    out = io.BytesIO()
    code = run_in_image(["--version"], image=ftctl_image, stdout=out, client=docker_engine)
    assert code == 0
    assert out.getvalue().decode().strip() == f"ftctl {__version__}"


def test_data_generate_in_docker_writes_the_same_bytes_as_on_the_host(project, ftctl_image):
    args = ["data", "generate", "--per-intent", "15", "--seed", "7"]
    host = runner.invoke(app, [*args, "--out-dir", "host_out"])
    assert host.exit_code == 0, host.output
    res = runner.invoke(
        app, [*args, "--out-dir", "data/docker_out", "--docker", "--image", ftctl_image]
    )
    assert res.exit_code == 0, res.output
    for name in ("incremental_training_data.jsonl", "incremental_training_data.csv"):
        made = project / "data" / "docker_out" / name
        assert made.read_bytes() == (project / "host_out" / name).read_bytes()
        assert made.stat().st_uid == UID  # the caller owns what the container wrote


def test_the_inner_exit_code_and_error_come_back(project, ftctl_image):
    res = runner.invoke(
        app, ["data", "generate", "--per-intent", "0", "--docker", "--image", ftctl_image]
    )
    assert res.exit_code == ExitCode.USAGE
    assert "data.per_intent" in res.output


def test_gpus_on_an_engine_without_gpu_support_is_a_clear_error(project, ftctl_image):
    res = runner.invoke(
        app, ["data", "generate", "--docker", "--gpus", "all", "--image", ftctl_image]
    )
    assert res.exit_code == ExitCode.ENVIRONMENT
    assert "no GPU support" in res.output
    assert "--gpus none" in res.output


def test_missing_image_says_how_to_build_one(project, docker_engine):
    res = runner.invoke(app, ["data", "generate", "--docker", "--image", "ftctl:no-such-tag"])
    assert res.exit_code == ExitCode.ERROR
    assert "ftctl image build" in res.output


def test_no_engine_is_a_clear_environment_error(project, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{project}/dead.sock")
    for args in (["image", "ls"], ["data", "generate", "--docker"]):
        res = runner.invoke(app, args)
        assert res.exit_code == ExitCode.ENVIRONMENT, res.output
        assert "no Docker engine answers" in res.output
        assert "Traceback" not in res.output


def test_failed_build_raises_image_error_with_the_log_tail(
    tmp_path, docker_engine, test_base_image
):
    (tmp_path / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo boom-marker-42 && exit 3\n"
    )
    with pytest.raises(ImageError) as info:
        build_image(
            tmp_path, base_image=test_base_image, tags=["ftctl-fail:t"], client=docker_engine
        )
    assert "boom-marker-42" in info.value.message
    assert "returned a non-zero code: 3" in info.value.message


def test_container_output_goes_to_the_given_streams_and_mount_is_read_only(
    tmp_path, docker_engine, ftctl_image
):
    src = tmp_path / "in"
    src.mkdir()
    tmp_path.chmod(0o755)
    (src / "a.jsonl").write_text('{"text": "帮我打卡", "label": "CLOCK_IN"}\n')
    out, err = io.BytesIO(), io.BytesIO()
    code = run_in_image(
        ["data", "validate", "/mnt/in/a.jsonl"],
        image=ftctl_image,
        mounts=[Mount(src, "/mnt/in", read_only=True)],
        stdout=out,
        stderr=err,
        client=docker_engine,
    )
    assert code == 0, err.getvalue().decode()
    assert b"a.jsonl" in out.getvalue() + err.getvalue()
    assert not docker_engine.containers.list(all=True, filters={"ancestor": ftctl_image})


class _InterruptingSink(io.BytesIO):
    """Stands for a user pressing Ctrl-C while the container's output streams."""

    def write(self, data):
        raise KeyboardInterrupt


def test_ctrl_c_stops_and_removes_the_container(docker_engine, ftctl_image):
    before = {c.id for c in docker_engine.containers.list(all=True)}
    with pytest.raises(KeyboardInterrupt):
        run_in_image(
            ["--help"], image=ftctl_image, stdout=_InterruptingSink(), client=docker_engine
        )
    assert {c.id for c in docker_engine.containers.list(all=True)} == before


def test_cli_build_tags_version_and_sha_and_docker_defaults_to_the_newest(
    project, test_base_image, ftctl_image, docker_engine
):
    res = runner.invoke(
        app, ["image", "build", "--base-image", test_base_image, "--context", str(REPO), "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    versioned, latest = doc["tags"]
    assert versioned.startswith(f"ftctl:{__version__}-") and latest == "ftctl:latest"
    assert docker_engine.images.get(latest).id == doc["image_id"]
    listed = json.loads(runner.invoke(app, ["image", "ls", "--json"]).stdout)["images"]
    assert listed[0]["id"] == doc["image_id"]
    gen = runner.invoke(app, ["data", "generate", "--per-intent", "3", "--docker"])  # no --image
    assert gen.exit_code == 0, gen.output
    assert (project / "data" / "incremental_training_data.jsonl").stat().st_uid == UID


# --------------------------------------------------------------------------- ftctl train --docker


def _small_data(path: Path, per_label: int = 8) -> Path:
    """The first rows of each label of the shipped incremental data."""
    rows: dict[str, list[str]] = {}
    for line in (REPO / "data" / "incremental_training_data.jsonl").read_text().splitlines():
        ex = json.loads(line)
        rows.setdefault(ex["label"], [])
        if len(rows[ex["label"]]) < per_label:
            rows[ex["label"]].append(ex["text"])
    return write_jsonl(path, [(t, lab) for lab, texts in rows.items() for t in texts])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, ftctl_image):
    """Two `ftctl train --docker` runs (as UID) and one on the host, same seed and inputs."""
    base = tmp_path_factory.mktemp("train")
    base.chmod(0o755)
    root = base / "proj"
    (root / "models").mkdir(parents=True)
    _small_data(root / "data" / "new.jsonl")
    model = base / "outside" / "base-model"  # outside data/ and models/: mounted read-only
    shutil.copytree(tiny_model_dir, model)
    for p in [base / "outside", *model.rglob("*"), model]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    _chown_tree(root, UID)
    args = [
        "train",
        "--new-data",
        "data/new.jsonl",
        "--model-path",
        str(model),
        "--epochs",
        "1",
        "--seed",
        "3",
        "--batch-size",
        "8",
        "--freeze-layers",
        "8",
    ]
    old = Path.cwd()
    os.chdir(root)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FTCTL_DOCKER_USER", f"{UID}:{UID}")
            runs = {}
            for name in ("docker1", "docker2"):
                res = runner.invoke(
                    app,
                    [*args, "--output-path", f"models/{name}", "--docker", "--image", ftctl_image],
                )
                runs[name] = res
            runs["host"] = runner.invoke(app, [*args, "--output-path", "models/host"])
    finally:
        os.chdir(old)
    return root, runs


def test_train_in_docker_writes_final_owned_by_the_caller(trained, ftctl_image):
    root, runs = trained
    assert runs["docker1"].exit_code == 0, runs["docker1"].output
    final = root / "models" / "docker1" / "final"
    assert (final / "model.safetensors").is_file()
    assert (final / "model.safetensors").stat().st_uid == UID
    assert final.stat().st_uid == UID
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["image_id"] == ftctl_image


def test_same_seed_in_two_containers_gives_byte_identical_weights(trained):
    root, runs = trained
    assert runs["docker2"].exit_code == 0, runs["docker2"].output
    a = (root / "models" / "docker1" / "final" / "model.safetensors").read_bytes()
    b = (root / "models" / "docker2" / "final" / "model.safetensors").read_bytes()
    assert a == b


def test_container_and_host_weights_are_identical_with_the_same_torch_build(trained):
    """Host venv and test image both run the torch 2.13.0 CPU wheel on the same CPU, so the
    weights match bit for bit (docs/docker.md: the CUDA image would not)."""
    root, runs = trained
    assert runs["host"].exit_code == 0, runs["host"].output
    a = (root / "models" / "docker1" / "final" / "model.safetensors").read_bytes()
    h = (root / "models" / "host" / "final" / "model.safetensors").read_bytes()
    assert a == h


def test_pipeline_runs_generate_and_train_in_the_image_then_gates_on_the_host(
    tmp_path, tiny_model_dir, ftctl_image, monkeypatch
):
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(REPO / "data" / "incremental_samples.yaml", root / "data")
    shutil.copy(REPO / "data" / "test_cases.jsonl", root / "data")
    model = tmp_path / "live" / "final"  # outside the project: mounted read-only
    shutil.copytree(tiny_model_dir, model)
    _chown_tree(root, UID)
    for p in [tmp_path, tmp_path / "live", model, *model.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    monkeypatch.chdir(root)
    monkeypatch.setenv("FTCTL_DOCKER_USER", f"{UID}:{UID}")
    monkeypatch.delenv("FTCTL_CONFIG", raising=False)
    result = runner.invoke(
        app,
        [
            "pipeline",
            "--docker",
            "--image",
            ftctl_image,
            "--model-path",
            str(model),
            "--report-dir",
            "reports",
            "--skip-deploy",
            "--json",
        ],
    )
    assert result.stdout.lstrip().startswith("{"), result.output
    doc = json.loads(result.stdout)
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["generate"]["status"] == "ok", result.output
    assert stages["generate"]["detail"] == {"in_image": True}
    assert stages["train"]["status"] == "ok", result.output
    manifest = json.loads((root / "models/incremental/final/manifest.json").read_text())
    assert manifest["image_id"] == ftctl_image
    assert (root / "models/incremental/final").stat().st_uid == UID
    assert stages["gate"]["status"] in ("ok", "failed")  # ran on the host, on the image's output
    assert (root / "reports" / "report.json").is_file()
    assert stages["deploy"]["status"] == "skipped"
    assert result.exit_code == doc["exit_code"]
