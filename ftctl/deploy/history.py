"""What happened on a server: releases with their provenance, the deploy history (what was live
before: rollback's default, retention's rule), the last go-live's outcome."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ftctl.deploy.plan import RemoteState, probe_request
from ftctl.deploy.server.shared import release_key, release_tag
from ftctl.deploy.session import Session, q
from ftctl.manifest import EVAL_REPORT, MANIFEST

_MARK = "=====ftctl-release"


def probe(session: Session, model=None) -> RemoteState:
    """Look at the server (one command); change nothing."""
    req = probe_request(session.cfg, model)
    st = RemoteState.from_probe(session.call("probe", req, what="probe"))
    st.previous = previous_release(st.log, st.live, st.releases)
    session.python = st.python or session.python
    return st


def previous_release(entries: list[dict], live: str | None, releases: list[str]) -> str | None:
    """The release that was live before ``live``: from the newest successful deploys.log entry
    that made ``live`` live; without one, the newest release older than ``live``."""
    for entry in reversed(entries):
        if entry.get("ok") and entry.get("release") == live and not entry.get("rolled_back"):
            prev = entry.get("previous")
            if prev in releases and prev != live:
                return prev
            break
    older = [
        r for r in sorted(releases, key=release_key) if live and release_key(r) < release_key(live)
    ]
    return older[-1] if older else None


def retention(releases: list[str], keep: int, live: str | None, previous: str | None) -> list[str]:
    """Releases to remove: all but the newest ``keep``, never the live one, the previous one
    or a ``*-original`` backup."""
    ordered = sorted(releases, key=release_key)
    kept = set(ordered[-keep:]) if keep > 0 else set()
    kept |= {r for r in (live, previous) if r}
    kept |= {r for r in ordered if r.endswith("-original")}
    return [r for r in ordered if r not in kept]


def release_time(name: str) -> str | None:
    try:
        ts = datetime.strptime(name[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return ts.isoformat()


def _summarize_manifest(man: dict) -> dict:
    """When, from which base and data, with which metrics (ftctl train's manifest schema)."""
    base = man.get("base_model") or {}
    if isinstance(base, dict):
        base = base.get("sha256") or base.get("path")
    data = {}
    raw = man.get("data") or {}
    for key, v in raw.items() if isinstance(raw, dict) else ():
        if isinstance(v, dict):  # {"new": {"path", "sha256"}, "old": {...} | None}
            data[str(v.get("path") or key)] = v.get("sha256")
        elif v is not None:
            data[str(key)] = v
    metrics = man.get("best")
    if metrics is None and isinstance(man.get("metrics"), list) and man["metrics"]:
        metrics = man["metrics"][-1]
    return {
        "created": man.get("created_at") or man.get("created"),
        "kind": man.get("kind"),
        "base_model": base,
        "data": data,
        "train_metrics": metrics,
        "git_commit": man.get("git_commit"),
    }


def _summarize_report(rep: dict) -> dict:
    keys = ("accuracy", "macro_f1", "gate", "passed", "verdict", "candidate", "summary")
    return {k: rep[k] for k in keys if k in rep} or {"keys": sorted(rep)[:10]}


def list_releases(session: Session) -> list[dict]:
    """Every release on the server, oldest first, with what its manifest / eval report say;
    ``live`` and ``previous`` (the release live before it, from deploys.log) marked."""
    st = probe(session)
    script = (
        f"cd {q(session.cfg.remote_dir)} 2>/dev/null || exit 0; for r in releases/*/; do "
        f'[ -d "$r" ] || continue; for f in {MANIFEST} {EVAL_REPORT}; do '
        f'echo "{_MARK} $(basename "$r") $f"; cat "$r$f" 2>/dev/null; echo; done; done'
    )
    _rc, out, _err = session.run(script, what="read manifests")
    blobs: dict[tuple[str, str], str] = {}
    key = None
    for line in out.splitlines():
        if line.startswith(_MARK):
            _, rel, fname = line.split(" ", 2)
            key = (rel, fname)
            blobs[key] = ""
        elif key:
            blobs[key] += line + "\n"
    rows = []
    for name in st.releases:
        row: dict[str, Any] = {
            "name": name,
            "time": release_time(name),
            "sha8": release_tag(name),
            "live": name == st.live,
            "previous": name == st.previous,
        }
        for fname, fn in ((MANIFEST, _summarize_manifest), (EVAL_REPORT, _summarize_report)):
            text = blobs.get((name, fname), "").strip()
            if text:
                try:
                    row[fname.split(".")[0]] = fn(json.loads(text))
                except (json.JSONDecodeError, AttributeError):
                    row[fname.split(".")[0]] = {"error": "unreadable"}
        rows.append(row)
    return rows


def last_status(session: Session, entries: int = 5) -> dict:
    """The last go-live's status file, the lock, the newest lines of deploys.log, the server's
    Python. A go-live (or a backup) that died under the lock is finished first, from its
    journal: ``recovered`` says what was done."""
    from ftctl.deploy.session import lock_info

    req = {
        "remote_dir": session.cfg.remote_dir,
        "link": session.cfg.link_name,
        "entries": entries,
        "lock": lock_info("status", "status"),
    }
    ans = session.call("status", req, what="read the status")
    st = probe(session)
    return {
        "live": st.live,
        "link": st.link,
        "previous": st.previous,
        "lock": ans.get("lock"),
        "status": ans.get("status"),
        "log": ans.get("log", []),
        "python": ans.get("python"),
        "recovered": ans.get("recovered"),
    }
