"""Unit tests of deploy's own logic (parsing, ordering, retention, locks, digests)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import DeployConfig
from ftctl.deploy import (
    RemoteState,
    describe_lock,
    load_local_model,
    lock_owner,
    prune,
    release_key,
    release_tag,
)
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
    assert sorted(names, key=release_key) == [
        "20261129051259-ffffffff",
        "20261129051300-original",
        "20261129051300-1a2b3c4d",
    ]
    assert release_tag("20261129051300-1a2b3c4d") == "1a2b3c4d"
    assert release_tag("20261129051300-original") is None


class FakeConn:
    host, user, port = "h", "root", 22

    def __init__(self):
        self.commands = []

    def run(self, cmd, **kw):
        self.commands.append(cmd)
        return SimpleNamespace(failed=False, ok=True, stdout="", stderr="", exited=0)


def test_prune_never_deletes_live_or_previous_even_when_old():
    rels = [f"2026112905130{i}-0000000{i}" for i in range(6)]
    st = RemoteState("link", rels[1], list(rels), [], None, 0, [])  # live is an old one
    conn = FakeConn()
    doomed = prune(conn, DeployConfig(keep_releases=2), st)
    assert doomed == rels[2:4]  # keeps 0 (previous), 1 (live), 4 and 5 (newest two)
    assert all(r in conn.commands[0] for r in doomed)


def test_describe_lock_flags_old_locks_as_stale():
    text, stale = describe_lock({"owner": "a@b", "pid": 5, "time": "2020-01-01T00:00:00+00:00"})
    assert stale and "a@b" in text and "pid 5" in text
    dead = {"owner": lock_owner(), "pid": 2**22 + 7, "time": "2999-01-01T00:00:00+00:00"}
    assert describe_lock(dead)[1]  # same machine, process gone
    mine = {"owner": lock_owner(), "pid": os.getpid(), "time": "2999-01-01T00:00:00+00:00"}
    assert not describe_lock(mine)[1]


def test_digest_uses_the_manifest_map_and_matches_without_it(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    plain = model_digest(model)
    assert plain == tree_digest(sha256_tree(model))
    atomic_write_text(model / "manifest.json", json.dumps({"files": sha256_tree(model)}))
    assert model_digest(model) == plain  # manifest.json itself is not content
    local = load_local_model(model)
    assert local.has_manifest and "manifest.json" in local.expected
    assert local.sha8 == plain[:8]


def test_manifest_listing_a_missing_file_is_refused(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model)
    files = sha256_tree(model)
    files["missing.bin"] = "0" * 64
    atomic_write_text(model / "manifest.json", json.dumps({"files": files}))
    with pytest.raises(ModelError, match=r"missing\.bin"):
        load_local_model(model)


def test_cli_without_host_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(app, ["deploy", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "no host" in r.output


def test_cli_bad_smoke_case_is_a_usage_error():
    r = CliRunner().invoke(app, ["deploy", "--host", "h", "--smoke", "no-equals-sign"])
    assert r.exit_code == 2 and "TEXT=LABEL" in r.output


def test_several_hosts_go_one_at_a_time_and_stop_at_the_first_failure(tiny_model_dir):
    from ftctl.deploy import deploy
    from ftctl.errors import EnvironmentProblem

    tried = []

    def connect(spec):
        tried.append(str(spec))
        raise EnvironmentProblem(f"{spec}: cannot connect over SSH")

    hosts = [parse_host("a"), parse_host("b")]
    res = deploy(tiny_model_dir, DeployConfig(), hosts, connect)
    assert tried == ["root@a:22"]
    assert not res.ok and isinstance(res.error, EnvironmentProblem)
    assert [h.host for h in res.hosts] == ["root@a:22"] and res.hosts[0].error


def test_a_final_that_is_a_file_or_a_foreign_link_is_refused():
    from ftctl.deploy import check_link
    from ftctl.errors import DeployError

    cfg = DeployConfig(remote_dir="/srv/m")
    with pytest.raises(DeployError, match="neither a directory nor a link"):
        check_link(FakeConn(), cfg, RemoteState("other", None, [], [], None, 0, []))
    with pytest.raises(DeployError, match="does not point into releases"):
        check_link(FakeConn(), cfg, RemoteState("link", None, [], [], None, 0, []))
    check_link(FakeConn(), cfg, RemoteState("dir", None, [], [], None, 0, []))  # backed up
