"""Unit tests of --docker's command-line and mount rebuilding (ftctl/cli/docker_run.py).

The container run itself is replaced by a recorder here; tests/integration/test_image.py runs
the same code against a real engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from ftctl.cli import common, docker_run
from ftctl.cli.main import FtctlGroup
from ftctl.cli.main import app as ftctl_app
from ftctl.image.container import Mount

runner = CliRunner()


@pytest.fixture
def recorded(monkeypatch):
    """Replace the container run by a recorder of its arguments (exit code 3)."""
    calls: list[dict] = []

    def fake_run(argv, **kw):
        calls.append({"argv": argv, **kw})
        return 3

    monkeypatch.setattr(docker_run, "run_in_image", fake_run)
    monkeypatch.setattr(docker_run, "engine", lambda timeout: ("engine", timeout))
    return calls


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FTCTL_CONFIG", raising=False)
    monkeypatch.delenv("FTCTL_DOCKER_USER", raising=False)
    return tmp_path


def toy_app() -> typer.Typer:
    """A group shaped like ftctl's: root callback with State, a subgroup, every option kind."""
    app = typer.Typer(cls=FtctlGroup)

    @app.callback()
    def root(ctx: typer.Context) -> None:
        common.state(ctx)

    grp = typer.Typer()
    app.add_typer(grp, name="grp")

    @grp.command("run")
    def run(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument()],
        model_path: Annotated[Path | None, typer.Option("--model-path")] = None,
        output_path: Annotated[Path | None, typer.Option("--output-path")] = None,
        lr: Annotated[float | None, typer.Option("--lr")] = None,
        epochs: Annotated[int, typer.Option("--epochs")] = 2,
        tags: Annotated[list[str] | None, typer.Option("--tag")] = None,
        add_labels: Annotated[bool, typer.Option("--add-labels/--no-add-labels")] = False,
        fast: Annotated[bool, typer.Option("--fast")] = False,
        docker: common.DockerOpt = False,
        gpus: common.GpusOpt = None,
        image: common.ImageOpt = None,
    ) -> None:
        if docker:
            raise typer.Exit(docker_run.rerun_in_docker(ctx, gpus=gpus, image=image))

    return app


def test_argv_keeps_given_options_and_drops_defaults_and_docker_flags(project, recorded):
    res = runner.invoke(
        toy_app(),
        ["grp", "run", "x1", "--lr", "5e-06", "--tag", "a", "--tag", "b", "--fast", "--docker",
         "--gpus", "none", "--image", "ftctl:t"],
    )  # fmt: skip
    assert res.exit_code == 3, res.output
    call = recorded[0]
    assert call["argv"] == [
        "grp",
        "run",
        "--lr",
        "5e-06",
        "--tag",
        "a",
        "--tag",
        "b",
        "--fast",
        "x1",
    ]
    assert call["image"] == "ftctl:t"
    assert call["gpus"] == "none"
    assert call["network_mode"] == "none"


def test_explicit_false_of_a_bool_pair_and_explicit_default_value_are_passed_on(project, recorded):
    res = runner.invoke(
        toy_app(), ["grp", "run", "x", "--no-add-labels", "--epochs", "2", "--docker"]
    )
    assert res.exit_code == 3, res.output
    assert recorded[0]["argv"] == ["grp", "run", "--epochs", "2", "--no-add-labels", "x"]


def test_project_paths_map_to_workspace_and_data_models_are_mounted_rw(project, recorded):
    (project / "data" / "new.jsonl").write_text("{}\n")
    res = runner.invoke(
        toy_app(),
        ["grp", "run", "x", "--model-path", "data/new.jsonl", "--output-path", "models/run1",
         "--docker"],
    )  # fmt: skip
    assert res.exit_code == 3, res.output
    argv, mounts = recorded[0]["argv"], recorded[0]["mounts"]
    assert argv[argv.index("--model-path") + 1] == "/workspace/data/new.jsonl"
    assert argv[argv.index("--output-path") + 1] == "/workspace/models/run1"
    assert Mount(project / "data", "/workspace/data", read_only=False) in mounts
    assert Mount(project / "models", "/workspace/models", read_only=False) in mounts
    assert (project / "models").is_dir()  # created so that the mount exists


