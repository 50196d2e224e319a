"""ftctl deploy / rollback / releases against a real sshd and a real supervisord."""

from __future__ import annotations

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.deploy import Hooks, deploy, model_digest, rollback
from ftctl.errors import DeployError, HostKeyError, LockHeld

pytestmark = pytest.mark.integration


def _deploy(target, model, cfg=None, **kw):
    cfg = cfg or target.cfg
    return deploy(model, cfg, target.specs(), target.connect(cfg), **kw)


def test_first_deploy_backs_up_real_final_and_swaps(deploy_target, deploy_models):
    t = deploy_target
    res = _deploy(t, deploy_models["b"])
    assert res.ok, res.error
    (h,) = res.hosts
    originals = [r for r in t.releases() if r.endswith("-original")]
    assert len(originals) == 1 and h.backup == originals[0]
    assert model_digest(t.remote_dir / "releases" / originals[0]) == model_digest(deploy_models["a"])
    digest_b = model_digest(deploy_models["b"])
    assert t.link_target() == f"releases/{h.release}" and h.release.endswith(digest_b[:8])
    assert t.health()["sha256"] == digest_b
    assert h.uploaded_bytes > 0 and h.uploaded_files > 0
    (entry,) = t.log_lines()
    assert entry["ok"] and entry["release"] == h.release and entry["previous"] == h.backup
    assert not (t.remote_dir / ".deploy.lock").exists()
