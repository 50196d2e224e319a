"""What a deploy will do on one server, decided before anything changes (``--dry-run`` prints it).

The server answers one probe (link, releases with the sha256 and size of each file, lock,
tools, sampled blocks of the files a new model would replace). From it: reuse a release that
has this exact content; else, per file, hard-link it from a release that has it, send a
safetensors file as a **tensor delta** against a server copy this machine also holds
(:mod:`ftctl.deploy.tensordelta`), send the difference against the live file (rsync, when
sampled blocks match at the same offsets), or send it whole; and how many bytes that should
put on the wire (``--dry-run`` counts a tensor delta's exactly, by encoding it into a counter).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ftctl.deploy import tensordelta as td
from ftctl.deploy.local import LocalModel
from ftctl.deploy.server.shared import release_key, release_tag, sample_hashes
from ftctl.errors import DeployError

if TYPE_CHECKING:
    from ftctl.config import DeployConfig

TOOLS = ("cp", "rm")  # the server program runs them (the backup, a discarded upload)
SAMPLES = 32  # blocks compared per file to choose delta or whole
SAMPLE_MIN_BYTES = 1 << 20  # smaller files are sent whole
MIN_SIMILAR = 0.05  # share of equal sampled blocks from which a delta pays


@dataclass
class RemoteState:
    """What is on the server now (the probe's answer)."""

    link: str  # "link" | "dir" | "missing" | "other"
    live: str | None  # release name the link points at
    releases: list[str]
    lock: dict | None = None
    free_bytes: int = 0
    missing_tools: list[str] = field(default_factory=list)
    has_rsync: bool = False
    index: dict[str, dict[str, list]] = field(default_factory=dict)  # release -> rel -> [sha, size]
    final_index: dict[str, list] = field(default_factory=dict)  # a real final/ dir's manifest
    # release -> rel -> [sha, size] as its manifest.json says (unverified: tensor delta bases)
    claims: dict[str, dict[str, list]] = field(default_factory=dict)
    previous: str | None = None  # the release live before the live one (from ``log``)
    log: list[dict] = field(default_factory=list)  # deploys.log, newest last (compact)
    samples: dict[str, dict] = field(default_factory=dict)
    python: dict | None = None  # {"path", "version"} of remote_python
    pending: bool = False  # a job that died under the lock (its journal); finished next

    @classmethod
    def from_probe(cls, d: dict) -> RemoteState:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def probe_request(cfg: DeployConfig, model: LocalModel | None) -> dict:
    sample = {}
    if model is not None:
        sample = {r: s for r, s in model.sizes.items() if s >= SAMPLE_MIN_BYTES}
    return {
        "remote_dir": cfg.remote_dir,
        "link": cfg.link_name,
        "tools": list(TOOLS),
        "sample": sample,
        "sample_count": SAMPLES,
    }


def local_samples(model: LocalModel, rel: str) -> list[str]:
    return sample_hashes(str(model.path / rel), model.sizes[rel], SAMPLES)


TENSOR_DELTA = td.TENSOR_DELTA


@dataclass
class FileStep:
    rel: str
    size: int
    action: str  # "link" (hard link, nothing sent) | "tensor-delta" | "delta" (rsync) | "send"
    source: str | None = None  # link source / delta basis, relative to remote_dir
    expect: int = 0  # bytes of file data expected on the wire
    similar: float | None = None  # share of sampled blocks equal to the basis
    sha: str = ""  # what the file must hash to
    local_basis: str | None = None  # tensor delta: this machine's copy of ``source``
    basis_sha: str | None = None  # ... and its sha256 (checked again while encoding)
    exact: bool = False  # ``expect`` was counted by encoding (--dry-run), not estimated
    note: str = ""  # why the tensor delta was (or was not) chosen for this file


@dataclass
class Plan:
    method: str  # "reuse" | "live" (already serving it) | "rsync" | "sftp"
    why: str
    reuse: str | None = None
    steps: list[FileStep] = field(default_factory=list)

    @property
    def expected_bytes(self) -> int:
        return sum(s.expect for s in self.steps)

    @property
    def links(self) -> dict[str, str]:
        return {s.rel: s.source for s in self.steps if s.action == "link" and s.source}

    @property
    def shas(self) -> dict[str, str]:
        return {s.rel: s.sha for s in self.steps}

    @property
    def bases(self) -> dict[str, str]:
        """What the server links into the upload as rsync's basis: a delta's, and a tensor
        delta's (so that a file whose tensor delta fails goes as an rsync delta)."""
        kinds = ("delta", TENSOR_DELTA)
        return {s.rel: s.source for s in self.steps if s.action in kinds and s.source}

    @property
    def to_send(self) -> list[str]:
        return [s.rel for s in self.steps if s.action in ("delta", "send", TENSOR_DELTA)]

    @property
    def tensor_deltas(self) -> list[FileStep]:
        return [s for s in self.steps if s.action == TENSOR_DELTA]

    def step(self, rel: str) -> FileStep:
        return next(s for s in self.steps if s.rel == rel)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "why": self.why,
            "reuse": self.reuse,
            "expected_bytes": self.expected_bytes,
            "files": [s.__dict__ for s in self.steps],
        }


