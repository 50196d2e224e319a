"""The training image against a real Docker engine (started by fixtures if none answers).

The CUDA base cannot be pulled here, so the SAME Dockerfile is built on local stand-in bases
(debootstrap bookworm + Python 3.11 + torch 2.13.0 CPU, or torch 2.9.1 from PyPI, the torch of
the pinned CUDA base): see docker_fixtures.py. Runs that last (signals, timeouts, GPUs, paths)
are in test_docker_runs.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl import __version__
from ftctl.cli.main import app
from ftctl.errors import ExitCode, ImageError
from ftctl.image.build import build_image
from ftctl.image.container import Mount, run_in_image
from tests.integration.docker_fixtures import UID, chown_tree, small_data

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project directory (data/ with the shipped templates, models/) owned by UID."""
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(REPO / "data" / "incremental_samples.yaml", root / "data")
    chown_tree(root)
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
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.revision"] == head.stdout.decode().strip()
    assert labels["org.opencontainers.image.version"] == __version__
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
    assert "Traceback" not in res.output


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
    # a write into the mount fails (the directory is the container user's own: only the
    # read-only mount stops it), and the host side is left as it was
    before = (src / "a.jsonl").read_bytes()
    err = io.BytesIO()
    code = run_in_image(
        ["data", "convert", "/mnt/in/a.jsonl", "/mnt/in/a.csv"],
        image=ftctl_image,
        mounts=[Mount(src, "/mnt/in", read_only=True)],
        stdout=io.BytesIO(),
        stderr=err,
        client=docker_engine,
    )
    assert code == ExitCode.ERROR, err.getvalue().decode()
    assert b"Read-only file system" in err.getvalue()
    assert sorted(p.name for p in src.iterdir()) == ["a.jsonl"]
    assert (src / "a.jsonl").read_bytes() == before
    assert not docker_engine.containers.list(all=True, filters={"ancestor": ftctl_image})


def test_cli_build_writes_the_configured_tag_and_docker_runs_it(
    project, test_base_image, ftctl_image, docker_engine, monkeypatch
):
    """`image build` tags <repo>:<version>-<sha> and [image] tag; --docker runs [image] tag.
    The tests' own repository name, so the user's ftctl:* tags are never touched."""
    monkeypatch.setattr("ftctl.image.build.REPOSITORY", "ftctl-docker-test")
    tag = "ftctl-docker-test:cli"
    (project / "ftctl.toml").write_text(f'[image]\ntag = "{tag}"\n')
    res = runner.invoke(
        app, ["image", "build", "--base-image", test_base_image, "--context", str(REPO), "--json"]
    )
    try:
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        versioned, configured = doc["tags"]
        assert versioned.startswith(f"ftctl-docker-test:{__version__}-") and configured == tag
        assert docker_engine.images.get(tag).id == doc["image_id"]
        listed = json.loads(runner.invoke(app, ["image", "ls", "--json"]).stdout)
        assert listed["docker_runs"] == tag
        assert doc["image_id"] in {r["id"] for r in listed["images"]}
        gen = runner.invoke(app, ["data", "generate", "--per-intent", "3", "--docker"])
        assert gen.exit_code == 0, gen.output
        assert f"running in {tag}" in gen.output  # [image] tag, not the newest image
        assert (project / "data" / "incremental_training_data.jsonl").stat().st_uid == UID
    finally:
        for img in docker_engine.images.list(name="ftctl-docker-test"):
            for t in img.tags:
                if t == tag or t.startswith(f"ftctl-docker-test:{__version__}-"):
                    docker_engine.images.remove(t)


def test_docker_without_the_configured_image_says_how_to_build_it(project, docker_engine):
    (project / "ftctl.toml").write_text('[image]\ntag = "ftctl-docker-test:never-built"\n')
    res = runner.invoke(app, ["data", "generate", "--docker"])
    assert res.exit_code == ExitCode.ERROR
    assert "ftctl-docker-test:never-built not found" in res.output
    assert "ftctl image build" in res.output


def test_a_base_without_torch_is_a_clear_build_error(docker_engine, root_base_image):
    with pytest.raises(ImageError) as info:
        build_image(
            REPO,
            base_image=root_base_image,
            tags=["ftctl-docker-test:no-torch"],
            client=docker_engine,
        )
    assert "the base image has no torch" in info.value.message
    assert not docker_engine.images.list(name="ftctl-docker-test:no-torch")


