"""Unit tests of deploy's own logic (parsing, ordering, history, retention, plans, digests)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import DeployConfig, check
from ftctl.deploy import load_local_model
from ftctl.deploy.history import previous_release, retention
from ftctl.deploy.plan import RemoteState, make_plan, plan_lines
from ftctl.deploy.server import fsops, golive, shared
from ftctl.deploy.server.shared import SETTLED
from ftctl.deploy.session import describe_lock
from ftctl.errors import ConfigError, ModelError
from ftctl.fsutil import atomic_write_text, sha256_tree
from ftctl.manifest import model_digest, tree_digest
from ftctl.remote import parse_host


def test_parse_host_fills_defaults_and_reads_port():
    assert str(parse_host("10.0.0.5")) == "root@10.0.0.5:22"
    assert str(parse_host("deploy@example.com:2222", "root", 22)) == "deploy@example.com:2222"
    assert parse_host("u@[::1]:2200").host == "::1"
    assert parse_host("h:2200").known_hosts_name == "[h]:2200"
    with pytest.raises(ConfigError):
        parse_host("u@h:99999")
    with pytest.raises(ConfigError):
        parse_host("bad host")


def test_release_names_order_original_before_same_second_release():
    names = ["20261129051300-1a2b3c4d", "20261129051300-original", "20261129051259-ffffffff"]
    assert sorted(names, key=shared.release_key) == [
        "20261129051259-ffffffff",
        "20261129051300-original",
        "20261129051300-1a2b3c4d",
    ]
    assert shared.release_tag("20261129051300-1a2b3c4d") == "1a2b3c4d"
    assert shared.release_tag("20261129051300-original") is None


R = [f"2026112905130{i}-0000000{i}" for i in range(6)]


def test_previous_is_read_from_history_not_from_sort_order():
    log = [
        {"ok": True, "action": "deploy", "release": R[3], "previous": R[1]},
        {"ok": True, "action": "deploy", "release": R[1], "previous": R[3]},  # older redeployed
        {"ok": False, "action": "deploy", "release": R[5], "previous": R[1], "rolled_back": True},
    ]
    assert previous_release(log, R[1], R) == R[3]  # not R[0], the next older name
    assert previous_release([], R[2], R) == R[1]  # no history: the next older one
    gone = [{"ok": True, "release": R[2], "previous": "20200101000000-deadbeef"}]
    assert previous_release(gone, R[2], R) == R[1]


def test_retention_never_removes_live_previous_or_original():
    rels = ["20261129051259-original", *R]
    doomed = retention(rels, 2, live=R[1], previous=R[0])
    assert doomed == R[2:4]  # keeps the original, previous, live and the newest two


def test_systemctl_restart_is_recognised_and_checked_with_is_active():
    m = golive.SYSTEMCTL_RE.match("systemctl restart python-services")
    assert m and m["unit"] == "python-services" and m["prefix"] == "systemctl"
    m = golive.SYSTEMCTL_RE.match("sudo systemctl --no-ask-password reload app.service")
    assert m and m["unit"] == "app.service"
    m = golive.SYSTEMCTL_RE.match("/opt/bin/systemctl --root=/x restart svc")
    assert m and m["prefix"] == "/opt/bin/systemctl --root=/x"
    assert golive.SYSTEMCTL_RE.match("supervisorctl restart python-services") is None
    assert golive.SYSTEMCTL_RE.match("systemctl restart a && echo b") is None


def test_a_failed_reload_is_read_at_once():
    before = {"sha256": "a" * 64, "last_reload_error": None}
    assert golive._reload_failed(before, {"last_reload_error": "bad config.json"})
    assert not golive._reload_failed(before, {"last_reload_error": None})
    old = {"last_reload_error": "old error"}
    assert not golive._reload_failed(old, {"last_reload_error": "old error"})
    assert golive._reload_failed({"reload_failures": 1}, {"reload_failures": 2})


def test_output_kept_in_the_log_is_bounded():
    text = "x" * 10_000 + "END"
    cut = fsops.bounded(text)
    assert len(cut) <= shared.OUTPUT_MAX + 20 and cut.endswith("END")
    checks = golive.log_checks({"checks": {"output": text, "smoke": [{"ok": True}]}})
    assert len(checks["output"]) <= shared.OUTPUT_MAX + 20 and checks["smoke"] == "1/1 ok"


def test_describe_lock_names_owner_since_and_holder():
    lock = {"owner": "root@ci-3", "client_pid": 5, "time": "T", "holder": "golive", "pid": 9}
    text = describe_lock(lock)
    assert text.startswith("root@ci-3 since T") and "client pid 5" in text
    assert "golive pid 9" in text


def test_digest_uses_the_manifest_map_and_matches_without_it(tiny_model_dir, tmp_path):
    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    plain = model_digest(model)
    assert plain == tree_digest(sha256_tree(model))
    assert not load_local_model(model).has_manifest
    atomic_write_text(model / "manifest.json", json.dumps({"files": sha256_tree(model)}))
    assert model_digest(model) == plain  # manifest.json itself is not content
    local = load_local_model(model)
    assert local.has_manifest and "manifest.json" in local.expected
    assert local.sha8 == plain[:8]


def test_manifest_listing_a_missing_file_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    files = sha256_tree(model)
    files["missing.bin"] = "0" * 64
    atomic_write_text(model / "manifest.json", json.dumps({"files": files}))
    with pytest.raises(ModelError, match=r"missing\.bin"):
        load_local_model(model)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "./config.json", "a//b"])
def test_manifest_paths_outside_the_directory_are_refused(tiny_model_dir, tmp_path, bad):
    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    files = sha256_tree(model)
    files[bad] = "0" * 64
    atomic_write_text(model / "manifest.json", json.dumps({"files": files}))
    with pytest.raises(ModelError, match="stay inside the model directory"):
        load_local_model(model)


def test_cli_deploy_refuses_a_manifest_with_dotdot_before_connecting(tiny_model_dir, tmp_path):
    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    files = {**sha256_tree(model), "../x": "0" * 64}
    atomic_write_text(model / "manifest.json", json.dumps({"files": files}))
    r = CliRunner().invoke(app, ["deploy", "--model", str(model), "--host", "u@192.0.2.1"])
    assert r.exit_code == 1 and "'../x'" in r.output and "nothing was sent" in r.output


def _state(**kw) -> RemoteState:
    return RemoteState(**{"link": "link", "live": None, "releases": [], **kw})


def test_plan_links_unchanged_files_and_sends_the_rest(tiny_model_dir, tmp_path):
    model = load_local_model(tiny_model_dir)
    live = "20261129051300-0badc0de"
    index = {rel: [sha, model.sizes[rel]] for rel, sha in model.expected.items()}
    index["model.safetensors"] = ["f" * 64, model.sizes["model.safetensors"]]  # weights changed
    st = _state(live=live, releases=[live], index={live: index})
    plan = make_plan(model, st, DeployConfig(transfer="sftp"), local_conn=False)
    assert plan.method == "sftp" and plan.to_send == ["model.safetensors"]
    assert plan.links["config.json"] == f"releases/{live}/config.json"
    assert plan.expected_bytes == model.sizes["model.safetensors"]
    assert any("hard-link" in line for line in plan_lines(DeployConfig(), st, model, plan))


def test_plan_reuses_a_release_with_the_same_content(tiny_model_dir):
    model = load_local_model(tiny_model_dir)
    rel = f"20261129051300-{model.sha8}"
    index = {r: [sha, model.sizes[r]] for r, sha in model.expected.items()}
    st = _state(live="20261129051200-0badc0de", releases=[rel], index={rel: index})
    plan = make_plan(model, st, DeployConfig(), local_conn=False)
    assert plan.method == "reuse" and plan.reuse == rel and plan.expected_bytes == 0
    live = make_plan(
        model, _state(live=rel, releases=[rel], index={rel: index}), DeployConfig(), False
    )
    assert live.method == "live"


def test_forced_rsync_without_rsync_on_the_server_is_an_error(tiny_model_dir):
    from ftctl.errors import DeployError

    model = load_local_model(tiny_model_dir)
    with pytest.raises(DeployError, match="no rsync on the server"):
        make_plan(model, _state(has_rsync=False), DeployConfig(transfer="rsync"), False)
    plan = make_plan(model, _state(has_rsync=False), DeployConfig(), False)
    assert plan.method == "sftp" and "no rsync on the server" in plan.why


def test_require_health_without_any_health_check_is_a_config_error():
    with pytest.raises(ConfigError, match="require_health"):
        check(DeployConfig(require_health=True))
    check(DeployConfig(require_health=True, health_cmd="true"))
    with pytest.raises(ConfigError, match="transfer"):
        check(DeployConfig(transfer="scp"))


def test_cli_without_host_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(app, ["deploy", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "no host" in r.output


def test_cli_bad_smoke_case_is_a_usage_error():
    r = CliRunner().invoke(app, ["deploy", "--host", "h", "--smoke", "no-equals-sign"])
    assert r.exit_code == 2 and "TEXT=LABEL" in r.output


def test_cli_require_health_without_health_is_a_usage_error(tiny_model_dir):
    r = CliRunner().invoke(
        app, ["deploy", "--model", str(tiny_model_dir), "--host", "h", "--require-health"]
    )
    assert r.exit_code == 2 and "require_health" in r.output


def test_a_failure_to_reach_one_host_stops_before_anything_goes_live(tiny_model_dir):
    from ftctl.deploy import deploy
    from ftctl.errors import EnvironmentProblem

    tried = []

    def connect(spec):
        tried.append(str(spec))
        raise EnvironmentProblem(f"{spec}: cannot connect over SSH")

    hosts = [parse_host("a"), parse_host("b")]
    res = deploy(tiny_model_dir, DeployConfig(), hosts, connect)
    assert sorted(tried) == ["root@a:22", "root@b:22"]  # staged in parallel
    assert not res.ok and isinstance(res.error, EnvironmentProblem)
    assert all(h.error for h in res.hosts) and res.id


def test_remote_python_and_health_settle_come_from_the_profile_and_are_checked(tmp_path):
    from ftctl.config import load_config

    path = tmp_path / "ftctl.toml"
    path.write_text('[deploy.prod]\nremote_python = "/usr/bin/python3.8"\nhealth_settle = 3\n')
    cfg = load_config(path).deploy_profile("prod")
    assert cfg.remote_python == "/usr/bin/python3.8" and cfg.health_settle == 3.0
    path.write_text('[deploy.prod]\nremote_python = " "\nhealth_settle = -1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    fields = {p.field for p in info.value.problems}
    assert fields == {"deploy.prod.remote_python", "deploy.prod.health_settle"}


def test_cli_remote_python_and_health_settle_flags_reach_the_config(tiny_model_dir):
    r = CliRunner().invoke(
        app, ["deploy", "--model", str(tiny_model_dir), "--host", "h", "--health-settle", "-2"]
    )
    assert r.exit_code == 2 and "health_settle" in r.output
    for cmd in ("deploy", "rollback", "releases", "status"):
        r = CliRunner().invoke(app, [cmd, "--help"])
        assert "--remote-python" in r.output, cmd
    assert "--health-settle" in CliRunner().invoke(app, ["deploy", "--help"]).output


def test_the_plan_names_the_server_python_and_a_job_left_to_finish(tiny_model_dir):
    model = load_local_model(tiny_model_dir)
    st = _state(python={"path": "/usr/bin/python3", "version": "3.6.8"}, pending=True)
    plan = make_plan(model, st, DeployConfig(), local_conn=False)
    lines = plan_lines(DeployConfig(remote_python="python3"), st, model, plan)
    assert lines[0] == "server python: /usr/bin/python3 3.6.8 (remote_python = python3)"
    assert lines[1].startswith("first: finish the job a process that died left under the lock")
    weak = next(x for x in lines if x.startswith("health:"))
    assert "watched for 10s" in weak and "settled (no health URL)" in weak


def test_the_weakest_health_of_the_fleet_is_the_result():
    from ftctl.deploy.results import DeployResult, HostResult

    hosts = [HostResult("a", "deploy", ok=True, health=h) for h in ("healthy", SETTLED)]
    assert DeployResult("deploy", None, None, hosts=hosts).health == SETTLED
    hosts.append(HostResult("c", "deploy", ok=True, health="unchecked"))
    assert DeployResult("deploy", None, None, hosts=hosts).health == "unchecked"
