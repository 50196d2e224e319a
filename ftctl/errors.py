"""One exception tree. Only the CLI edge turns these into a message, a hint and an exit code."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes (README, "Exit codes"). CI may rely on them."""

    OK = 0
    ERROR = 1  # any other ftctl error
    USAGE = 2  # bad flags or config values (also click's own usage errors)
    DATA = 3  # data files with errors (validate, generate, train, eval inputs)
    GATE = 4  # eval gate: the candidate regresses
    DEPLOY = 5  # deploy failed; the server was left on (or rolled back to) a good model
    ROLLBACK_FAILED = 6  # deploy failed AND rollback failed: a human must look now
    ENVIRONMENT = 7  # a prerequisite is missing or unreachable (Docker engine, SSH host, GPU)
    INTERRUPTED = 130  # Ctrl-C
    TERMINATED = 143  # SIGTERM (a `--docker` run stops and removes its container first)


@dataclass(frozen=True)
class Problem:
    """One problem found in an input, located precisely (file:line, field)."""

    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None
    severity: str = "error"  # "error" | "warning"

    @property
    def location(self) -> str:
        loc = self.file or ""
        if self.line is not None:
            loc = f"{loc}:{self.line}"
        if self.field:
            loc = f"{loc} [{self.field}]" if loc else f"[{self.field}]"
        return loc

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message

    def to_dict(self) -> dict:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "message": self.message,
        }


class FtctlError(Exception):
    """Base of every error ftctl raises on purpose.

    ``message`` says what went wrong, ``hint`` what to do about it.
    """

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(
        self, message: str, *, hint: str | None = None, problems: list[Problem] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems: list[Problem] = list(problems or [])

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": int(self.exit_code),
            "problems": [p.to_dict() for p in self.problems],
        }


class ConfigError(FtctlError):
    """ftctl.toml or flags are invalid (all problems collected into one error)."""

    exit_code = ExitCode.USAGE


class DataError(FtctlError):
    """A data file is missing, unreadable or has invalid rows."""

    exit_code = ExitCode.DATA


class ModelError(FtctlError):
    """A model directory is missing, incomplete or of an unsupported kind."""


class TrainError(FtctlError):
    """Training could not run or could not finish."""


class OutOfMemory(TrainError):
    """The GPU ran out of memory (CUDA out-of-memory) while training. ``batch_size`` and
    ``grad_accum`` are the run's (None when it happened outside a step); the CLI names the
    exact command to run instead."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        batch_size: int | None = None,
        grad_accum: int = 1,
    ) -> None:
        super().__init__(
            message,
            hint=hint
            or "the seed's answer (GPU 内存不足): a smaller --batch-size (e.g. 4), or more "
            "--freeze-layers; with a GPU-resident prefix cache, a smaller --cache-budget",
        )
        self.batch_size = batch_size
        self.grad_accum = grad_accum

    @classmethod
    def at_step(
        cls, where: str, *, batch: int, step: int, batch_size: int, grad_accum: int
    ) -> OutOfMemory:
        smaller, accum = max(1, batch_size // 2), grad_accum * 2
        rows = f"{batch_size} x {grad_accum} accumulated" if grad_accum > 1 else str(batch_size)
        return cls(
            f"GPU 内存不足 (CUDA out of memory) at optimizer step {step} ({where}, batch "
            f"{batch}) with --batch-size {batch_size} (rows per step: {rows})",
            hint=(
                f"the seed's answer: a smaller --batch-size, or more --freeze-layers. To keep "
                f"the effective batch of {batch_size * grad_accum}, run the same command with "
                f"--batch-size {smaller} --grad-accum {accum}"
            ),
            batch_size=batch_size,
            grad_accum=grad_accum,
        )


class EvalError(FtctlError):
    """Evaluation could not run."""


class GateFailed(FtctlError):
    """The candidate regresses against the baseline."""

    exit_code = ExitCode.GATE


class EnvironmentProblem(FtctlError):
    """A prerequisite (Docker engine, SSH host, GPU, tool) is missing or unreachable."""

    exit_code = ExitCode.ENVIRONMENT


class ImageError(FtctlError):
    """Building or running the training image failed."""


class DeployError(FtctlError):
    """A deploy step failed; the live model is good (untouched or rolled back)."""

    exit_code = ExitCode.DEPLOY


class LockHeld(DeployError):
    """Another deploy holds the remote lock."""


class PromoteRefused(DeployError):
    """Staging holds nothing promote may take (unhealthy, mixed, mid-deploy); production is
    untouched."""


class HostKeyError(EnvironmentProblem):
    """The server's host key is unknown or does not match known_hosts."""


class RollbackFailed(DeployError):
    """A deploy failed and the automatic rollback failed too."""

    exit_code = ExitCode.ROLLBACK_FAILED


class UsageProblem(FtctlError):
    """A usage error found by the command-line parser (click's), in ftctl's error form."""

    exit_code = ExitCode.USAGE


class Interrupted(FtctlError):
    """Ctrl-C: what was running stopped (a training run keeps its checkpoint)."""

    exit_code = ExitCode.INTERRUPTED


class StageFailed(FtctlError):
    """A pipeline stage run as a separate process (e.g. inside the image) exited non-zero; the
    pipeline passes its exit code on."""

    def __init__(self, message: str, exit_code: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code  # type: ignore[assignment]


class Stopped(FtctlError):
    """ftctl got SIGTERM and stopped what it was running (a --docker container) first."""

    exit_code = ExitCode.TERMINATED


class ContainerKilled(ImageError):
    """The command inside the training image was killed (exit 137: the OOM killer or a
    SIGKILL from outside); ftctl exits with the same code."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 137) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code  # type: ignore[assignment]
