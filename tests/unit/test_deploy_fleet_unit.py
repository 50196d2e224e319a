"""Unit tests of the fleet's own logic: hosts that look like options, the ssh/rsync command
lines, the rollout plan, the canary wait without a health check, the fleet's final error."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import DeployConfig, check
from ftctl.deploy import canary
from ftctl.deploy.fleet import fleet_error, rollout_plan, state_after
from ftctl.deploy.program import program
from ftctl.deploy.results import DeployResult, HostResult
from ftctl.deploy.server.shared import Frames, decode
from ftctl.deploy.session import LinkDead
from ftctl.deploy.transfer import master_argv, rsync_argv
from ftctl.errors import ConfigError, DeployError, ExitCode, RollbackFailed
from ftctl.remote import HostSpec, parse_host

OPTION_HOSTS = ["-oProxyCommand=touch${IFS}/tmp/pwned@example.com", "root@-oProxyCommand=x"]


@pytest.mark.parametrize("text", OPTION_HOSTS, ids=["user", "host"])
@pytest.mark.parametrize("command", ["deploy", "rollback", "releases", "status"])
def test_a_host_flag_that_starts_with_a_dash_is_refused_naming_the_flag(command, text, tmp_path):
    r = CliRunner().invoke(app, [command, "--host", text], env={"FTCTL_CONFIG": ""})
    assert r.exit_code == int(ExitCode.USAGE), r.output
    assert "--host" in r.output and "starts with '-'" in r.output
    assert not Path("/tmp/pwned").exists()


def test_a_profile_host_or_user_that_starts_with_a_dash_is_refused_naming_the_key(tmp_path):
    toml = tmp_path / "ftctl.toml"
    toml.write_text(
        '[deploy.prod]\nhosts = ["ok@example.com", "-oProxyCommand=x@example.com"]\n'
        'user = "-lroot"\n',
        encoding="utf-8",
    )
    r = CliRunner().invoke(app, ["--config", str(toml), "status", "--profile", "prod"])
    assert r.exit_code == int(ExitCode.USAGE), r.output
    assert "deploy.prod.hosts[1]" in r.output and "deploy.prod.user" in r.output
    assert "deploy.prod.hosts[0]" not in r.output


def test_host_spec_itself_refuses_an_option_like_user_or_host():
    with pytest.raises(ConfigError, match="starts with '-'"):
        HostSpec("-oProxyCommand=x", "example.com", 22)
    with pytest.raises(ConfigError, match="starts with '-'"):
        HostSpec("root", "-oProxyCommand=x", 22)
    with pytest.raises(ConfigError, match="--host: bad host"):
        parse_host("-x@h", where="--host")
    assert str(parse_host("de-ploy@my-host")) == "de-ploy@my-host:22"  # a dash inside is fine
    with pytest.raises(ConfigError, match=r"deploy.user"):
        check(DeployConfig(user="-oProxyCommand=x"))


def test_ssh_and_rsync_command_lines_put_double_dash_before_the_target():
    cfg = DeployConfig(identity=Path("/keys/id"), bwlimit_kbps=100)
    session = SimpleNamespace(cfg=cfg, conn=SimpleNamespace(user="deploy", host="10.0.0.5", port=2))
    argv = master_argv(session, "/tmp/cm", "deploy@10.0.0.5")
    assert argv[0] == "ssh" and argv[-2:] == ["--", "deploy@10.0.0.5"] and argv.count("--") == 1
    src, dest = "/m/final/", "deploy@10.0.0.5:/srv/.incoming-1/"
    r = rsync_argv(cfg, "ssh -S /tmp/cm", "/tmp/files.txt", src, dest)
    assert r[0] == "rsync" and r[-3:] == ["--", src, dest] and r.count("--") == 1
    assert "--bwlimit=100" in r[: r.index("--")]


def test_the_rollout_plan_names_canaries_the_wait_and_what_a_failure_does():
    hosts = ["root@a:22", "root@b:22", "root@c:22"]
    cfg = DeployConfig(canary=1, canary_wait=45, health_url="http://127.0.0.1:8000/health")
    text = "\n".join(rollout_plan(cfg, hosts))
    assert "canary: root@a:22 go live first" in text
    assert "canary wait: 45s" in text and "http://127.0.0.1:8000/health polled" in text
    assert "a canary failure reverts the canaries and stops" in text
    assert "then, one at a time: root@b:22, root@c:22" in text
    assert "reconnect" not in text and "within 120s" in text
    stop = "\n".join(rollout_plan(DeployConfig(on_failure="stop"), hosts))
    assert "canary" not in stop and "stay on the new model" in stop


def test_without_a_health_check_the_canary_wait_says_it_watches_nothing():
    cfg = DeployConfig(canary=1, canary_wait=30)
    s = SimpleNamespace(hr=HostResult(host="root@a:22", action="deploy"), digest="x")
    warned, slept = [], []
    reporter = SimpleNamespace(warn=warned.append, stage=print, info=print)
    w = canary.watch([s], cfg, reporter, sleep=slept.append)
    assert w.failure is None and w.polls == 0 and slept == [30]
    assert w.watched.startswith("nothing: no health_url or health_cmd")
    assert warned and "nothing" in warned[0]
    assert "nothing" in "\n".join(rollout_plan(cfg, ["root@a:22"]))


def _hosts(*states: str) -> list[HostResult]:
    return [HostResult(host=f"h{i}", action="deploy", state=s) for i, s in enumerate(states)]


def test_a_host_whose_link_dropped_is_unknown_not_untouched():
    hr = HostResult(host="h", action="deploy")
    assert state_after(LinkDead("h: lost the go-live's progress"), hr) == "unknown"
    assert state_after(RollbackFailed("h: swap back failed"), hr) == "failed"
    assert state_after(DeployError("h: did not start"), hr) == "untouched"
    hr.rolled_back = True
    assert state_after(DeployError("h: unhealthy; rolled back"), hr) == "rolled_back"


def test_the_fleet_error_exits_6_while_a_host_may_still_serve_the_new_model():
    first = DeployError("h2: unhealthy; rolled back")
    ok = fleet_error(first, _hosts("reverted", "rolled_back", "untouched"), [], reverting=True)
    assert ok.exit_code == ExitCode.DEPLOY and "h0 reverted, h1 rolled_back, h2 untouched" in (
        ok.message
    )
    assert ok.hint.startswith("no host serves the new model")
    lost = LinkDead("h1: lost the go-live's progress")
    gone = fleet_error(lost, _hosts("reverted", "unknown"), ["h1: not reached"], reverting=True)
    assert gone.exit_code == ExitCode.ROLLBACK_FAILED and "h1 unknown" in gone.message
    assert "h1: not reached" in gone.message
    stop = fleet_error(lost, _hosts("switched", "unknown"), [], reverting=False)
    assert stop.exit_code == ExitCode.DEPLOY and "h1 unknown" in stop.message
    assert "ftctl status" in stop.hint
    res = DeployResult("deploy", None, None, hosts=_hosts("switched", "unknown"), error=stop)
    assert res.to_dict()["states"] == {"h0": "switched", "h1": "unknown"}
    single = fleet_error(first, _hosts("rolled_back"), [], reverting=True)
    assert single is first


PY36 = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions/3.6.15/bin/python3"


@pytest.fixture(scope="module")
def health_server():
    """/ok serves the digest, /other another one, /plain text, /down 503; a raw port that
    answers garbage; a closed port."""
    bodies = {
        "/ok": (200, b'{"sha256": "' + b"a" * 64 + b'"}'),
        "/other": (200, b'{"sha256": "' + b"b" * 64 + b'"}'),
        "/plain": (200, b"fine"),
        "/down": (503, b"{}"),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = bodies[self.path]
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    garbage = socket.create_server(("127.0.0.1", 0))

    def answer_garbage():
        while True:
            try:
                conn, _ = garbage.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"garbage\r\n\r\n")

    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    threading.Thread(target=answer_garbage, daemon=True).start()
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    yield {
        "http": f"http://127.0.0.1:{httpd.server_address[1]}",
        "garbage": f"http://127.0.0.1:{garbage.getsockname()[1]}/health",
        "closed": f"http://127.0.0.1:{closed_port}/health",
    }
    httpd.shutdown()
    garbage.close()


@pytest.mark.parametrize("python", [sys.executable, str(PY36)], ids=["client", "py3.6"])
def test_the_canary_url_check_passes_only_a_200_serving_the_new_model(health_server, python):
    """The check the canary wait runs on the server (the server program's ``health`` command),
    with the server's oldest python3."""

    def check(url: str) -> tuple[int, dict]:
        p = program()
        req = {"health_url": url, "health_timeout": 5, "digest": "a" * 64}
        out = subprocess.run(p.command(python, "health"), shell=True, input=p.stdin(req),
                             capture_output=True, timeout=60)  # fmt: skip
        (answer,), _noise = Frames().feed(out.stdout)
        return out.returncode, decode(answer)

    base = health_server["http"]
    assert check(f"{base}/ok")[0] == 0
    assert check(f"{base}/plain")[0] == 0  # no digest reported: the status decides
    rc, ans = check(f"{base}/other")
    assert rc == 1 and ans["detail"] == "serving bbbbbbbb, expected aaaaaaaa"
    rc, ans = check(f"{base}/down")
    assert rc == 1 and "503" in ans["detail"]
    for name in ("garbage", "closed"):
        rc, ans = check(health_server[name])
        assert rc == 1 and not ans["healthy"] and ans["detail"], name