def choose_method(cfg: DeployConfig, st: RemoteState, local_conn: bool) -> tuple[str, str]:
    """("rsync" | "sftp", why): how the files that go neither as a link nor as a tensor delta
    travel."""
    missing = []
    if local_conn:
        missing.append("a local target (no SSH)")
    for tool in ("rsync", "ssh"):
        if shutil.which(tool) is None:
            missing.append(f"no {tool} here")
    if not st.has_rsync:
        missing.append("no rsync on the server")
    if cfg.transfer == "sftp":
        return "sftp", "transfer = sftp (configured)"
    if not missing:
        return "rsync", "rsync over OpenSSH on both ends"
    if cfg.transfer == "rsync":
        raise DeployError(
            f"transfer = rsync, but: {', '.join(missing)}",
            hint="install rsync on both ends (apt-get install rsync) or use --transfer auto",
        )
    return "sftp", f"SFTP fallback ({', '.join(missing)})"


def _sources(st: RemoteState, claims: bool = False) -> list[tuple[str, dict[str, list]]]:
    """Where unchanged files can be linked from: the live release first, then newest first.
    ``claims``: also the files of which only a manifest names the sha256 (good enough for a
    tensor delta's basis, which the server checks range by range; never for a link)."""
    out = []
    if st.link == "dir":
        out.append(("final", st.final_index))
    newest_first = sorted(st.releases, key=release_key, reverse=True)
    order = sorted(newest_first, key=lambda r: r != st.live)  # stable: live, then newest
    for r in order:
        known = {**st.claims.get(r, {}), **st.index.get(r, {})} if claims else st.index.get(r, {})
        out.append((f"releases/{r}", known))
    return out


def _by_content(sources: list[tuple[str, dict[str, list]]]) -> dict[tuple[str, int], str]:
    """{(sha256, size): path relative to remote_dir}; the first source that has it wins."""
    out: dict[tuple[str, int], str] = {}
    for prefix, index in reversed(sources):  # the live release wins (written last)
        for rel, (sha, size) in index.items():
            out[(sha, size)] = f"{prefix}/{rel}"
    return out


def make_plan(
    model: LocalModel,
    st: RemoteState,
    cfg: DeployConfig,
    local_conn: bool,
    *,
    count: bool = False,
    digests: td.Digests | None = None,
) -> Plan:
    """The plan for ``model`` on a server in state ``st``. ``count``: encode each tensor delta
    into a counter for its exact size (--dry-run; ~1 CPU-s per 400 MB), instead of estimating.
    ``digests``: local files' sha256 (some begun ahead, see :func:`prehash`)."""
    if st.live and release_tag(st.live) == model.sha8 and _same(st.index.get(st.live), model):
        return Plan("live", f"{st.live} is already live")
    for name in sorted(st.releases, reverse=True):
        if release_tag(name) == model.sha8 and _same(st.index.get(name), model):
            return Plan("reuse", f"{name} on the server has this exact content", reuse=name)
    method, why = choose_method(cfg, st, local_conn)
    by_content = _by_content(_sources(st))
    bases = _by_content(_sources(st, claims=True))
    basis_dir = "final" if st.link in ("dir", "link") and (st.live or st.link == "dir") else None
    plan = Plan(method, why)
    for rel in sorted(model.expected):
        size, sha = model.sizes[rel], model.expected[rel]
        src = by_content.get((sha, size))
        if src is not None:
            plan.steps.append(FileStep(rel, size, "link", src, sha=sha))
            continue
        step = FileStep(rel, size, "send", expect=size, sha=sha)
        remote = st.samples.get(rel)
        if method == "rsync" and basis_dir and remote:
            mine = local_samples(model, rel)
            equal = sum(a == b for a, b in zip(mine, remote["hashes"], strict=False))
            step.similar = equal / len(mine)
            if step.similar >= MIN_SIMILAR:
                step.action, step.source = "delta", f"{basis_dir}/{rel}"
                step.expect = math.ceil((1 - step.similar) * size)
        if cfg.transfer == "auto" and rel.endswith(".safetensors"):
            _tensor_delta(step, model, bases, count, digests or td.Digests())
        plan.steps.append(step)
    return plan


def prehash(cfg: DeployConfig, model: LocalModel) -> td.Digests:
    """Begin hashing, in a thread, the local file a tensor delta would most likely use (the
    weights of the base model the manifest names), while the deploy connects and probes."""
    digests = td.Digests()
    base = td.base_weights(model.path)
    if cfg.transfer == "auto" and base is not None and base.is_file():
        digests.start(base)
    return digests