def test_outside_input_is_mounted_read_only_and_outside_output_read_write(
    project, recorded, tmp_path_factory
):
    outside = tmp_path_factory.mktemp("elsewhere")
    model = outside / "base model"
    model.mkdir()
    out = outside / "out"
    res = runner.invoke(
        toy_app(),
        ["grp", "run", "x", "--model-path", str(model), "--output-path", str(out), "--docker"],
    )
    assert res.exit_code == 3, res.output
    argv, mounts = recorded[0]["argv"], recorded[0]["mounts"]
    by_host = {m.host: m for m in mounts}
    assert by_host[model].read_only is True
    assert by_host[out].read_only is False
    assert argv[argv.index("--model-path") + 1] == by_host[model].container
    assert by_host[model].container.startswith("/mnt/host/") and " " not in by_host[model].container
    assert argv[argv.index("--output-path") + 1] == by_host[out].container
    assert out.is_dir()  # created by the caller, so the caller owns it


def test_missing_input_outside_the_project_is_a_clear_usage_error(project, recorded):
    res = runner.invoke(
        toy_app(), ["grp", "run", "x", "--model-path", "/nonexistent/m", "--docker"]
    )
    assert res.exit_code == 2
    assert "/nonexistent/m: not found" in res.output
    assert recorded == []


def test_output_file_mounts_its_directory(project):
    mapper = docker_run.PathMapper(project)
    outside = project.parent / f"{project.name}-reports"
    target = mapper.map(outside / "report.json", output=True)
    (mount,) = mapper.extra.values()
    assert mount.host == outside and mount.read_only is False
    assert target == f"{mount.container}/report.json"


