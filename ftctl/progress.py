"""How the core reports progress without printing: a Reporter passed in by the caller.

The CLI passes a rich-based reporter (progress bars on stderr); tests and library callers pass
nothing and get :data:`NULL`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[..., None]  # advance(n=1, **fields): move a bar, update its fields (loss=...)


class Reporter(Protocol):
    def stage(self, name: str) -> None:
        """A new step begins (printed as a heading)."""

    def info(self, message: str) -> None:
        """Something the user should see, not a problem."""

    def warn(self, message: str) -> None:
        """Something that may be a problem; the command goes on."""

    def task(
        self, description: str, total: int | None, unit: str = "it"
    ) -> contextlib.AbstractContextManager[Advance]:
        """A progress bar for ``total`` units of work; yields ``advance``."""


class NullReporter:
    """Reports nothing; keeps warnings for callers that want them."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def stage(self, name: str) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, unit: str = "it") -> Iterator[Advance]:
        yield lambda n=1, **fields: None


NULL = NullReporter()
