"""Running the app: uvicorn underneath, the listening socket, signals, a draining stop.

- **uvicorn's public API** (:func:`uvicorn_config`): ``uvicorn.Config``/``Server`` with
  ``limit_concurrency``, ``backlog``, ``timeout_keep_alive``, ``timeout_graceful_shutdown``,
  ``h11_max_incomplete_event_size`` and ``sockets=``. :class:`Protocol` (a subclass of its h11
  protocol) adds only three guarantees those settings cannot give, each named in
  docs/serve.md: a timeout on a request's head, an answer never lost to a reset (a graceful,
  lingering close), and a moment on SIGTERM for a connection whose request is on its way.
  uvicorn is pinned exactly, and tests/unit/test_serve_unit.py fails when a hook it overrides
  (or relies on) changes.
- **The socket** is inherited from the service manager when ``LISTEN_FDS`` is set for this
  process (systemd socket activation). Otherwise ftctl binds ``host:port`` itself. Either way
  its protocol is IPPROTO_TCP, so asyncio sets TCP_NODELAY on every accepted connection.
- **Signals** (:class:`StopSignal`, :class:`PendingSignal`): SIGTERM/Ctrl-C while the model
  loads stop at once; once serving, they stop accepting, finish what is in flight, then exit 0.
  A SIGHUP that comes while loading is remembered and acted on once the service is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ftctl.errors import FtctlError

if TYPE_CHECKING:
    from ftctl.config import ServeConfig

SD_LISTEN_FDS_START = 3


# --------------------------------------------------------------------------- the protocol


def _raw_json(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds for a request's head to arrive
    drain_grace: float = 0.5  # on SIGTERM: how long a connection with no request yet may send one
    linger: float = 2.0  # closing mid-request: read and drop what still comes, this long at most


# what the client side of a connection is in when all it sent has been read
_READ_WHOLE = (h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED)


class GracefulTransport:
    """The connection's transport as uvicorn sees it: ``close()`` never throws the answer
    away. Closing a TCP socket with unread input makes the kernel send a reset, and a reset
    can destroy the answer before the client reads it (or fail a client still sending its
    body). So when input may be left (a body not read to its end, a request h11 could not
    parse, bytes received but not parsed), ``close()`` sends the answer and a FIN, goes on
    reading and dropping what still comes, and closes when the client does or after
    ``linger`` seconds. With nothing left unread it closes at once."""

    def __init__(self, transport, *, unread: Callable[[], bool], linger: float, loop) -> None:
        self._transport = transport
        self._unread = unread
        self._linger = linger
        self._loop = loop
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self.lingering = False

    def __getattr__(self, name: str):  # everything else is the real transport's
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closed or self._transport.is_closing()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        t = self._transport
        if t.is_closing():
            return
        if not t.can_write_eof() or not self._unread():
            t.close()
            return
        self.lingering = True
        t.write_eof()  # the answer, then FIN
        t.resume_reading()
        self._timer = self._loop.call_later(self._linger, t.close)

    def stop_lingering(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the guarantees its public settings cannot give (see
    docs/serve.md, "What uvicorn cannot do"):

    1. **A head timeout**: a connection must send a whole request head within
       ``header_timeout`` of opening (and, kept alive, within one to two of them after its
       last answer); otherwise it is closed, with a JSON 408 if it had sent part of one.
       uvicorn has no timeout before a connection's first request.
    2. **No answer lost to a reset**: every close goes through :class:`GracefulTransport`.
    3. **A drain that lets a request on its way arrive**: on SIGTERM, a connection accepted
       just before, whose request has not come yet, gets ``drain_grace`` to send it.

    Hooks overridden: ``connection_made``, ``connection_lost``, ``data_received``,
    ``shutdown`` (pinned with uvicorn's version by tests/unit/test_serve_unit.py).
    ``limits`` is set on the subclass made by :func:`protocol_class`.
    """

    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:
        graceful = GracefulTransport(
            transport, unread=self._may_have_unread, linger=self.limits.linger, loop=self.loop
        )
        super().connection_made(graceful)
        self._draining = False
        self._seen = self.cycle
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.limits.header_timeout, self._check_head
        )

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.transport.stop_lingering()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the answer is out: what still comes is dropped
            return
        super().data_received(data)

    def _may_have_unread(self) -> bool:
        return (
            self.conn.their_state not in _READ_WHOLE
            or bool(self.conn.trailing_data[0])
            or self.flow.read_paused
        )

    # -- 1. head timeout -------------------------------------------------------------------
    def _check_head(self) -> None:
        """Every ``header_timeout``: a connection that stayed idle for a whole period (no
        request in progress, none begun since the last check) is cut."""
        self._head_timer = None
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.cycle is not self._seen:
            self._seen = self.cycle
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._check_head)
            return
        if self.conn.trailing_data[0]:  # half a request head: say why it is cut
            message = "request head not received in time"
            self.transport.write(_raw_json(408, "Request Timeout", message))
        self.transport.close()

    # -- 3. drain --------------------------------------------------------------------------
    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        waiting = self.cycle is None or bool(self.conn.trailing_data[0])
        if idle and waiting and not self._draining:
            # accepted, but its request has not arrived (or not whole): give it a moment
            self._draining = True
            self.loop.call_later(self.limits.drain_grace, self._shutdown_now)
            return
        super().shutdown()

    def _shutdown_now(self) -> None:
        if not self.transport.is_closing():
            super().shutdown()  # idle: closed; answering: closed once answered