def test_same_path_as_input_then_output_becomes_one_rw_mount(project, tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    mapper = docker_run.PathMapper(project)
    a = mapper.map(d, output=False)
    b = mapper.map(d, output=True)
    assert a == b
    assert [m.read_only for m in mapper.extra.values()] == [False]


def test_bad_gpus_value_is_a_usage_error_before_any_run(project, recorded):
    res = runner.invoke(toy_app(), ["grp", "run", "x", "--docker", "--gpus", "many"])
    assert res.exit_code == 2
    assert recorded == []


def test_user_override_from_environment(project, recorded, monkeypatch):
    monkeypatch.setenv("FTCTL_DOCKER_USER", "1234:1234")
    runner.invoke(toy_app(), ["grp", "run", "x", "--docker"])
    assert recorded[0]["user"] == "1234:1234"


def test_real_data_generate_with_config_debug_and_outside_out_dir(
    project, recorded, tmp_path_factory
):
    cfg = project / "my.toml"
    cfg.write_text("[image]\ngpus = 'none'\ntag = 'ftctl:pinned'\nnetwork = 'host'\n")
    out = tmp_path_factory.mktemp("gen")
    res = runner.invoke(
        ftctl_app,
        ["--config", str(cfg), "--debug", "data", "generate", "--seed", "7", "--out-dir", str(out),
         "--docker"],
    )  # fmt: skip
    assert res.exit_code == 3, res.output
    call = recorded[0]
    mounts = {m.host: m for m in call["mounts"]}
    assert call["argv"][:3] == ["--config", mounts[cfg].container, "--debug"]
    assert call["argv"][3:] == ["data", "generate", "--out-dir", mounts[out].container,
                                "--seed", "7"]  # fmt: skip
    assert mounts[cfg].read_only and not mounts[out].read_only
    # a config in the project sits in /workspace: its relative paths (relative to the file)
    # mean inside what they mean outside
    assert mounts[cfg].container == "/workspace/my.toml"
    assert (call["gpus"], call["configured_tag"], call["network_mode"]) == (
        "none",
        "ftctl:pinned",
        "host",
    )


def test_a_config_outside_the_project_is_mounted_apart(project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("conf") / "ftctl.toml"
    elsewhere.write_text("")
    mapper = docker_run.PathMapper(project)
    assert mapper.config(elsewhere).startswith(docker_run.HOST_MOUNT_ROOT + "/")
    assert mapper.config(project / "ftctl.toml") == "/workspace/ftctl.toml"


# --------------------------------------------------------------------- ftctl.image.build helpers


def test_gpu_plan_for_each_gpus_value():
    from ftctl.errors import ConfigError
    from ftctl.image.container import gpu_plan

    for none in (gpu_plan("none"), gpu_plan("0"), gpu_plan("auto", used=0)):
        assert none.requests == () and none.env == {"NVIDIA_VISIBLE_DEVICES": "void"}
    (all_,) = gpu_plan("all").requests
    assert all_["Count"] == -1 and all_["Capabilities"] == [["gpu"]]
    assert gpu_plan("all").env == {}
    assert gpu_plan("2").requests[0]["Count"] == 2
    (ids,) = gpu_plan("0,2").requests
    assert ids["DeviceIDs"] == ["0", "2"] and not ids["Count"]
    assert gpu_plan("device=1").requests[0]["DeviceIDs"] == ["1"]
    auto = gpu_plan("auto", used=2)
    assert auto.requests[0]["Count"] == 2 and auto.cpu_fallback and auto.env == {}
    assert not gpu_plan("2").cpu_fallback
    for bad in ("lots", "0,,2", "-1", "all,1"):
        with pytest.raises(ConfigError):
            gpu_plan(bad)


def test_tag_split_keeps_registry_ports():
    from ftctl.image.build import _split_tag

    assert _split_tag("ftctl:0.1.0-abc") == ("ftctl", "0.1.0-abc")
    assert _split_tag("reg:5000/ftctl") == ("reg:5000/ftctl", "latest")


def test_git_sha_outside_git_and_default_tags(tmp_path):
    from ftctl import __version__
    from ftctl.image.build import default_tags, git_sha

    assert git_sha(tmp_path) == "nogit"
    assert default_tags(tmp_path) == [f"ftctl:{__version__}-nogit", "ftctl:latest"]
    assert default_tags(tmp_path, "ftctl:prod") == [f"ftctl:{__version__}-nogit", "ftctl:prod"]


def test_build_failure_on_a_missing_base_hints_at_base_image():
    from ftctl.image.build import _build_failed

    err = _build_failed("pull access denied for pytorch/pytorch", ["Step 2/10 : FROM x"], "x")
    assert "--base-image" in err.hint and "Step 2/10" in err.message


def test_oci_labels_carry_the_git_revision(repo_root):
    import subprocess

    from ftctl.image.build import oci_labels

    head = subprocess.run(
        ["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    labels = oci_labels(repo_root, "base:x")
    assert labels["org.opencontainers.image.revision"] == head
    assert labels["org.opencontainers.image.base.name"] == "base:x"
    assert labels["ftctl.source.dirty"] in ("true", "false")


# --------------------------------------------------------------------------- what the run gets


def test_gpus_auto_asks_for_one_gpu_per_train_process_and_none_for_generate(project, recorded):
    (project / "data" / "new.jsonl").write_text("{}\n")
    res = runner.invoke(ftctl_app, ["train", "--new-data", "data/new.jsonl", "--docker"])
    assert res.exit_code == 3, res.output
    res = runner.invoke(ftctl_app, ["data", "generate", "--docker"])
    assert res.exit_code == 3, res.output
    train, generate = recorded
    assert (train["gpus"], train["gpus_used"]) == ("auto", 1)
    assert (generate["gpus"], generate["gpus_used"]) == ("auto", 0)


def test_gpu_ids_are_accepted_and_passed_on(project, recorded):
    res = runner.invoke(toy_app(), ["grp", "run", "x", "--docker", "--gpus", "0,2"])
    assert res.exit_code == 3, res.output
    assert recorded[0]["gpus"] == "0,2"


def test_run_gets_the_image_settings_and_the_mount_table(project, recorded, tmp_path_factory):
    cfg = project / "ftctl.toml"
    cfg.write_text('[image]\nread_timeout = 2.5\nstop_grace = 7\nmemory = "2g"\n')
    out = tmp_path_factory.mktemp("out")
    res = runner.invoke(ftctl_app, ["data", "generate", "--out-dir", str(out), "--docker"])
    assert res.exit_code == 3, res.output
    call = recorded[0]
    assert call["client"] == ("engine", 2.5)
    assert (call["stop_grace"], call["memory"]) == (7.0, "2g")
    assert call["configured_tag"] == "ftctl:latest"
    table = json.loads(call["env"]["FTCTL_HOST_PATHS"])
    mounts = {m.container: str(m.host) for m in call["mounts"]}
    assert table == mounts
    assert table["/workspace/data"] == str(project / "data")
    assert str(out) in table.values()


def test_sigterm_raises_terminated_only_while_the_run_lasts():
    import os
    import signal

    from ftctl.image.container import Terminated

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), docker_run.sigterm_stops_the_run():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 1)  # let the handler run
    assert signal.getsignal(signal.SIGTERM) == before


def test_image_config_rejects_bad_values():
    from ftctl.config import ImageConfig, check
    from ftctl.errors import ConfigError

    check(ImageConfig(gpus="0,2"), ImageConfig(gpus="device=3"), ImageConfig(memory="512m"))
    with pytest.raises(ConfigError) as info:
        check(ImageConfig(gpus="x y", read_timeout=0, stop_grace=-1, memory="lots", tag=""))
    fields = {p.field for p in info.value.problems}
    assert fields == {
        "image.gpus",
        "image.read_timeout",
        "image.stop_grace",
        "image.memory",
        "image.tag",
    }


# --------------------------------------------------------------------------- several GPUs


def test_gpus_auto_reads_nproc_from_the_config_and_shm_grows_with_it(project, recorded):
    """[train] nproc = 2 in ftctl.toml: --gpus auto asks for 2 GPUs (not 1), and /dev/shm
    gets the multi-process default; --shm-size and --ipc stay outside the container."""
    (project / "data" / "new.jsonl").write_text("{}\n")
    (project / "ftctl.toml").write_text("[train]\nnproc = 2\n")
    train = ["train", "--new-data", "data/new.jsonl", "--docker"]
    assert runner.invoke(ftctl_app, train).exit_code == 3
    res = runner.invoke(ftctl_app, [*train, "--nproc", "3", "--shm-size", "8g", "--ipc", "host"])
    assert res.exit_code == 3, res.output
    from_config, flags = recorded
    assert (from_config["gpus_used"], from_config["shm_size"], from_config["ipc"]) == (
        2,
        "auto",
        "private",
    )
    assert (flags["gpus_used"], flags["shm_size"], flags["ipc"]) == (3, "8g", "host")
    assert "--shm-size" not in flags["argv"] and "--ipc" not in flags["argv"]
    assert flags["argv"][flags["argv"].index("--nproc") + 1] == "3"


def test_shm_plan_gives_several_processes_room_or_the_hosts_ipc():
    from ftctl.image.container import shm_plan

    assert shm_plan("auto", "private", 1) == (None, None)  # docker's 64m: one process
    assert shm_plan("auto", "private", 2) == ("2g", None)
    assert shm_plan("auto", "private", 8) == ("8g", None)
    assert shm_plan("512m", "private", 8) == ("512m", None)  # the user's size wins
    assert shm_plan("8g", "host", 2) == (None, "host")  # the host's /dev/shm: no size


@pytest.mark.parametrize("where", ["flag", "config"])
def test_docker_with_several_machines_is_refused_with_why(project, recorded, where):
    (project / "data" / "new.jsonl").write_text("{}\n")
    args = ["train", "--new-data", "data/new.jsonl", "--docker"]
    if where == "flag":
        args += ["--nnodes", "2", "--rdzv-endpoint", "node1:29400"]
    else:
        (project / "ftctl.toml").write_text('[train]\nnnodes = 2\nrdzv_endpoint = "node1:29400"\n')
    res = runner.invoke(ftctl_app, args)
    assert res.exit_code == 2, res.output
    assert "--nnodes 2 with --docker" in res.output and "no network" in res.output
    assert "without --docker" in res.output  # what to do instead
    assert recorded == []  # nothing was started


def test_bad_shm_size_or_ipc_is_a_usage_error_before_any_run(project, recorded):
    (project / "data" / "new.jsonl").write_text("{}\n")
    base = ["train", "--new-data", "data/new.jsonl", "--docker"]
    for extra in (["--shm-size", "lots"], ["--ipc", "shareable"]):
        res = runner.invoke(ftctl_app, [*base, *extra])
        assert res.exit_code == 2, res.output
        assert "image.shm_size" in res.output or "image.ipc" in res.output
    assert recorded == []


def test_torchrun_gives_its_processes_the_containers_grace(monkeypatch):
    """Inside --docker, $FTCTL_STOP_GRACE ([image] stop_grace) is torchrun's shutdown timeout
    too (its own default is 30 s); torch before 2.12 gets it as PContext.close's default."""
    import argparse
    import signal
    from types import SimpleNamespace

    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.run import get_args_parser

    from ftctl.train import distributed

    assert distributed.stop_grace({}) == distributed.DEFAULT_GRACE == 60
    assert distributed.stop_grace({"FTCTL_STOP_GRACE": "90"}) == 90
    assert distributed.stop_grace({"FTCTL_STOP_GRACE": "x"}) == 60
    args = get_args_parser().parse_args(["--standalone", "-m", "ftctl"])
    distributed.give_workers(args, 90)
    assert args.shutdown_timeout == 90  # torch 2.13: the launcher's own option
    monkeypatch.setattr(api.PContext, "close", api.PContext.close)  # restored afterwards
    distributed.give_workers(argparse.Namespace(), 75)  # an older torch: no such option
    closed = []
    context = SimpleNamespace(
        _close=lambda death_sig, timeout: closed.append((death_sig, timeout)),
        _tail_logs=[], filtered_stdout=None, filtered_stderr=None,
    )  # fmt: skip
    api.PContext.close(context, signal.SIGINT)  # as torch 2.9's agent calls it: no timeout
    assert closed == [(signal.SIGINT, 75)]
