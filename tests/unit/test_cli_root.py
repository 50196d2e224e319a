"""The root CLI: version, help, config errors, exit codes, --debug."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from ftctl import __version__
from ftctl.cli.main import app
from ftctl.errors import ExitCode

runner = CliRunner()


def test_version_prints_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ftctl {__version__}"


# each command (or group) with something only its own --help shows: a subcommand or an option
OWN_HELP = {
    ("data",): "generate",
    ("data", "generate"): "--per-intent",
    ("image",): "build",
    ("train",): "--replay-ratio",
    ("base",): "--hidden-size",
    ("eval",): "--baseline",
    ("deploy",): "--restart-cmd",
    ("rollback",): "--to",
    ("releases",): "--accept-host-key",
    ("status",): "--accept-host-key",
    ("serve",): "--port",
    ("harvest",): "--limit",
    ("demo",): "--workdir",
    ("pipeline",): "--old-data",
}


def test_root_help_lists_every_command_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {m.group(1) for m in re.finditer(r"^│ ([a-z-]+) ", result.output, re.MULTILINE)}
    assert {cmd[0] for cmd in OWN_HELP} <= listed, listed


@pytest.mark.parametrize("cmd", list(OWN_HELP), ids=" ".join)
def test_each_command_has_its_own_help(cmd):
    """`ftctl CMD --help` is that command's help (its usage line, its own options), not the
    root's, which would pass a test that only looks for the command's name."""
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: ftctl {' '.join(cmd)} [OPTIONS]" in result.output, result.output
    assert OWN_HELP[cmd] in result.output, result.output
    assert "Typical flow" not in result.output  # the root's text


def test_bad_config_file_lists_every_problem_and_exits_2(tmp_path):
    cfg = tmp_path / "ftctl.toml"
    cfg.write_text('[train]\nepochs = "two"\nbogus = 1\n[deploy.prod]\nkeep_releases = 1\n')
    result = runner.invoke(app, ["--config", str(cfg), "data", "validate", "x.jsonl"])
    assert result.exit_code == ExitCode.USAGE
    assert "[train.epochs]: expected int" in result.output
    assert "[train.bogus]: unknown key" in result.output
    assert "[deploy.prod.keep_releases]: must be >= 2" in result.output
    assert "Traceback" not in result.output


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["--config", str(tmp_path / "nope.toml"), "data", "validate", "x"])
    assert result.exit_code == ExitCode.USAGE
    assert "config file not found" in result.output


def test_invalid_toml_names_the_file(tmp_path):
    cfg = tmp_path / "ftctl.toml"
    cfg.write_text("[train\n")
    result = runner.invoke(app, ["--config", str(cfg), "data", "validate", "x.jsonl"])
    assert result.exit_code == ExitCode.USAGE
    assert "not valid TOML" in result.output and str(cfg) in result.output


def test_error_has_no_traceback_unless_debug(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    out = str(tmp_path / "out.csv")
    plain = runner.invoke(app, ["data", "convert", missing, out])
    assert plain.exit_code == ExitCode.DATA
    assert "file not found" in plain.output
    assert "Traceback" not in plain.output
    debug = runner.invoke(app, ["--debug", "data", "convert", missing, out])
    assert debug.exit_code == ExitCode.DATA
    assert "Traceback" in debug.output


def test_every_command_has_an_example_in_its_help():
    for cmd in (["data", "generate"], ["data", "validate"], ["data", "convert"], ["base"],
                ["train"], ["eval"], ["image", "build"], ["deploy"], ["rollback"],
                ["releases"], ["serve"], ["demo"], ["pipeline"]):  # fmt: skip
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0, (cmd, result.output)
        assert "xample" in result.output, f"no example in `ftctl {' '.join(cmd)} --help`"


def _one_json_error(result, exit_code: int) -> dict:
    """stdout holds exactly one JSON document saying the command failed."""
    import json

    assert result.exit_code == exit_code, result.output
    doc = json.loads(result.stdout)  # raises unless stdout is exactly one document
    assert doc["ok"] is False and doc["exit_code"] == exit_code
    return doc


def test_json_error_document_for_a_bad_flag_value(tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--samples", "0", "--json"])
    doc = _one_json_error(result, ExitCode.USAGE)
    assert doc["problems"][0]["field"] == "eval.samples"
    gen = runner.invoke(app, ["data", "generate", "--per-intent", "0", "--json"])
    assert _one_json_error(gen, ExitCode.USAGE)["problems"][0]["field"] == "data.per_intent"


def test_json_error_document_for_a_bad_config_file(tmp_path):
    cfg = tmp_path / "ftctl.toml"
    cfg.write_text("[train]\nbogus = 1\n")
    result = runner.invoke(app, ["--config", str(cfg), "eval", "--model", "m", "--json"])
    doc = _one_json_error(result, ExitCode.USAGE)
    assert doc["problems"][0]["field"] == "train.bogus"


def test_json_error_document_for_a_usage_error():
    result = runner.invoke(app, ["eval", "--samples", "abc", "--json"])
    doc = _one_json_error(result, ExitCode.USAGE)
    assert "--samples" in doc["message"]
    missing = runner.invoke(app, ["eval", "--json"])
    assert "--model" in _one_json_error(missing, ExitCode.USAGE)["message"]


def test_no_json_on_stdout_without_the_flag():
    result = runner.invoke(app, ["eval", "--model", "m", "--samples", "0"])
    assert result.exit_code == ExitCode.USAGE
    assert result.stdout == ""


def test_unwritable_output_path_is_an_error_not_a_traceback(tmp_path, repo_root):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    args = ["data", "generate", "--samples", str(repo_root / "data/incremental_samples.yaml")]
    result = runner.invoke(app, [*args, "--out-dir", str(blocker)])
    assert result.exit_code == ExitCode.ERROR
    assert f"error: {blocker}: File exists" in result.output
    assert "hint:" in result.output
    assert "Traceback" not in result.output
    as_json = runner.invoke(app, [*args, "--out-dir", str(blocker / "sub"), "--json"])
    assert "Not a directory" in _one_json_error(as_json, ExitCode.ERROR)["message"]
