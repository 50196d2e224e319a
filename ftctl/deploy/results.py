"""What a deploy, rollback or revert did, per host and for the whole fleet (``--json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ftctl.deploy.server.shared import SETTLED, UNCHECKED
from ftctl.errors import FtctlError

# Where each host ends (``HostResult.state``); a fleet deploy reports every host's.
HOST_STATES = {
    "untouched": "this deploy did not change what the host serves (never went live there)",
    "switched": "the new release is live and passed its checks",
    "rolled_back": "its go-live failed and the server put the previous release back",
    "reverted": "it went live, then was put back because another host or a canary failed",
    "unknown": "the link dropped during its go-live and it could not be reached again: it "
    "serves the new release or the previous one (`ftctl status` tells)",
    "failed": "neither the new release nor the previous one is known to be live and checked",
}
# States in which the host may serve the new model (what a revert has to undo).
MAY_SERVE_NEW = ("switched", "unknown")


@dataclass
class HostResult:
    host: str
    action: str  # deploy | rollback | revert
    ok: bool = False
    dry_run: bool = False
    state: str = "untouched"  # one of HOST_STATES
    release: str | None = None
    previous: str | None = None
    backup: str | None = None
    method: str | None = None  # rsync | sftp | reuse | live; what was used, joined by "+"
    # (e.g. tensor-delta+rsync) once files were sent
    expected_bytes: int = 0  # the plan's estimate of file data on the wire
    uploaded_files: int = 0
    uploaded_bytes: int = 0  # file data sent (rsync: literal data)
    wire_bytes: int = 0  # everything the transfer sent
    linked_files: int = 0  # unchanged files hard-linked on the server
    # per method used: {"tensor-delta": {"files", "bytes", "seconds", "encode_cpu_s"},
    # "rsync": {"files", "bytes", "seconds"}, ...}; bytes as in uploaded_bytes
    methods: dict[str, dict] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # file -> why its delta failed
    timings: dict[str, float] = field(default_factory=dict)  # seconds per client-side step
    golive_steps: list[dict] = field(default_factory=list)  # the server's: {"step", "t"}
    reused: bool = False
    rolled_back: bool = False
    canary: bool = False
    pruned: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    smoke: list[dict] = field(default_factory=list)
    health: str | None = None  # healthy | settled (no health URL) | unchecked | None
    python: str | None = None  # the server's remote_python: path, version
    recovered: dict | None = None  # what was finished of a job that died under the lock
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CanaryWatch:
    """What the canary wait watched and how it ended."""

    hosts: list[str]
    seconds: float  # how long the canaries were to be watched
    watched: str  # what was polled (or why nothing could be)
    polls: int = 0  # checks made, all canaries together
    failure: str | None = None  # the first failed check

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeployResult:
    action: str
    model: str | None
    sha256: str | None
    id: str | None = None  # one deploy id across the fleet (also in each deploys.log line)
    hosts: list[HostResult] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # the fleet's order (--dry-run)
    canary: CanaryWatch | None = None
    error: FtctlError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def health(self) -> str | None:
        """The weakest check any host's new model got: "unchecked" (nothing looked at it),
        then "settled (no health URL)" (only the unit was watched), then the common value."""
        values = {h.health for h in self.hosts if h.ok and not h.dry_run}
        for weak in (UNCHECKED, SETTLED):
            if weak in values:
                return weak
        return values.pop() if len(values) == 1 else None

    @property
    def states(self) -> dict[str, str]:
        """Each host's state (``HOST_STATES``), by host."""
        return {h.host: h.state for h in self.hosts}

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "action": self.action,
            "id": self.id,
            "model": self.model,
            "sha256": self.sha256,
            "health": self.health,
            "states": self.states,
            "canary": self.canary.to_dict() if self.canary else None,
            "plan": self.plan,
            "hosts": [h.to_dict() for h in self.hosts],
            "error": self.error.to_dict() if self.error else None,
        }

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error
