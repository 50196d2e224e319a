"""UTC timestamps as ftctl writes them: ISO 8601 to the second, with ``Z``.

One format for what the client and the service write (manifests, eval reports, the service's
log lines, /health, the prediction log). The server program writes deploys.log and its status
file with its own builder (``+00:00``, :func:`ftctl.deploy.server.shared.now_iso`: it imports
nothing from the client); the deploy client uses that one for what it writes beside them.
"""

from __future__ import annotations

import time


def utc_iso(t: float | None = None) -> str:
    """``t`` (seconds since the epoch; default: now) as ``2026-12-01T08:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def utc_file_stamp(t: float | None = None) -> str:
    """``t`` (default: now) for a file name: ``20261201-080000``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(t))


def utc_iso_ms(t: float) -> str:
    """``t`` to the millisecond: ``2026-12-01T08:00:00.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
