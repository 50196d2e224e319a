"""The subcommands the client may call, by name: one-shot (``PYTHON -c boot SHA NAME``, the
request as the frame after the program) or through the lock holder (``call``). Each takes the
request (a dict) and returns (exit status, answer dict).

A new server-side step is a module here (stdlib only, Python 3.6+) and one line below.
Those in ``ONE_SHOT`` read more than the request from stdin (a tensor delta stream): they run
as their own process only, never through the lock holder, whose stdin is the client's messages.
"""

from .golive import cmd_health
from .probe import cmd_log, cmd_probe, cmd_status
from .upload import cmd_prepare, cmd_tdelta, cmd_verify, cmd_watch

COMMANDS = {
    "probe": cmd_probe,
    "status": cmd_status,
    "log": cmd_log,
    "prepare": cmd_prepare,
    "watch": cmd_watch,
    "verify": cmd_verify,
    "health": cmd_health,
    "tdelta": cmd_tdelta,
}
ONE_SHOT = ("tdelta",)
