"""Frames over the server program's stdin and stdout (see :mod:`.shared` for the format)."""

import os
import select
import sys
import threading
import time

from .shared import HEADER_SIZE, MAGIC, Frames, decode, frame, frame_length

TIMEOUT = object()  # what ``recv`` returns when nothing came in time


class Channel:
    """Messages to and from the client. ``send`` may be called from several threads."""

    def __init__(self, rfd=0, wfd=1):
        self.rfd, self.wfd = rfd, wfd
        self.frames = Frames()
        self.pending = []
        self.eof = False
        self.mutex = threading.Lock()

    def send(self, obj):
        data = frame(obj)
        with self.mutex:
            view = memoryview(data)
            while view:
                view = view[os.write(self.wfd, view) :]

    def recv(self, timeout=None):
        """The next message; None at EOF; TIMEOUT when no byte came for ``timeout`` seconds
        (a large message that is still arriving is not a missed heartbeat)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.pending:
            if self.eof:
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.rfd], [], [], wait)
            if not ready:
                return TIMEOUT
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                self.eof = True
                continue
            if deadline is not None:
                deadline = time.monotonic() + timeout
            payloads, noise = self.frames.feed(chunk)
            if noise.strip():
                sys.stderr.write("ftctl: ignored %d bytes that were not a message\n" % len(noise))
            self.pending.extend(payloads)
        return decode(self.pending.pop(0))

    def recv_exact(self):
        """The next message, read from stdin up to its last byte and not one byte further:
        what follows it (a tensor delta stream) stays unread for the command. None at EOF."""
        head = self._read(HEADER_SIZE)
        if head is None:
            return None
        if head[: len(MAGIC)] != MAGIC:
            sys.stderr.write("ftctl: stdin does not start with a message\n")
            return None
        payload = self._read(frame_length(head))
        return None if payload is None else decode(payload)

    def _read(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = os.read(self.rfd, n - len(out))
            if not chunk:
                self.eof = True
                return None
            out.extend(chunk)
        return bytes(out)