def protocol_class(limits: ConnectionLimits) -> type[Protocol]:
    return type("FtctlProtocol", (Protocol,), {"limits": limits})


def uvicorn_config(app, cfg: ServeConfig):
    """``uvicorn.Config`` for ``app`` from ``[serve]``: uvicorn's public settings, plus
    :class:`Protocol` for what they cannot do."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=protocol_class(ConnectionLimits(header_timeout=cfg.header_timeout)),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        limit_concurrency=cfg.max_connections,  # connections or requests; one more gets a 503
        backlog=cfg.backlog,
        timeout_keep_alive=cfg.keep_alive,
        timeout_graceful_shutdown=cfg.graceful_timeout,
        h11_max_incomplete_event_size=cfg.max_header_bytes,
    )


# --------------------------------------------------------------------------- the socket


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (``sd_listen_fds``): fds 3.. when
    ``LISTEN_PID`` is our pid. The variables are then removed, as sd_listen_fds(1) does.
    (``socket.socket(fileno=)`` reads the family, type and protocol from the fd itself.)"""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise FtctlError(
                f"inherited fd {fd} is not a stream socket",
                hint="the .socket unit must use ListenStream=",
            )
        socks.append(sock)
    return socks


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port, or FtctlError saying why not.

    Made with protocol IPPROTO_TCP, not 0 as ``socket.create_server`` makes it: asyncio sets
    TCP_NODELAY only on connections whose protocol says TCP, and without it a response
    written in two parts waits for the client's delayed ACK (40 ms per keep-alive request)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:  # port in use, privileged port, unknown address
        sock.close()
        raise FtctlError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="another process may hold that port: stop it or pass --port / --host",
        ) from exc
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ToLog(logging.Handler):
    """uvicorn's own messages (start, drain, protocol warnings) as events of ``log``."""

    def __init__(self, log: Callable[[dict], None]) -> None:
        super().__init__(logging.INFO)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        self._log({"event": "server", "level": level, "message": record.getMessage()})


def route_uvicorn_logs(log: Callable[[dict], None]) -> None:
    logger = logging.getLogger("uvicorn.error")
    logger.handlers[:] = [_ToLog(log)]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def sd_notify(state: str) -> bool:
    """Tell systemd (``Type=notify``) about our state: READY=1, RELOADING=1, STOPPING=1.
    A no-op without ``$NOTIFY_SOCKET``; never raises."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- signals


class PendingSignal:
    """A signal from the first moment, before the server takes it over: the handler only sets
    a flag (all a handler may safely do while anything else runs), and the server acts on it
    once it is up (SIGHUP: a reload asked for while the model loads)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.pending = False

    def install(self) -> PendingSignal:
        signal.signal(self.signum, self._handler)
        return self

    def _handler(self, _sig, _frame) -> None:
        self.pending = True


class Stop(BaseException):
    """Raised by :class:`StopSignal`'s handler while the model loads: the load is abandoned
    (nothing is being served yet) and the process exits 0. A BaseException, so that no
    ``except Exception`` on the way swallows it."""


class StopSignal:
    """SIGTERM and SIGINT for ``serve``. While the model loads, they stop at once
    (:class:`Stop`); once the server exists (:meth:`attach`), they ask it to exit: it stops
    accepting, finishes what is in flight, and returns. No moment in between loses one: a
    signal that comes before :meth:`attach` is remembered and passed on there. (uvicorn
    takes both signals over while it serves and, once drained, raises them again: they land
    here, where they only set flags.)"""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.loading = True
        self.server = None

    def install(self) -> StopSignal:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def loaded(self) -> None:
        """From now on a stop is remembered, not raised. Raises :class:`Stop` if one came."""
        self.loading = False
        if self.requested:
            raise Stop

    def attach(self, server) -> None:
        self.server = server
        if self.requested:
            server.should_exit = True

    def _handler(self, _sig, _frame) -> None:
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True
        elif self.loading:
            raise Stop


async def run_server(
    server,
    sockets: list[socket.socket],
    on_hup: Callable[[], None],
    early_hup: PendingSignal,
    failure: Callable[[], str | None],
    on_failure: Callable[[str], None],
    *,
    check_every: float = 0.2,
) -> None:
    """Serve until SIGTERM/SIGINT (or a worker thread of the app dies: ``failure()`` names
    it, ``on_failure`` is told, and the server stops); SIGHUP calls ``on_hup`` in the event
    loop."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if early_hup.pending:  # came while loading: the link may have moved since the load began
        early_hup.pending = False
        on_hup()

    async def ready() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    async def watch() -> None:
        while True:
            await asyncio.sleep(check_every)
            if (why := failure()) is not None:
                on_failure(why)
                server.should_exit = True
                return

    tasks = [asyncio.create_task(ready()), asyncio.create_task(watch())]
    try:
        await server.serve(sockets=sockets)
    finally:
        for task in tasks:
            task.cancel()
        sd_notify("STOPPING=1")
        loop.remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(ValueError):  # not the main thread (tests)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no death by SIGHUP while finishing