class _Lines:
    """A reporter that keeps every build log line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def stage(self, name: str) -> None:
        self.lines.append(name)

    def info(self, message: str) -> None:
        self.lines.append(message)

    def warn(self, message: str) -> None:
        self.lines.append(message)


def _cached_steps(lines: list[str]) -> dict[str, bool]:
    """COPY/RUN step of the Dockerfile -> was it taken from the cache (classic builder's log)."""
    steps: dict[str, bool] = {}
    current = None
    for line in lines:
        if line.startswith("Step "):
            current = line.split(" : ", 1)[1]
            if current.startswith(("COPY", "RUN")):
                steps[current] = False
            else:
                current = None
        elif current and "Using cache" in line:
            steps[current] = True
    return steps


def test_only_a_dependency_change_reinstalls_the_dependencies(
    tmp_path, docker_engine, ftctl_image, test_base_image
):
    """A code change rebuilds only the source layer; a README change rebuilds nothing."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, ctx / name)
    for name in ("docker", "ftctl"):
        shutil.copytree(REPO / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    tag = "ftctl-docker-test:cache"

    def build() -> tuple[str, dict[str, bool]]:
        rep = _Lines()
        res = build_image(
            ctx, base_image=test_base_image, tags=[tag], client=docker_engine, reporter=rep
        )
        return res.image_id, _cached_steps(rep.lines)

    try:
        first, _ = build()
        with (ctx / "README.md").open("a") as f:
            f.write("\nedited\n")
        after_readme, steps = build()
        assert after_readme == first and all(steps.values()), steps
        with (ctx / "ftctl" / "cli" / "image.py").open("a") as f:
            f.write("\n# edited\n")
        after_code, steps = build()
        assert after_code != first
        deps = next(s for s in steps if "install-deps.sh" in s and s.startswith("RUN"))
        code = next(s for s in steps if s.startswith("COPY ftctl/"))
        assert steps[deps] is True and steps[code] is False, steps
    finally:
        docker_engine.images.remove(tag, force=True)


def test_image_on_the_cuda_bases_torch_2_9_1_builds_and_trains(
    tmp_path, docker_engine, torch291_image, tiny_model_dir
):
    """torch 2.9.1 (PyPI's CUDA build, on the CPU here): the constraints install on it, pip
    check passes (in the build), and a training run inside writes a model."""
    image_id, _base, _seconds = torch291_image
    img = docker_engine.images.get(image_id)
    assert img.attrs["Config"]["Labels"]["org.opencontainers.image.base.name"] == _base
    work = tmp_path / "w"
    shutil.copytree(tiny_model_dir, work / "base")
    small_data(work / "new.jsonl", per_label=4)
    tmp_path.chmod(0o755)
    chown_tree(work)
    out, err = io.BytesIO(), io.BytesIO()
    code = run_in_image(
        ["train", "--new-data", "/w/new.jsonl", "--model-path", "/w/base",
         "--output-path", "/w/out", "--epochs", "1", "--json"],
        image=image_id,
        mounts=[Mount(work, "/w", read_only=False)],
        user=f"{UID}:{UID}",
        stdout=out,
        stderr=err,
        client=docker_engine,
    )  # fmt: skip
    assert code == 0, err.getvalue().decode()[-3000:]
    manifest = json.loads((work / "out" / "final" / "manifest.json").read_text())
    assert manifest["packages"]["torch"].startswith("2.9.1")
    assert manifest["image_id"] == image_id
    assert json.loads(out.getvalue())["final_dir"] == "/w/out/final"


# --------------------------------------------------------------------------- ftctl train --docker


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, ftctl_image):
    """Two `ftctl train --docker` runs (as UID) and one on the host, same seed and inputs."""
    base = tmp_path_factory.mktemp("train")
    base.chmod(0o755)
    root = base / "proj"
    (root / "models").mkdir(parents=True)
    small_data(root / "data" / "new.jsonl")
    model = base / "outside" / "base-model"  # outside data/ and models/: mounted read-only
    shutil.copytree(tiny_model_dir, model)
    for p in [base / "outside", *model.rglob("*"), model]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    chown_tree(root)
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
    return root, runs, model


def test_train_in_docker_writes_final_owned_by_the_caller(trained, ftctl_image):
    root, runs, _ = trained
    assert runs["docker1"].exit_code == 0, runs["docker1"].output
    final = root / "models" / "docker1" / "final"
    assert (final / "model.safetensors").is_file()
    assert (final / "model.safetensors").stat().st_uid == UID
    assert final.stat().st_uid == UID
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["image_id"] == ftctl_image


def test_train_in_docker_speaks_and_records_in_host_paths(trained):
    """Issue 16: the last line names the host output; the manifest records the host paths of
    the data and of the base model (mounted from outside the project)."""
    root, runs, model = trained
    last = runs["docker1"].stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {root / 'models' / 'docker1' / 'final'}  (best epoch")
    assert "/workspace" not in runs["docker1"].output
    assert "/mnt/host" not in runs["docker1"].output
    manifest = json.loads((root / "models/docker1/final/manifest.json").read_text())
    assert manifest["data"]["new"]["path"] == str(root / "data" / "new.jsonl")
    assert manifest["base_model"]["path"] == str(model)


def test_same_seed_in_two_containers_gives_byte_identical_weights(trained):
    root, runs, _ = trained
    assert runs["docker2"].exit_code == 0, runs["docker2"].output
    a = (root / "models" / "docker1" / "final" / "model.safetensors").read_bytes()
    b = (root / "models" / "docker2" / "final" / "model.safetensors").read_bytes()
    assert a == b


def test_container_and_host_weights_are_identical_with_the_same_torch_build(trained):
    """Host venv and test image both run the torch 2.13.0 CPU wheel on the same CPU, so the
    weights match bit for bit (docs/docker.md: the CUDA image would not)."""
    root, runs, _ = trained
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
    # ./ftctl.toml reaches the train in the image: lr 1e-12 leaves the candidate the live model
    (root / "ftctl.toml").write_text("[train]\nlr = 1e-12\n", encoding="utf-8")
    model = tmp_path / "live" / "final"  # outside the project: mounted read-only
    shutil.copytree(tiny_model_dir, model)
    chown_tree(root)
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
    assert manifest["hyperparameters"]["lr"] == 1e-12  # the project's ftctl.toml was read
    # the gate ran on the host, on the image's output: the same answers as the live model
    assert stages["gate"]["status"] == "ok" and stages["gate"]["detail"]["verdict"] == "PASS"
    report = json.loads((root / "reports" / "report.json").read_text())
    assert {c["change"] for c in report["gate"]["checks"]} == {"unchanged"}
    assert stages["deploy"]["status"] == "skipped"
    assert result.exit_code == doc["exit_code"] == ExitCode.OK
