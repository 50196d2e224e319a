"""`ftctl serve` with a fault put into it, for tests/integration/test_serve.py:

    python serve_faults.py FAULT serve --model-path ... (the rest as for `ftctl`)

- ``batch-bug``: a batch holding the text "BOOM" raises RuntimeError outside the model's own
  code (a bug of ours): that request must get a JSON 500, and serving go on.
- ``thread-death``: a batch holding the text "DIE" ends the model thread with a BaseException
  nothing catches: /health must turn 503 and the process exit non-zero.

The patches go into the real classes before the CLI runs; nothing else differs from `ftctl`.
"""

from __future__ import annotations

import sys

from ftctl.serve.batching import Batcher


class Injected(BaseException):
    """What no `except Exception` catches."""


def _patch(trigger: str, make) -> None:
    real = Batcher.run_batch

    def run_batch(self, items):
        if any(trigger in item.texts for item in items):
            raise make()
        return real(self, items)

    Batcher.run_batch = run_batch


FAULTS = {
    "batch-bug": lambda: _patch("BOOM", lambda: RuntimeError("injected: a bug in a batch")),
    "thread-death": lambda: _patch("DIE", lambda: Injected("injected: the thread dies")),
}

if __name__ == "__main__":
    FAULTS[sys.argv.pop(1)]()
    sys.argv[0] = "ftctl"
    from ftctl.cli.main import main

    main()
