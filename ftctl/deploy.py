"""Deploy a model directory over SSH: lock, upload, verify, swap, restart, health, rollback.

Remote layout (Capistrano's, for models) under ``remote_dir``::

    releases/<UTC yyyymmddHHMMSS>-<sha8>/   one model each, never edited after upload
    final -> releases/<...>                 what the service loads (the seed's path)
    .incoming-<id>/                         upload target; renamed into releases/ once verified
    deploys.log                             one JSON line per deploy/rollback
    .deploy.lock                            owner, pid, time; stale locks are reported

Every step is a small function of a Fabric ``Connection`` that probes, then acts, so a rerun
after any failure converges. Nothing here prints: progress goes through the reporter.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftctl import __version__
from ftctl.errors import DeployError, FtctlError, LockHeld, ModelError, RollbackFailed
from ftctl.fsutil import sha256_file, sha256_tree
from ftctl.manifest import MANIFEST, manifest_files, tree_digest
from ftctl.progress import NULL, Reporter

if TYPE_CHECKING:
    from fabric import Connection

    from ftctl.config import DeployConfig

EVAL_REPORT = "eval_report.json"
LOCK = ".deploy.lock"
LOG = "deploys.log"
TOOLS = ("sha256sum", "ln", "mv", "df", "mkdir", "rm", "readlink", "ls", "cat", "python3")
STALE_LOCK_S = 3600.0  # a lock older than this is reported as stale
_RELEASE_RE = re.compile(r"^\d{14}-(?P<tag>[0-9a-f]{8}|original)$")


# --------------------------------------------------------------------------- the local model


@dataclass(frozen=True)
class LocalModel:
    """A model directory ready to ship: what to upload and what each file must hash to."""

    path: Path
    files: dict[str, str]  # content files {relpath: sha256} (the manifest's map)
    expected: dict[str, str]  # everything uploaded, manifest.json included
    sizes: dict[str, int]
    digest: str
    has_manifest: bool

    @property
    def sha8(self) -> str:
        return self.digest[:8]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def load_local_model(model_dir: str | Path, reporter: Reporter = NULL) -> LocalModel:
    """Read (and check) the model directory to deploy."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: not a model directory (no config.json)",
            hint="pass the final/ directory written by `ftctl train` (--model models/.../final)",
        )
    files = manifest_files(path)
    expected = dict(files or {})
    if files is None:
        reporter.warn(f"{path} has no {MANIFEST}: computing checksums now (train writes one)")
        files = sha256_tree(path, exclude=(MANIFEST,))
        expected = dict(files)
    else:
        missing = [rel for rel in files if not (path / rel).is_file()]
        if missing:
            raise ModelError(
                f"{path}: files listed in {MANIFEST} are missing: {', '.join(missing)}",
                hint="the directory is incomplete; copy it again or retrain",
            )
        extra = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file()
            and p.relative_to(path).as_posix() not in files
            and p.name not in (MANIFEST, EVAL_REPORT)
        )
        if extra:
            reporter.warn(f"not in {MANIFEST}, not deployed: {', '.join(extra)}")
        expected[MANIFEST] = sha256_file(path / MANIFEST)
    for extra_file in (EVAL_REPORT,):  # placed beside the model by hand or by the pipeline
        if (path / extra_file).is_file() and extra_file not in expected:
            expected[extra_file] = sha256_file(path / extra_file)
    sizes = {rel: (path / rel).stat().st_size for rel in expected}
    return LocalModel(path, files, expected, sizes, tree_digest(files), files is not None)


# --------------------------------------------------------------------------- remote commands


@dataclass
class Hooks:
    """Test and bench hooks (fault injection); all optional."""

    on_upload_bytes: Callable[[Connection, int], None] | None = None  # after each chunk
    after_upload: Callable[[Connection, str], None] | None = None  # (conn, incoming dir)


def q(s: str) -> str:
    return shlex.quote(s)


def run(conn: Connection, cmd: str, cfg: DeployConfig, *, check: bool = True, what: str = ""):
    """Run one remote command; connection problems become DeployError."""
    try:
        res = conn.run(cmd, hide=True, warn=True, timeout=cfg.command_timeout, in_stream=False)
    except FtctlError:
        raise
    except Exception as exc:  # paramiko/invoke raise many kinds (timeouts, dropped sessions)
        raise DeployError(
            f"{conn.host}: {what or 'remote command'} failed: {type(exc).__name__}: {exc}",
            hint="check the connection; the live model is untouched unless a step says otherwise",
        ) from None
    if check and res.failed:
        tail = (res.stderr or res.stdout).strip()[-500:]
        raise DeployError(
            f"{conn.host}: {what or cmd!r} exited {res.exited}: {tail}",
            hint="fix the server side problem named above and rerun",
        )
    return res


