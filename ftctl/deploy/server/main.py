"""The server program's entry: ``entry(argv, program)``, called by :mod:`.boot` once it has
checked the program's sha256. ``argv`` is the command and its arguments; the request comes as
the next frame on stdin, the answer goes back as a frame on stdout, and every line on stderr
reaches the user."""

import sys

from .channel import Channel


def entry(argv, program):
    if not argv:
        sys.stderr.write("usage: COMMAND (see ftctl/deploy/server/commands.py)\n")
        return 2
    cmd = argv[0]
    chan = Channel()
    if cmd == "run":  # the detached go-live, started by the lock holder
        from .golive import run_detached

        return run_detached(chan, int(argv[1]))
    req = chan.recv_exact()  # what follows the request is the command's (a delta stream)
    if not isinstance(req, dict):
        sys.stderr.write("ftctl: no request came after the program\n")
        return 2
    if cmd == "hold":
        from .holder import hold

        return hold(chan, program, req)
    from .commands import COMMANDS

    if cmd not in COMMANDS:
        sys.stderr.write("ftctl: unknown command %s\n" % cmd)
        return 2
    rc, out = COMMANDS[cmd](req)
    chan.send(out)
    return rc
