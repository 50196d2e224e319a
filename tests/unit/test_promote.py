"""ftctl promote's decisions, on their own (the real thing: tests/integration/test_promote.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.deploy.promote import StagingView, check_verdict, choose
from ftctl.errors import ExitCode, GateFailed, PromoteRefused

runner = CliRunner()


def view(host: str, digest: str = "d" * 64, **kw) -> StagingView:
    """A healthy staging host serving ``digest`` with a PASS recorded for it."""
    gate = {"verdict": "PASS", "gate": {"model_digest": digest, "reasons": []}}
    fields = {"live": "20261130081500-" + digest[:8], "digest": digest, "healthy": True,
              "health": "200", "gate": gate}  # fmt: skip
    return StagingView(host, **(fields | kw))


def test_a_mixed_staging_is_refused_naming_what_each_host_serves():
    with pytest.raises(PromoteRefused, match=r"\[deploy.staging\] is mixed: a serves .*b serves"):
        choose([view("a"), view("b", "e" * 64)], "staging")
    assert choose([view("a"), view("b")], "staging").host == "a"  # same digest: one release


def test_one_unhealthy_host_refuses_the_whole_staging():
    sick = view("b", healthy=False, health="http://127.0.0.1:8000/health: 503")
    with pytest.raises(PromoteRefused, match=r"b: 20261130081500-dddddddd: .*503"):
        choose([view("a"), sick], "staging")


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        (None, "carries no gate verdict"),
        ({"verdict": "FAIL", "gate": {"reasons": ["CLOCK_IN -30"]}}, "is FAIL .*CLOCK_IN -30"),
        ({"verdict": "SKIPPED", "gate": {}}, "its gate verdict is SKIPPED"),
        ({"verdict": "PASS", "gate": {"model_digest": "f" * 64}}, "for another model"),
    ],
)
def test_only_a_pass_for_this_very_model_goes_on(gate, message):
    with pytest.raises(GateFailed, match=message):
        check_verdict(view("a", gate=gate))
    assert check_verdict(view("a"))["verdict"] == "PASS"


def test_cli_promote_names_unknown_profiles(tmp_path):
    conf = tmp_path / "ftctl.toml"
    conf.write_text('[deploy.staging]\nhosts = ["root@127.0.0.1:1"]\n')
    result = runner.invoke(app, ["--config", str(conf), "promote", "--to", "prod"])
    assert result.exit_code == ExitCode.USAGE and "no [deploy.prod] profile" in result.output