def release_tag(name: str) -> str | None:
    """sha8 of a release name (None for <ts>-original or foreign names)."""
    m = _RELEASE_RE.match(name)
    return m["tag"] if m and m["tag"] != "original" else None


def release_time(name: str) -> str | None:
    try:
        ts = datetime.strptime(name[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return ts.isoformat()


def release_key(name: str) -> tuple[str, int, str]:
    """Release order: by time; a <ts>-original backup sorts before a release of the same second."""
    return (name[:14], 0 if name.endswith("-original") else 1, name)


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


@dataclass
class RemoteState:
    """What is on the server now."""

    link: str  # "link" | "dir" | "missing" | "other"
    live: str | None  # release name the link points at
    releases: list[str]
    incoming: list[str]
    lock: dict | None
    free_bytes: int
    missing_tools: list[str]

    def previous(self, of: str | None = None) -> str | None:
        """The newest release older than ``of`` (default: the live one)."""
        of = of or self.live
        older = [
            r
            for r in sorted(self.releases, key=release_key)
            if of is None or release_key(r) < release_key(of)
        ]
        return older[-1] if older else None


def probe(conn: Connection, cfg: DeployConfig) -> RemoteState:
    """Look at the server; change nothing."""
    d = q(cfg.remote_dir)
    link = q(cfg.link_name)
    script = f"""
for t in {" ".join(TOOLS)}; do command -v $t >/dev/null 2>&1 || echo "tool $t"; done
p={d}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done
echo "df $(df -Pk "$p" | tail -1)"
if cd {d} 2>/dev/null; then
  if [ -L {link} ]; then echo "link $(readlink {link})"
  elif [ -d {link} ]; then echo "dir"
  elif [ -e {link} ]; then echo "other"
  else echo "missing"; fi
  for r in releases/*/; do [ -d "$r" ] && echo "release $(basename "$r")"; done
  for r in .incoming-*; do [ -e "$r" ] && echo "incoming $r"; done
  [ -f {LOCK} ] && echo "lock $(cat {LOCK} | tr -d '\\n')"
else echo "missing"; fi
true
"""
    res = run(conn, script, cfg, what="probe")
    st = RemoteState("missing", None, [], [], None, 0, [])
    for line in res.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "tool":
            st.missing_tools.append(rest)
        elif kind == "df":
            cols = rest.split()
            st.free_bytes = int(cols[3]) * 1024 if len(cols) > 3 and cols[3].isdigit() else 0
        elif kind in ("dir", "missing", "other"):
            st.link = kind
        elif kind == "link":
            st.link = "link"
            target = rest.rstrip("/")
            st.live = target.rsplit("/", 1)[-1] if target.startswith(("releases/", "/")) else None
            if target.startswith("/") and not target.startswith(cfg.remote_dir.rstrip("/") + "/"):
                st.live = None
        elif kind == "release":
            st.releases.append(rest)
        elif kind == "incoming":
            st.incoming.append(rest)
        elif kind == "lock":
            try:
                st.lock = json.loads(rest)
            except json.JSONDecodeError:
                st.lock = {"raw": rest}
    st.releases.sort(key=release_key)
    return st


def check_tools(conn: Connection, st: RemoteState) -> None:
    if st.missing_tools:
        raise DeployError(
            f"{conn.host}: remote tools missing: {', '.join(st.missing_tools)}",
            hint="install them on the server (coreutils, python3)",
        )


def lock_owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def describe_lock(lock: dict) -> tuple[str, bool]:
    """'owner pid N since T (age)' and whether it looks stale."""
    owner = lock.get("owner", "?")
    pid = lock.get("pid", "?")
    when = lock.get("time", "?")
    age = None
    with contextlib.suppress(TypeError, ValueError):
        age = time.time() - datetime.fromisoformat(when).timestamp()
    stale = age is not None and age > STALE_LOCK_S
    if owner == lock_owner() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale = True
        except PermissionError:
            pass
    age_s = f", {age:.0f}s ago" if age is not None else ""
    action = lock.get("action", "deploy")
    return f"{owner} (pid {pid}, {action} since {when}{age_s})", stale


@contextlib.contextmanager
def remote_lock(conn: Connection, cfg: DeployConfig, action: str) -> Iterator[dict]:
    """Take ``.deploy.lock`` (O_EXCL via noclobber); always release it, even after a cut."""
    info = {
        "owner": lock_owner(),
        "pid": os.getpid(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": action,
        "token": uuid.uuid4().hex,
    }
    d = q(cfg.remote_dir)
    body = q(json.dumps(info))
    res = run(
        conn,
        f"mkdir -p {d} && cd {d} && (set -C; printf '%s\\n' {body} > {LOCK}) 2>/dev/null",
        cfg,
        check=False,
        what="take the lock",
    )
    if res.failed:
        held = run(conn, f"cat {d}/{LOCK} 2>/dev/null; true", cfg, what="read the lock").stdout
        if not held.strip():  # no lock there: creating it failed for another reason
            raise DeployError(
                f"{conn.host}: cannot create {cfg.remote_dir}/{LOCK}: "
                f"{(res.stderr or res.stdout).strip()[-300:] or 'permission denied?'}",
                hint=f"check that {conn.user} may write {cfg.remote_dir}",
            )
        try:
            lock = json.loads(held)
        except json.JSONDecodeError:
            lock = {"raw": held.strip()}
        who, stale = describe_lock(lock)
        path = f"{cfg.remote_dir}/{LOCK}"
        if stale:
            raise LockHeld(
                f"{conn.host}: STALE deploy lock held by {who}",
                hint=f"no deploy seems to run; remove it (ssh {conn.user}@{conn.host} "
                f"rm {path}) and rerun",
            )
        raise LockHeld(
            f"{conn.host}: another deploy holds the lock: {who}",
            hint=f"wait for it to finish; if it died, remove {path} on the server",
        )
    try:
        yield info
    finally:
        release = f"cd {d} && grep -q {info['token']} {LOCK} 2>/dev/null && rm -f {LOCK}; true"
        try:
            run(conn, release, cfg, what="release the lock")
        except DeployError:
            _reopen(conn)  # the session died (e.g. cut mid-upload): one fresh try
            with contextlib.suppress(DeployError):
                run(conn, release, cfg, what="release the lock")


def _reopen(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.close()
    conn._sftp = None
    with contextlib.suppress(Exception):
        conn.open()


def append_log(conn: Connection, cfg: DeployConfig, entry: dict) -> None:
    line = q(json.dumps(entry, ensure_ascii=False, default=str))
    with contextlib.suppress(DeployError):
        run(conn, f"printf '%s\\n' {line} >> {q(cfg.remote_dir)}/{LOG}", cfg, what="log")


def backup_original(conn: Connection, cfg: DeployConfig, st: RemoteState) -> str | None:
    """First deploy: move a real final/ dir to releases/<ts>-original/ and link to it."""
    if st.link != "dir":
        return None
    name = f"{utc_stamp()}-original"
    d, link = q(cfg.remote_dir), q(cfg.link_name)
    run(
        conn,
        f"cd {d} && mkdir -p releases && mv {link} releases/{name} && "
        f"ln -sfn releases/{name} {link}.tmp && mv -T {link}.tmp {link}",
        cfg,
        what="back up the original model",
    )
    st.link, st.live = "link", name
    st.releases = sorted([*st.releases, name], key=release_key)
    return name


def check_link(conn: Connection, cfg: DeployConfig, st: RemoteState) -> None:
    """Refuse a ``final`` this tool did not make and cannot undo (a file, a foreign link)."""
    path = f"{cfg.remote_dir}/{cfg.link_name}"
    if st.link == "other":
        raise DeployError(
            f"{conn.host}: {path} is neither a directory nor a link",
            hint="move it away by hand, then rerun",
        )
    if st.link == "link" and st.live is None:
        raise DeployError(
            f"{conn.host}: {path} is a link that does not point into releases/",
            hint=f"replace it by the directory it points at (the first deploy backs that up), "
            f"or point it at {cfg.remote_dir}/releases/<name>",
        )


def clean_incoming(conn: Connection, cfg: DeployConfig, st: RemoteState) -> None:
    """Leftovers of interrupted uploads (we hold the lock, so nobody else is uploading)."""
    if st.incoming:
        paths = " ".join(q(p) for p in st.incoming)
        run(conn, f"cd {q(cfg.remote_dir)} && rm -rf -- {paths}", cfg, what="clean .incoming-*")
        st.incoming = []


def remote_sha256(conn: Connection, cfg: DeployConfig, rdir: str, rels: list[str]) -> dict:
    res = run(
        conn,
        f"cd {q(rdir)} && sha256sum -- {' '.join(q(r) for r in rels)}",
        cfg,
        check=False,
        what="sha256sum",
    )
    got = {}
    for line in res.stdout.splitlines():
        sha, _, rel = line.partition("  ")
        got[rel.lstrip("*")] = sha.lstrip("\\")
    return got


def bad_files(conn: Connection, cfg: DeployConfig, rdir: str, expected: dict[str, str]) -> list:
    got = remote_sha256(conn, cfg, rdir, sorted(expected))
    return [rel for rel, sha in sorted(expected.items()) if got.get(rel) != sha]


def find_release(conn: Connection, cfg: DeployConfig, st: RemoteState, model: LocalModel):
    """A release already on the server with this content (verified), newest first."""
    for name in sorted(st.releases, key=release_key, reverse=True):
        if release_tag(name) == model.sha8:
            rdir = f"{cfg.remote_dir}/releases/{name}"
            if not bad_files(conn, cfg, rdir, model.expected):
                return name
    return None


def upload(
    conn: Connection,
    cfg: DeployConfig,
    model: LocalModel,
    incoming: str,
    reporter: Reporter = NULL,
    hooks: Hooks | None = None,
) -> int:
    """Put every file into ``incoming`` (sftp); returns bytes sent."""
    hooks = hooks or Hooks()
    dirs = sorted({str(Path(rel).parent) for rel in model.expected} - {"."})
    mk = " ".join(q(f"{incoming}/{d}") for d in dirs)
    run(conn, f"mkdir -p {q(incoming)} {mk}", cfg, what="create the upload directory")
    sent = 0
    try:
        sftp = conn.sftp()
        with reporter.task("upload", total=model.total_bytes, unit="B") as advance:
            for rel in sorted(model.expected):
                last = 0

                def progress(done: int, _total: int) -> None:
                    nonlocal last, sent
                    advance(done - last)
                    sent += done - last
                    last = done
                    if hooks.on_upload_bytes:
                        hooks.on_upload_bytes(conn, sent)

                sftp.put(str(model.path / rel), f"{incoming}/{rel}", callback=progress)
    except FtctlError:
        raise
    except Exception as exc:
        raise DeployError(
            f"{conn.host}: upload failed after {sent} bytes: {type(exc).__name__}: {exc}",
            hint="the live model is untouched; rerun the deploy (leftovers are cleaned up)",
        ) from None
    return sent


def swap(conn: Connection, cfg: DeployConfig, release: str) -> None:
    """Point the link at ``releases/<release>`` with one rename (atomic for readers)."""
    d, link = q(cfg.remote_dir), q(cfg.link_name)
    run(
        conn,
        f"cd {d} && test -d releases/{q(release)} && ln -sfn releases/{q(release)} {link}.tmp "
        f"&& mv -T {link}.tmp {link}",
        cfg,
        what=f"swap the link to {release}",
    )


def restart(conn: Connection, cfg: DeployConfig) -> str:
    cmd = cfg.reload_cmd or cfg.restart_cmd
    run(conn, cmd, cfg, what="reload" if cfg.reload_cmd else "restart")
    return cmd


_HTTP_SNIPPET = r"""
import json, sys, urllib.request
url, body = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
out = []
for text in (json.loads(body) if body else [None]):
    data = None if text is None else json.dumps({"text": text}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out.append({"status": r.status, "body": json.loads(r.read().decode() or "null")})
    except Exception as e:
        out.append({"status": 0, "error": str(e)})
print(json.dumps(out))
"""


def http_from_server(conn: Connection, cfg: DeployConfig, url: str, texts=None) -> list[dict]:
    """GET (texts None) or POST each text to ``url``, from the server itself (python3)."""
    args = [url] + ([json.dumps(list(texts), ensure_ascii=False)] if texts is not None else [])
    cmd = f"python3 -c {q(_HTTP_SNIPPET)} " + " ".join(q(a) for a in args)
    res = run(conn, cmd, cfg, check=False, what="http")
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return [{"status": 0, "error": (res.stderr or res.stdout).strip()[-300:]}]


def wait_healthy(
    conn: Connection, cfg: DeployConfig, expect_sha8: str | None, reporter: Reporter = NULL
) -> str:
    """Poll health_cmd / health_url until healthy (and serving ``expect_sha8``) or timeout."""
    if not cfg.health_cmd and not cfg.health_url:
        reporter.warn("no health_url or health_cmd configured: not checking the service")
        return "unchecked"
    deadline = time.monotonic() + cfg.health_timeout
    last = ""
    while True:
        if cfg.health_cmd:
            res = run(conn, cfg.health_cmd, cfg, check=False, what="health_cmd")
            if res.ok:
                return "healthy"
            last = f"health_cmd exited {res.exited}: {(res.stderr or res.stdout).strip()[-200:]}"
        else:
            (ans,) = http_from_server(conn, cfg, cfg.health_url)
            body = ans.get("body") if isinstance(ans.get("body"), dict) else {}
            sha = str(body.get("sha256", ""))
            if ans.get("status") == 200 and (not expect_sha8 or not sha or sha[:8] == expect_sha8):
                return "healthy"
            last = (
                f"serving {sha[:8]}, expected {expect_sha8}"
                if ans.get("status") == 200
                else ans.get("error") or f"HTTP {ans.get('status')}"
            )
        if time.monotonic() >= deadline:
            raise DeployError(
                f"{conn.host}: service not healthy after {cfg.health_timeout:.0f}s: {last}",
                hint="see the service's log on the server",
            )
        time.sleep(0.5)


def predict_url(cfg: DeployConfig) -> str | None:
    if cfg.predict_url:
        return cfg.predict_url
    if cfg.health_url:
        return cfg.health_url.rsplit("/", 1)[0] + "/predict"
    return None


def smoke_test(conn: Connection, cfg: DeployConfig) -> list[dict]:
    """Each (text, label) case answered by the live service; raise on the first wrong one."""
    if not cfg.smoke:
        return []
    url = predict_url(cfg)
    if url is None:
        raise DeployError("smoke cases need predict_url or health_url", hint="set one of them")
    answers = http_from_server(conn, cfg, url, [t for t, _ in cfg.smoke])
    results = []
    for (text, want), ans in zip(cfg.smoke, answers, strict=False):
        body = ans.get("body") if isinstance(ans.get("body"), dict) else {}
        got = body.get("label")
        results.append({"text": text, "expected": want, "label": got, "ok": got == want})
    wrong = [r for r in results if not r["ok"]]
    if wrong or len(results) < len(cfg.smoke):
        detail = "; ".join(f"{r['text']!r}: got {r['label']}, want {r['expected']}" for r in wrong)
        raise DeployError(
            f"{conn.host}: smoke test failed: {detail or answers}",
            hint="the new model answers these cases wrong; check it with `ftctl eval`",
        )
    return results


def prune(conn: Connection, cfg: DeployConfig, st: RemoteState) -> list[str]:
    """Keep the newest ``keep_releases``; never the live one or the one before it."""
    keep = set(sorted(st.releases, key=release_key)[-cfg.keep_releases :])
    keep |= {r for r in (st.live, st.previous()) if r}
    doomed = [r for r in st.releases if r not in keep]
    if doomed:
        paths = " ".join(q(f"releases/{r}") for r in doomed)
        run(conn, f"cd {q(cfg.remote_dir)} && rm -rf -- {paths}", cfg, what="retention")
        st.releases = [r for r in st.releases if r in keep]
    return doomed


# --------------------------------------------------------------------------- results


@dataclass
class HostResult:
    host: str
    action: str  # deploy | rollback
    ok: bool = False
    dry_run: bool = False
    release: str | None = None
    previous: str | None = None
    backup: str | None = None
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    reused: bool = False
    rolled_back: bool = False
    pruned: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    smoke: list[dict] = field(default_factory=list)
    health: str | None = None
    seconds: float = 0.0
    error: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeployResult:
    action: str
    model: str | None
    sha256: str | None
    hosts: list[HostResult] = field(default_factory=list)
    error: FtctlError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "action": self.action,
            "model": self.model,
            "sha256": self.sha256,
            "hosts": [h.to_dict() for h in self.hosts],
            "error": self.error.to_dict() if self.error else None,
        }

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error


def _log_entry(conn: Connection, hr: HostResult, sha: str | None) -> dict:
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": hr.action,
        "ok": hr.ok,
        "by": lock_owner(),
        "host": conn.host,
        "release": hr.release,
        "previous": hr.previous,
        "sha256": sha,
        "uploaded_bytes": hr.uploaded_bytes,
        "rolled_back": hr.rolled_back,
        "seconds": round(hr.seconds, 2),
        "error": hr.error["message"] if hr.error else None,
        "ftctl": __version__,
    }


# --------------------------------------------------------------------------- deploy


def _go_live(
    conn: Connection,
    cfg: DeployConfig,
    release: str,
    previous: str | None,
    hr: HostResult,
    reporter: Reporter,
) -> None:
    """Swap, restart, health, smoke; on any failure swap back to ``previous`` and raise."""
    reporter.stage(f"{conn.host}: swap to {release}")
    swap(conn, cfg, release)
    try:
        reporter.stage(f"{conn.host}: {'reload' if cfg.reload_cmd else 'restart'}")
        restart(conn, cfg)
        hr.health = wait_healthy(conn, cfg, release_tag(release), reporter)
        hr.smoke = smoke_test(conn, cfg)
    except (DeployError, KeyboardInterrupt) as exc:  # Ctrl-C after the swap rolls back too
        cause = exc
        if isinstance(exc, KeyboardInterrupt):
            cause = DeployError(f"{conn.host}: interrupted after the swap to {release}")
        reporter.warn(f"{cause.message}; rolling back to {previous}")
        _undo(conn, cfg, previous, cause, reporter)
        hr.rolled_back = True
        raise DeployError(
            f"{cause.message}; rolled back to {previous}",
            hint=cause.hint or "the previous model is live again",
        ) from None


def _undo(
    conn: Connection, cfg: DeployConfig, previous: str | None, cause: FtctlError, reporter
) -> None:
    if previous is None:
        raise RollbackFailed(
            f"{cause.message}; and there is no previous release to roll back to",
            hint="the service may be down: look at the server now",
        )
    try:
        _reopen_if_dead(conn)
        swap(conn, cfg, previous)
        restart(conn, cfg)
        wait_healthy(conn, cfg, release_tag(previous), reporter)
    except FtctlError as exc:
        raise RollbackFailed(
            f"{cause.message}; rollback to {previous} failed too: {exc.message}",
            hint="the service may be down: look at the server now",
        ) from None


def _reopen_if_dead(conn: Connection) -> None:
    if not conn.is_connected:
        _reopen(conn)


def deploy_host(
    conn: Connection,
    cfg: DeployConfig,
    model: LocalModel,
    *,
    dry_run: bool = False,
    reporter: Reporter = NULL,
    hooks: Hooks | None = None,
    hr: HostResult | None = None,
) -> HostResult:
    """Deploy ``model`` to one server. Raises DeployError (live model good) or RollbackFailed.

    ``hr`` (filled in as the steps go) lets a caller keep the partial record of a failure."""
    started = time.monotonic()
    hr = hr or HostResult(host="", action="deploy")
    hr.host, hr.dry_run = f"{conn.user}@{conn.host}:{conn.port}", dry_run
    reporter.stage(f"{conn.host}: preflight")
    st = probe(conn, cfg)
    check_tools(conn, st)
    existing = [r for r in st.releases if release_tag(r) == model.sha8]
    need = 0 if existing else int(model.total_bytes * cfg.min_free_factor)
    hr.plan = _plan_lines(cfg, st, model, existing)
    if dry_run:
        hr.ok = True
        return hr
    if st.free_bytes < need:
        raise DeployError(
            f"{conn.host}: {st.free_bytes / 1e6:.0f} MB free in {cfg.remote_dir}, need "
            f"{need / 1e6:.0f} MB ({cfg.min_free_factor:g}x the model's "
            f"{model.total_bytes / 1e6:.0f} MB)",
            hint="free space on the server (old releases: lower keep_releases) and rerun",
        )
    with remote_lock(conn, cfg, "deploy"):
        try:
            st = probe(conn, cfg)  # again, now that nobody else can change it
            check_link(conn, cfg, st)
            clean_incoming(conn, cfg, st)
            hr.backup = backup_original(conn, cfg, st)
            hr.previous = st.live
            release = find_release(conn, cfg, st, model)
            hr.reused = release is not None
            if release is None:
                release = _upload_release(conn, cfg, model, hr, reporter, hooks)
                st.releases = sorted([*st.releases, release], key=release_key)
            hr.release = release
            if release == st.live:
                reporter.info(f"{conn.host}: {release} is already live; nothing to do")
            else:
                _go_live(conn, cfg, release, st.live, hr, reporter)
                st.live = release
            hr.pruned = prune(conn, cfg, st)
            hr.ok = True
        except FtctlError as exc:
            hr.error = exc.to_dict()
            raise
        finally:
            hr.seconds = time.monotonic() - started
            _reopen_if_dead(conn)
            append_log(conn, cfg, _log_entry(conn, hr, model.digest))
    return hr


def _upload_release(conn, cfg, model: LocalModel, hr: HostResult, reporter, hooks) -> str:
    name = f"{utc_stamp()}-{model.sha8}"
    incoming = f"{cfg.remote_dir}/.incoming-{uuid.uuid4().hex[:12]}"
    reporter.stage(f"{conn.host}: upload {model.total_bytes / 1e6:.1f} MB")
    try:
        hr.uploaded_bytes = upload(conn, cfg, model, incoming, reporter, hooks)
        hr.uploaded_files = len(model.expected)
        if hooks and hooks.after_upload:
            hooks.after_upload(conn, incoming)
        reporter.stage(f"{conn.host}: verify sha256 of {len(model.expected)} files")
        bad = bad_files(conn, cfg, incoming, model.expected)
        if bad:
            raise DeployError(
                f"{conn.host}: uploaded files do not match their sha256: {', '.join(bad)}",
                hint="the upload was corrupted and discarded; the live model is untouched. "
                "Rerun; if it repeats, check the server's disk and network",
            )
        run(
            conn,
            f"mkdir -p {q(cfg.remote_dir)}/releases && mv -T {q(incoming)} "
            f"{q(cfg.remote_dir)}/releases/{name}",
            cfg,
            what="rename into releases/",
        )
    except FtctlError:
        _reopen_if_dead(conn)
        with contextlib.suppress(FtctlError):
            run(conn, f"rm -rf -- {q(incoming)}", cfg, what="discard the upload")
        raise
    return name


def _plan_lines(cfg, st: RemoteState, model: LocalModel, existing: list[str]) -> list[str]:
    lines = []
    if st.link == "dir":
        lines.append(f"back up the real {cfg.link_name}/ to releases/<ts>-original/")
    elif st.link == "other":
        lines.append(f"REFUSE: {cfg.link_name} is neither a link nor a directory")
    if existing:
        lines.append(f"reuse release {existing[-1]} (verify sha256; upload nothing)")
    else:
        lines.append(
            f"upload {len(model.expected)} files, {model.total_bytes} bytes into "
            f".incoming-<id>/, verify sha256, rename to releases/<ts>-{model.sha8}"
        )
    lines.append(f"swap {cfg.link_name} -> releases/<that release> (was: {st.live or st.link})")
    lines.append(f"run: {cfg.reload_cmd or cfg.restart_cmd}")
    lines.append(
        f"health: {cfg.health_cmd or cfg.health_url or 'none configured'}"
        + (f"; smoke: {len(cfg.smoke)} cases" if cfg.smoke else "")
    )
    lines.append(f"on failure: swap back to {st.live or 'the backup'} and restart")
    lines.append(f"keep {cfg.keep_releases} releases (never the live one or the one before it)")
    if st.lock:
        lines.append(f"NOTE: lock held by {describe_lock(st.lock)[0]}")
    return lines


ConnectFn = Callable[[Any], "Connection"]


def deploy(
    model_dir: str | Path,
    cfg: DeployConfig,
    hosts: list,
    connect: ConnectFn,
    *,
    dry_run: bool = False,
    reporter: Reporter = NULL,
    hooks: Hooks | None = None,
) -> DeployResult:
    """Deploy to each host in turn; stop at the first failure (recorded in the result)."""
    model = load_local_model(model_dir, reporter)
    result = DeployResult("deploy", str(model.path), model.digest)
    for spec in hosts:
        hr = HostResult(host=str(spec), action="deploy", dry_run=dry_run)
        result.hosts.append(hr)
        try:
            conn = connect(spec)
            try:
                deploy_host(
                    conn, cfg, model, dry_run=dry_run, reporter=reporter, hooks=hooks, hr=hr
                )
            finally:
                conn.close()
        except FtctlError as exc:
            hr.error = exc.to_dict()
            result.error = exc
            break
    return result


# --------------------------------------------------------------------------- rollback


def rollback_host(
    conn: Connection,
    cfg: DeployConfig,
    to: str | None = None,
    *,
    dry_run: bool = False,
    reporter: Reporter = NULL,
    hr: HostResult | None = None,
) -> HostResult:
    """Point the link back at ``to`` (default: the release before the live one)."""
    started = time.monotonic()
    hr = hr or HostResult(host="", action="rollback")
    hr.host, hr.dry_run = f"{conn.user}@{conn.host}:{conn.port}", dry_run
    st = probe(conn, cfg)
    check_tools(conn, st)
    target = _rollback_target(conn, st, to)
    hr.release, hr.previous = target, st.live
    hr.plan = [
        f"swap {cfg.link_name} -> releases/{target} (was: {st.live})",
        f"run: {cfg.reload_cmd or cfg.restart_cmd}",
        f"health: {cfg.health_cmd or cfg.health_url or 'none configured'}",
        f"on failure: swap back to {st.live}",
    ]
    if dry_run or target == st.live:
        hr.ok = True
        return hr
    with remote_lock(conn, cfg, "rollback"):
        try:
            st = probe(conn, cfg)
            hr.previous = st.live
            _go_live(conn, cfg, target, st.live, hr, reporter)
            hr.ok = True
        except FtctlError as exc:
            hr.error = exc.to_dict()
            raise
        finally:
            hr.seconds = time.monotonic() - started
            append_log(conn, cfg, _log_entry(conn, hr, release_tag(target)))
    return hr


def _rollback_target(conn: Connection, st: RemoteState, to: str | None) -> str:
    if st.link != "link" or st.live is None:
        raise DeployError(
            f"{conn.host}: nothing to roll back: the link is {st.link}",
            hint="deploy at least once with `ftctl deploy` first",
        )
    if to is not None:
        matches = [r for r in st.releases if r == to or r.endswith(f"-{to}")]
        if not matches:
            raise DeployError(
                f"{conn.host}: no release '{to}' (have: {', '.join(st.releases)})",
                hint="see `ftctl releases`",
            )
        return matches[-1]
    prev = st.previous()
    if prev is None:
        raise DeployError(
            f"{conn.host}: no release older than the live one ({st.live})",
            hint="name one with --to RELEASE (see `ftctl releases`)",
        )
    return prev


def rollback(
    cfg: DeployConfig,
    hosts: list,
    connect: ConnectFn,
    *,
    to: str | None = None,
    dry_run: bool = False,
    reporter: Reporter = NULL,
) -> DeployResult:
    result = DeployResult("rollback", None, None)
    for spec in hosts:
        hr = HostResult(host=str(spec), action="rollback", dry_run=dry_run)
        result.hosts.append(hr)
        try:
            conn = connect(spec)
            try:
                rollback_host(conn, cfg, to, dry_run=dry_run, reporter=reporter, hr=hr)
            finally:
                conn.close()
        except FtctlError as exc:
            hr.error = exc.to_dict()
            result.error = exc
            break
    return result


# --------------------------------------------------------------------------- releases


_MARK = "=====ftctl-release"


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


def list_releases(conn: Connection, cfg: DeployConfig) -> list[dict]:
    """Every release on the server, oldest first, with what its manifest / eval report say."""
    st = probe(conn, cfg)
    d = q(cfg.remote_dir)
    script = (
        f'cd {d} 2>/dev/null || exit 0; for r in releases/*/; do [ -d "$r" ] || continue; '
        f'for f in {MANIFEST} {EVAL_REPORT}; do echo "{_MARK} $(basename "$r") $f"; '
        f'cat "$r$f" 2>/dev/null; echo; done; done'
    )
    out = run(conn, script, cfg, what="read manifests").stdout
    blobs: dict[tuple[str, str], str] = {}
    key = None
    for line in out.splitlines():
        if line.startswith(_MARK):
            _, rel, fname = line.split(" ", 2)
            key = (rel, fname)
            blobs[key] = ""
        elif key:
            blobs[key] += line + "\n"
    prev = st.previous()
    rows = []
    for name in st.releases:
        row: dict[str, Any] = {
            "name": name,
            "time": release_time(name),
            "sha8": release_tag(name),
            "live": name == st.live,
            "previous": name == prev,
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
