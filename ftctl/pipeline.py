"""Numbered, timed stages (``ftctl pipeline`` and ``ftctl demo``), and the pipeline's runner:
run the stages in order, stop at the first failure, keep its exit code.

The stages themselves (generate, train, gate, deploy) are built by the caller; this module only
sequences, times and records them, so CI gets one JSON document and one exit code. With
``dry_run`` each stage's ``plan`` runs instead of its work: it reads, checks and describes, and
changes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftctl.errors import ExitCode, FtctlError
from ftctl.progress import NULL, Reporter

StageFn = Callable[[], dict[str, Any]]


@dataclass
class StageResult:
    name: str
    status: str  # running | ok | failed | skipped | planned
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return vars(self).copy()


class Stages:
    """Stages announced as ``<label> i/N: name`` and timed; each one's result is recorded,
    failed ones with their error document."""

    def __init__(self, label: str, total: int, reporter: Reporter = NULL) -> None:
        self.label, self.total, self.reporter = label, total, reporter
        self.results: list[StageResult] = []

    @contextlib.contextmanager
    def run(self, name: str, *, done: str = "ok") -> Iterator[StageResult]:
        """Time the block as stage ``name``; an exception marks it failed and goes on up."""
        self.reporter.stage(f"{self.label} {len(self.results) + 1}/{self.total}: {name}")
        rec = StageResult(name, "running")
        self.results.append(rec)
        started = time.perf_counter()
        try:
            yield rec
        except FtctlError as exc:
            rec.status, rec.error = "failed", exc.to_dict()
            raise
        except BaseException:
            rec.status = "failed"
            raise
        else:
            rec.status = done
        finally:
            rec.seconds = round(time.perf_counter() - started, 2)

    def skip(self, name: str) -> None:
        self.results.append(StageResult(name, "skipped"))

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.results]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``run`` does the work, ``plan`` says what it would do (read-only).
    ``run=None``: skipped."""

    name: str
    run: StageFn | None
    plan: StageFn | None = None


@dataclass
class PipelineResult:
    stages: list[StageResult] = field(default_factory=list)
    error: FtctlError | None = None
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        return int(ExitCode.OK) if self.error is None else int(self.error.exit_code)

    def to_dict(self) -> dict[str, Any]:
        failed = next((s.name for s in self.stages if s.status == "failed"), None)
        return {
            "ok": self.error is None,
            "exit_code": self.exit_code,
            "dry_run": self.dry_run,
            "failed_stage": failed,
            "stages": [s.to_dict() for s in self.stages],
        }


def run_stages(
    stages: Sequence[Stage], *, reporter: Reporter = NULL, dry_run: bool = False
) -> PipelineResult:
    """Run each stage (its ``plan`` with ``dry_run``). Stops at the first FtctlError; the
    stages after it are recorded as skipped."""
    timer = Stages("pipeline" + (" (dry run)" if dry_run else ""), len(stages), reporter)
    result = PipelineResult(stages=timer.results, dry_run=dry_run)
    for stage in stages:
        fn = stage.plan if dry_run else stage.run
        if stage.run is None or fn is None or result.error is not None:
            timer.skip(stage.name)
            continue
        try:
            with timer.run(stage.name, done="planned" if dry_run else "ok") as rec:
                rec.detail = fn() or {}
        except FtctlError as exc:
            result.error = exc
    return result
