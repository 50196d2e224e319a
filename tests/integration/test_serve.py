"""ftctl serve: predict, health, hot reload (in-process server on a real tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from ftctl.manifest import model_digest
from ftctl.serve import ModelHolder, make_server
from tests.helpers import INTENTS, make_tiny_model


def _call(base: str, path: str, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def served(tmp_path, tiny_model_dir):
    """A link `final -> rel1` (a copy of the tiny model), served on a free port."""
    rel1 = tmp_path / "rel1"
    shutil.copytree(tiny_model_dir, rel1)
    link = tmp_path / "final"
    link.symlink_to(rel1)
    holder = ModelHolder(link)
    server = make_server(holder, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", holder, link
    server.shutdown()
    server.server_close()


def test_health_reports_digest_labels_and_realpath(served, tiny_model_dir):
    base, _holder, link = served
    code, body = _call(base, "/health")
    assert code == 200 and body["status"] == "ok"
    assert body["sha256"] == model_digest(tiny_model_dir)
    assert body["labels"] == list(INTENTS)
    assert body["model_dir"] == os.path.realpath(link)


def test_predict_returns_a_known_label_and_score(served):
    base, _, _ = served
    code, body = _call(base, "/predict", {"text": "帮我打卡"})
    assert code == 200 and body["label"] in INTENTS and 0 < body["score"] <= 1
    code, body = _call(base, "/predict", {"texts": ["查库存", "发货统计"]})
    assert code == 200 and len(body["predictions"]) == 2


def test_bad_requests_get_400_and_404(served):
    base, _, _ = served
    assert _call(base, "/predict", {"txt": "x"})[0] == 400
    assert _call(base, "/nope")[0] == 404


def test_reload_follows_the_link_and_a_broken_model_keeps_the_old_one(served, tmp_path):
    base, holder, link = served
    old = holder.current.sha256
    rel2 = make_tiny_model(tmp_path / "rel2", seed=7)
    tmp_link = tmp_path / "final.tmp"
    tmp_link.symlink_to(rel2)
    os.replace(tmp_link, link)
    assert holder.reload()
    new = model_digest(rel2)
    assert _call(base, "/health")[1]["sha256"] == new != old
    (rel2 / "config.json").write_text("{broken", encoding="utf-8")
    assert not holder.reload()
    code, body = _call(base, "/health")
    assert code == 200 and body["sha256"] == new and body["last_reload_error"]


def test_a_port_in_use_is_a_clear_error(served):
    from ftctl.errors import FtctlError

    base, holder, _link = served
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(FtctlError, match=f"cannot listen on 127.0.0.1:{port}") as info:
        make_server(holder, "127.0.0.1", port)
    assert "--port" in info.value.hint
