"""Running the app: uvicorn underneath, the listening socket, signals, a draining stop.

- **uvicorn** (its pure-Python h11 protocol) parses HTTP. :class:`Protocol` adds what a
  service facing real clients needs and uvicorn leaves out: a JSON body for a malformed
  request, a timeout on a request's headers (uvicorn has none before the first request), a
  cap on open connections answered with a JSON 503, and a drain that lets a connection
  accepted just before SIGTERM send its request instead of being closed unanswered.
- **The socket** is inherited from the service manager when ``LISTEN_FDS`` is set for this
  process (systemd socket activation): connections that arrive while the service restarts wait
  in the kernel's queue and are answered by the next process. Otherwise ftctl binds
  ``host:port`` itself, with a listen backlog of ``backlog``.
- **SIGHUP** reloads the model (see :class:`~ftctl.serve.model.ModelHolder`); one that comes
  while the model is still loading is remembered and acted on once it is up. **SIGTERM** (and
  Ctrl-C) stop accepting, finish the requests in flight, then exit 0.
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

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ftctl.errors import FtctlError

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
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    max_connections: int = 1024  # open connections; one more is answered 503
    drain_grace: float = 0.5  # on SIGTERM: how long a connection with no request yet may send one


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON errors, a header timeout, a connection cap and a
    gentler drain. ``limits`` is set on the subclass made by :func:`protocol_class`."""

    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:
        no_delay(transport.get_extra_info("socket"))
        super().connection_made(transport)
        self._header_timer = None
        self._waiting_cycle = None
        self._bytes_since_response = 0
        self._draining = False
        if len(self.connections) > self.limits.max_connections:
            transport.write(_raw_json(503, "Service Unavailable", "too many connections"))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    # -- header timeout ------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._waiting_cycle = self.cycle
        self._bytes_since_response = 0
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or busy or self.cycle is not self._waiting_cycle:
            return  # a request is being answered: not ours to cut
        if self._bytes_since_response:  # half a request: say why it is cut
            self.transport.write(
                _raw_json(408, "Request Timeout", "request headers not received in time")
            )
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._bytes_since_response += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._waiting_cycle:  # a new request's headers have arrived
            self._cancel_header_timer()
            self._waiting_cycle = self.cycle
            if self._draining and self.cycle is not None:
                self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # not a pipelined next one
        if idle and not self.transport.is_closing() and not self._draining:
            self._arm_header_timer()

    # -- JSON for a request h11 cannot parse (bad Content-Length, bad request line, ...) --
    def send_400_response(self, msg: str) -> None:
        self._cancel_header_timer()
        message = "invalid HTTP request (request line, a header or Content-Length)"
        self.transport.write(_raw_json(400, "Bad Request", message))
        self.transport.close()

    # -- drain ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and (self.cycle is None or self._bytes_since_response):
            # accepted, but its request has not arrived (or not whole): give it a moment
            self._draining = True
            self.loop.call_later(self.limits.drain_grace, self._shutdown_now)
            return
        super().shutdown()

    def _shutdown_now(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is None or (
            self.cycle.response_complete and self.conn.their_state is h11.IDLE
        ):
            super().shutdown()
        else:
            self.cycle.keep_alive = False


def no_delay(sock) -> None:
    """TCP_NODELAY on an accepted connection. asyncio sets it only on sockets whose ``proto``
    is IPPROTO_TCP, and a socket made by ``socket.create_server`` (or passed by systemd) has
    proto 0: a response written in two parts then waits for the client's delayed ACK, 40 ms
    per keep-alive request (measured: 104 ms instead of 60 ms for one text)."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def protocol_class(limits: ConnectionLimits) -> type[Protocol]:
    return type("FtctlProtocol", (Protocol,), {"limits": limits})


# --------------------------------------------------------------------------- the socket


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (``sd_listen_fds``): fds 3.. when
    ``LISTEN_PID`` is our pid. The variables are then removed, as sd_listen_fds(1) does."""
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
    """A listening TCP socket on host:port, or FtctlError saying why not."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:  # port in use, privileged port, unknown address
        raise FtctlError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="another process may hold that port: stop it or pass --port / --host",
        ) from exc


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
    once it is up. SIGHUP: a reload asked for while the model loads; SIGTERM: stop as soon as
    the server has started (nothing is in flight yet)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.pending = False

    def install(self) -> PendingSignal:
        signal.signal(self.signum, self._handler)
        return self

    def _handler(self, _sig, _frame) -> None:
        self.pending = True


def ignore_sighup_early(argv: list[str]) -> None:
    """Called first thing by the CLI: when the command is ``serve``, SIGHUP is ignored until
    :class:`PendingSignal` takes over (a reload asked for before the model loads needs nothing
    done: the load reads the link afterwards)."""
    if "serve" in argv[1:] and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def run_server(
    server,
    sockets: list[socket.socket],
    on_hup: Callable[[], None],
    early: PendingSignal,
    stop: PendingSignal,
) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP calls ``on_hup`` in the event loop."""
    if stop.pending:
        server.should_exit = True
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if early.pending:  # came while loading: the link may have moved since the load began
        early.pending = False
        on_hup()

    async def ready() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    notify = asyncio.create_task(ready())
    try:
        await server.serve(sockets=sockets)
    finally:
        notify.cancel()
        sd_notify("STOPPING=1")
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no death by SIGHUP while finishing
