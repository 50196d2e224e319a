"""Run named stages in order, stop at the first failure, keep its exit code (``ftctl pipeline``).

The stages themselves (generate, train, gate, deploy) are built by the caller; this module only
sequences, times and records them, so CI gets one JSON document and one exit code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftctl.errors import ExitCode, FtctlError
from ftctl.progress import NULL, Reporter

StageFn = Callable[[], dict[str, Any]]


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


@dataclass
class PipelineResult:
    stages: list[StageResult] = field(default_factory=list)
    error: FtctlError | None = None

    @property
    def exit_code(self) -> int:
        return int(ExitCode.OK) if self.error is None else int(self.error.exit_code)

    def to_dict(self) -> dict[str, Any]:
        failed = next((s.name for s in self.stages if s.status == "failed"), None)
        return {
            "ok": self.error is None,
            "exit_code": self.exit_code,
            "failed_stage": failed,
            "stages": [vars(s) for s in self.stages],
        }


def run_stages(stages: Sequence[tuple[str, StageFn | None]], *, reporter: Reporter = NULL):
    """Run each ``(name, fn)``; ``fn=None`` records the stage as skipped. Stops at the first
    FtctlError; the stages after it are recorded as skipped."""
    result = PipelineResult()
    for i, (name, fn) in enumerate(stages, start=1):
        if fn is None or result.error is not None:
            result.stages.append(StageResult(name, "skipped"))
            continue
        reporter.stage(f"pipeline {i}/{len(stages)}: {name}")
        started = time.perf_counter()
        try:
            detail = fn() or {}
        except FtctlError as exc:
            result.error = exc
            result.stages.append(
                StageResult(
                    name, "failed", round(time.perf_counter() - started, 2), error=exc.to_dict()
                )
            )
            continue
        result.stages.append(
            StageResult(name, "ok", round(time.perf_counter() - started, 2), detail)
        )
    return result
