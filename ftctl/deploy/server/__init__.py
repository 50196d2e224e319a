"""The program that runs ON the server during a deploy: standard library only, Python 3.6-3.13.

The client (``ftctl.deploy``) zips this package in memory and sends it on the SSH session's
stdin every time it runs it; :mod:`.boot` (passed with ``python3 -c``) checks its sha256 and
imports it from memory, so nothing on the server's disk is ever executed (see docs/deploy.md,
"The server program"). :mod:`.main` dispatches the subcommands; the client may import only
:mod:`.shared` (names, release rules, sampled offsets, message framing).

Keep every file here runnable on Python 3.6: no walrus, no ``from __future__ import
annotations``, no dataclasses, no ``X | None`` or ``list[str]`` in annotations, no
``subprocess.run(capture_output=/text=)``, no ``datetime.fromisoformat``. ``.ci/run``
compiles each file with Python 3.6, 3.7 and 3.8, and a unit test runs vermin over them.
"""
