"""ftctl.toml loading (every problem collected), override/check, and flags winning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ftctl import config as cfgmod
from ftctl.cli.main import app
from ftctl.config import Config, DataConfig, find_config, load_config
from ftctl.errors import ConfigError, ExitCode

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output with the console's line wrapping undone (errors go to an 80-column stderr)."""
    return output.replace("\n", "")


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ftctl.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_file_gives_defaults():
    assert load_config(None) == Config()


def test_values_are_loaded_and_coerced(tmp_path):
    cfg = load_config(toml(tmp_path, '[data]\nper_intent = 7\nout-dir = "gen"\n[train]\nlr = 1\n'))
    assert cfg.data.per_intent == 7
    assert cfg.data.out_dir == tmp_path / "gen"  # relative to the file
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.path == tmp_path / "ftctl.toml"


def test_unknown_key_is_named(tmp_path):
    path = toml(tmp_path, "[data]\nper_intents = 7\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "[data.per_intents]: unknown key" in exc.value.message
    assert exc.value.problems[0].file == str(path)


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"\[data.per_intent\]: expected int, got 'many'"):
        load_config(toml(tmp_path, '[data]\nper_intent = "many"\n'))


def test_all_problems_are_collected_into_one_error(tmp_path):
    path = toml(tmp_path, '[data]\nper_intent = 0\nformat = "xml"\nbogus = 1\n[nope]\nx = 1\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    fields = {p.field for p in exc.value.problems}
    assert fields == {"data.per_intent", "data.format", "data.bogus", "nope"}
    assert exc.value.exit_code == ExitCode.USAGE


def test_invalid_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(toml(tmp_path, "[data\n"))


def test_find_config_explicit_env_and_local(tmp_path, monkeypatch):
    path = toml(tmp_path, "[data]\n")
    monkeypatch.delenv("FTCTL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_config(None) == Path("ftctl.toml")
    assert find_config(path) == path
    monkeypatch.setenv("FTCTL_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="config file not found") as info:
        find_config(None)
    assert "FTCTL_CONFIG" in info.value.hint  # not "--config": the user passed no such flag


def test_override_ignores_none_and_check_collects():
    base = DataConfig(per_intent=5)
    assert cfgmod.override(base, per_intent=None, seed=None) is base
    changed = cfgmod.override(base, per_intent=9, format="csv")
    assert (changed.per_intent, changed.format, changed.seed) == (9, "csv", 42)
    with pytest.raises(ConfigError) as exc:
        cfgmod.check(cfgmod.override(base, per_intent=0, format="xml"))
    assert {p.field for p in exc.value.problems} == {"data.per_intent", "data.format"}


def test_with_flags_applies_the_given_flags_and_checks_in_one_step():
    base = DataConfig(per_intent=5)
    assert cfgmod.with_flags(base, per_intent=None) is base
    assert cfgmod.with_flags(base, per_intent=9, seed=None).per_intent == 9
    with pytest.raises(ConfigError) as exc:
        cfgmod.with_flags(base, per_intent=0, format="xml")
    assert {p.field for p in exc.value.problems} == {"data.per_intent", "data.format"}


SAMPLES = {"intents": {"CLOCK_IN": ["帮我打卡", "我要签到", "上班打卡"]}}


def generate_json(tmp_path: Path, *extra: str) -> dict:
    cfg = toml(
        tmp_path,
        f'[data]\ntemplates = "{tmp_path / "s.yaml"}"\nout_dir = "{tmp_path / "from_toml"}"\n'
        'per_intent = 2\nformat = "jsonl"\n',
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SAMPLES, allow_unicode=True), "utf-8")
    result = runner.invoke(app, ["--config", str(cfg), "data", "generate", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ftctl_toml_values_are_used(tmp_path):
    doc = generate_json(tmp_path)
    assert doc["counts"] == {"CLOCK_IN": 2}
    assert doc["paths"] == [str(tmp_path / "from_toml" / "incremental_training_data.jsonl")]


def test_flags_win_over_ftctl_toml(tmp_path):
    doc = generate_json(
        tmp_path, "--per-intent", "3", "--out-dir", str(tmp_path / "flag"), "--format", "csv"
    )
    assert doc["counts"] == {"CLOCK_IN": 3}
    assert doc["paths"] == [str(tmp_path / "flag" / "incremental_training_data.csv")]


def test_bad_config_through_the_cli_exits_2(tmp_path):
    cfg = toml(tmp_path, "[data]\nper_intent = true\n")
    result = runner.invoke(app, ["--config", str(cfg), "data", "generate"])
    assert result.exit_code == ExitCode.USAGE
    assert "[data.per_intent]: expected int" in flat(result.output)
    assert "Traceback" not in result.output


def test_deploy_keys_without_a_profile_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"\[deploy.hosts\]: not a profile") as info:
        load_config(toml(tmp_path, '[deploy]\nhosts = ["root@10.0.0.5"]\n'))
    assert info.value.problems[0].field == "deploy.hosts"


def test_a_known_section_that_is_not_a_table_is_not_called_unknown(tmp_path):
    with pytest.raises(ConfigError, match=r"\[data\]: must be a table"):
        load_config(toml(tmp_path, "data = 5\n"))


def test_deploy_timeouts_must_be_positive(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(toml(tmp_path, "[deploy.prod]\nhealth_timeout = -1\nconnect_timeout = 0\n"))
    fields = {p.field for p in info.value.problems}
    assert fields == {"deploy.prod.health_timeout", "deploy.prod.connect_timeout"}
