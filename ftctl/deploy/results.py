"""What a deploy, rollback or revert did, per host and for the whole fleet (``--json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ftctl.deploy.server.shared import SETTLED, UNCHECKED
from ftctl.errors import FtctlError


@dataclass
class HostResult:
    host: str
    action: str  # deploy | rollback | revert
    ok: bool = False
    dry_run: bool = False
    release: str | None = None
    previous: str | None = None
    backup: str | None = None
    method: str | None = None  # rsync | sftp | reuse | live
    expected_bytes: int = 0  # the plan's estimate of file data on the wire
    uploaded_files: int = 0
    uploaded_bytes: int = 0  # file data sent (rsync: literal data)
    wire_bytes: int = 0  # everything the transfer sent
    linked_files: int = 0  # unchanged files hard-linked on the server
    reused: bool = False
    rolled_back: bool = False
    reverted: bool = False  # switched, then put back because another host failed
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
class DeployResult:
    action: str
    model: str | None
    sha256: str | None
    id: str | None = None  # one deploy id across the fleet (also in each deploys.log line)
    hosts: list[HostResult] = field(default_factory=list)
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

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "action": self.action,
            "id": self.id,
            "model": self.model,
            "sha256": self.sha256,
            "health": self.health,
            "hosts": [h.to_dict() for h in self.hosts],
            "error": self.error.to_dict() if self.error else None,
        }

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error