def _tensor_delta(step: FileStep, model: LocalModel, bases: dict, count: bool,
                  digests: td.Digests) -> None:  # fmt: skip
    """Make ``step`` a tensor delta when this machine holds a copy (sha256 checked now) of a
    safetensors file on the server with the same tensor names, shapes and dtypes; else say
    why not in ``step.note`` (the file goes as planned: rsync, then SFTP)."""
    server = {sha: size for (sha, size), src in bases.items() if src.endswith(".safetensors")}
    basis = td.find_local_basis(model.path, server, rel=step.rel, digest=digests)
    method, why = td.choose(model.path / step.rel, basis)
    if method is None or basis is None:
        step.note = f"no tensor delta: {why}"
        return
    step.note = why
    step.action, step.source = TENSOR_DELTA, bases[(basis.sha256, server[basis.sha256])]
    step.local_basis, step.basis_sha = str(basis.path), basis.sha256
    if count:
        sha = model.expected[step.rel]
        stats = td.encode(model.path / step.rel, basis.path, td.CountingSink(), new_sha256=sha)
        step.expect, step.exact = stats.delta_bytes, True


def _same(index: dict | None, model: LocalModel) -> bool:
    if not index:
        return False
    return all(
        rel in index and index[rel][0] == sha and index[rel][1] == model.sizes[rel]
        for rel, sha in model.expected.items()
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _tensor_delta_rule(cfg: DeployConfig) -> str:
    if cfg.transfer == "auto":
        return "; safetensors files as a tensor delta where one applies"
    return f"; no tensor delta (transfer = {cfg.transfer})"


def file_line(plan: Plan, s: FileStep) -> str:
    """One sent file: how it goes, and the bytes expected (--dry-run prints one per file)."""
    of = f"of {_mb(s.size)}"
    if s.action == TENSOR_DELTA:
        size = f"{_mb(s.expect)} {of} (counted)" if s.exact else f"at most ~{_mb(s.expect)} {of}"
        return f"{s.rel}: tensor delta against {s.source}, {s.note}: {size}"
    why_not = f" [{s.note}]" if s.note else ""
    if s.action == "delta":
        return (
            f"{s.rel}: rsync delta against {s.source}, {s.similar:.0%} of sampled blocks equal: "
            f"~{_mb(s.expect)} {of}{why_not}"
        )
    return f"{s.rel}: {plan.method}, whole: {_mb(s.size)}{why_not}"


def python_text(cfg: DeployConfig, python: dict | None) -> str:
    """'/usr/bin/python3 3.6.15 (remote_python = python3)'."""
    if not python:
        return f"remote_python = {cfg.remote_python}"
    return f"{python.get('path')} {python.get('version')} (remote_python = {cfg.remote_python})"


def plan_lines(cfg: DeployConfig, st: RemoteState, model: LocalModel, plan: Plan) -> list[str]:
    lines = [f"server python: {python_text(cfg, st.python)}"]
    if st.pending:
        lines.append(
            "first: finish the job a process that died left under the lock (its journal "
            "on the server): put back the last checked release, or complete the backup"
        )
    if st.link == "dir":
        lines.append(f"back up the real {cfg.link_name}/ to releases/<ts>-original/ (hard links)")
    elif st.link == "other":
        lines.append(f"REFUSE: {cfg.link_name} is neither a link nor a directory")
    if plan.method == "live":
        return [*lines, f"nothing to do: {plan.why}"]
    if plan.method == "reuse":
        lines.append(f"reuse release {plan.reuse} ({plan.why}); send nothing")
    else:
        linked = [s for s in plan.steps if s.action == "link"]
        lines.append(f"transfer: {plan.method} ({plan.why})" + _tensor_delta_rule(cfg))
        if linked:
            lines.append(
                f"hard-link {len(linked)} unchanged files ({_mb(sum(s.size for s in linked))}) "
                f"from the releases on the server: {', '.join(s.rel for s in linked)}"
            )
        lines += [file_line(plan, s) for s in plan.steps if s.action != "link"]
        lines.append(
            f"expect ~{_mb(plan.expected_bytes)} of file data on the wire "
            f"(the model is {_mb(model.total_bytes)}); the server hashes each received file once"
        )
        lines.append(f"rename into releases/<ts>-{model.sha8} once every sha256 matches")
    lines.append(
        f"go live on the server (detached): fsync, swap {cfg.link_name} -> that release "
        f"(was: {st.live or st.link}), run: {cfg.reload_cmd or cfg.restart_cmd}"
    )
    lines.append(
        f"health: {health_text(cfg)}" + (f"; smoke: {len(cfg.smoke)} cases" if cfg.smoke else "")
    )
    lines.append(f"on failure: swap back to {st.live or 'the backup'} and restart")
    lines.append(
        f"keep {cfg.keep_releases} releases (never the live one, the previous one or *-original)"
    )
    if st.lock:
        from ftctl.deploy.session import describe_lock

        lines.append(f"NOTE: the lock is held by {describe_lock(st.lock)}")
    return lines


def health_text(cfg: DeployConfig) -> str:
    if cfg.health_cmd or cfg.health_url:
        return str(cfg.health_cmd or cfg.health_url)
    return (
        "no health URL: after `systemctl restart X` the unit is watched for "
        f"{cfg.health_settle:g}s (same MainPID, no restart, still active) -> health "
        "'settled (no health URL)'; after any other command only its exit status -> "
        "'unchecked'" + (" (refused: require_health)" if cfg.require_health else "")
    )
