"""The HTTP application: an ASGI app with two routes, written directly (no framework).

``POST /predict`` takes ``{"text": "..."}`` or ``{"texts": ["...", ...]}``; ``GET /health``
reports the model and its reloads. Every answer is JSON, errors too: ``{"error": message,
"status": code}``. What a client can get wrong, and what it gets back (all 4xx):

- a body over ``max_body`` bytes: 413 (the body is read and dropped first, up to a bound, so
  the client reads the answer instead of a reset connection);
- a body that does not arrive within ``body_timeout`` seconds: 408;
- not UTF-8, not JSON, nested too deep, a number too long to read, the wrong shape or types, an
  empty text, too many or too long texts, text that is not valid Unicode (lone surrogates): 400;
- a wrong path: 404; a wrong method: 405.

What the service cannot do right now is a 5xx: more requests in flight than ``max_in_flight``,
or more work queued than the model can do within ``predict_timeout``: 503 with
``Retry-After``, at once; no answer from the model in time: 504; the model failed on this
request: 500. An answer sent before the body was read does not close the connection: uvicorn
reads and drops the rest of the body, so a client still sending it reads the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from ftctl.serve.batching import Batcher, Overloaded
from ftctl.serve.model import ModelHolder, Prediction

DRAIN_FACTOR = 16  # an oversized body is read and dropped up to max_body x this, then cut


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``[serve]`` in ftctl.toml)."""

    max_body: int = 1 << 20  # bytes of one request body
    max_texts: int = 256  # texts in one request
    max_chars: int = 1000  # characters of one text
    body_timeout: float = 10.0  # seconds to receive a whole body
    predict_timeout: float = 30.0  # seconds to wait for the model's answer
    max_in_flight: int = 512  # requests being handled at once


class HTTPError(Exception):
    """An answer other than 200. ``close``: close the connection after it (the body was not
    read, and is not worth reading); ``retry_after``: seconds, for a 503."""

    def __init__(
        self, status: int, message: str, *, close: bool = False, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close
        self.retry_after = retry_after


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], bool]:
    """The texts of a /predict body and whether it was the single-text form; HTTPError(400)
    naming the problem otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"body is not UTF-8 (byte {exc.start})") from None
    try:
        req = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HTTPError(
            400, f"body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise HTTPError(400, "body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise HTTPError(400, f"body has a value that cannot be read: {exc}") from None
    if not isinstance(req, dict) or ("text" in req) == ("texts" in req):
        raise HTTPError(400, 'expected {"text": "..."} or {"texts": ["...", ...]}')
    if "text" in req:
        return [_check_text(req["text"], "text", limits)], True
    texts = req["texts"]
    if not isinstance(texts, list) or not 1 <= len(texts) <= limits.max_texts:
        raise HTTPError(400, f'"texts" must be a list of 1 to {limits.max_texts} strings')
    return [_check_text(t, f"texts[{i}]", limits) for i, t in enumerate(texts)], False


def _check_text(value, where: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise HTTPError(400, f'"{where}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise HTTPError(400, f'"{where}" is empty')
    if len(value) > limits.max_chars:
        raise HTTPError(400, f'"{where}" has {len(value)} characters, over {limits.max_chars}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPError(
            400, f'"{where}" is not valid Unicode (lone surrogate at character {exc.start})'
        ) from None
    return value


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)  # the HTTP layer already refused a malformed one
    return None


async def read_body(receive, scope, limits: Limits) -> bytes:
    """The whole body, within ``body_timeout`` and ``max_body`` (HTTPError 408/413)."""
    declared = _content_length(scope)
    too_large = declared is not None and declared > limits.max_body
    if declared is not None and declared > limits.max_body * DRAIN_FACTOR:
        raise HTTPError(413, f"body of {declared} bytes, over {limits.max_body}", close=True)
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + limits.body_timeout
    more = True
    while more:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            msg = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            raise HTTPError(
                408, f"body not received within {limits.body_timeout:g} s", close=True
            ) from None
        if msg["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        data = msg.get("body", b"")
        size += len(data)
        more = msg.get("more_body", False)
        if size > limits.max_body:
            too_large = True
            if size > limits.max_body * DRAIN_FACTOR:
                break
        if not too_large:
            chunks.append(data)
    if too_large:
        raise HTTPError(413, f"body over {limits.max_body} bytes", close=True)
    return b"".join(chunks)


def _prediction(p: Prediction) -> dict:
    return {
        "label": p.label,
        "score": p.score,
        "runner_up": p.runner_up,
        "runner_up_score": p.runner_up_score,
    }


class ServeApp:
    """The ASGI callable. ``log(event)`` gets one dict per access (with ``access_log``) and
    per error the service itself hit."""

    def __init__(
        self,
        holder: ModelHolder,
        batcher: Batcher,
        limits: Limits = Limits(),
        *,
        log: Callable[[dict], None] = lambda event: None,
        access_log: bool = False,
        extra_health: Callable[[], dict] = dict,
        failures: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.holder = holder
        self.batcher = batcher
        self.limits = limits
        self.log = log
        self.access_log = access_log
        self.extra_health = extra_health
        self.more_failures = failures
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        t0 = time.perf_counter()
        info: dict = {}
        headers: list[tuple[bytes, bytes]] = []
        self.in_flight += 1
        try:
            status, payload = await self._route(scope, receive, info)
        except HTTPError as exc:
            status, payload = exc.status, {"error": exc.message, "status": exc.status}
            if exc.close:
                headers.append((b"connection", b"close"))
            if exc.retry_after is not None:
                headers.append((b"retry-after", str(exc.retry_after).encode()))
            if status == 405:
                headers.append((b"allow", b"POST" if scope["path"] == "/predict" else b"GET"))
        except ConnectionResetError:  # the client left before sending its whole body
            return
        except Exception as exc:  # a bug of ours: still a JSON answer, and a log line
            with contextlib.suppress(Exception):
                self.log({"event": "error", "path": scope["path"], "error": repr(exc)})
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}", "status": 500}
        finally:
            self.in_flight -= 1
        body = json.dumps(payload, ensure_ascii=False).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()), *headers]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
        if self.access_log:
            client = scope.get("client") or ("", 0)
            with contextlib.suppress(Exception):
                self.log({"event": "access", "client": f"{client[0]}:{client[1]}",
                          "method": scope["method"], "path": scope["path"], "status": status,
                          "ms": round((time.perf_counter() - t0) * 1000, 1),
                          "bytes": len(body), **info})  # fmt: skip

    async def _route(self, scope, receive, info: dict) -> tuple[int, dict]:
        path, method = scope["path"], scope["method"]
        if path == "/health":
            if method not in ("GET", "HEAD"):
                raise HTTPError(405, "use GET /health")
            return self.health()
        if path == "/predict":
            if method != "POST":
                raise HTTPError(405, 'use POST /predict with {"text": "..."}')
            if self.in_flight > self.limits.max_in_flight:
                raise HTTPError(503, "too many requests in flight", retry_after=1)
            return 200, await self.predict(scope, receive, info)
        raise HTTPError(404, "not found: GET /health, POST /predict")

    def failure(self) -> str | None:
        """Why the service cannot answer any more (a thread of it died), else None."""
        return self.batcher.failure() or self.holder.failure() or self.more_failures()

    def health(self) -> tuple[int, dict]:
        """200 and the state; 503 with ``status: failed`` and the ``error`` once a thread of
        the service has died (the process is then stopping, for its manager to restart it)."""
        body = self.holder.health() | {"batching": self.batcher.stats()} | self.extra_health()
        if (why := self.failure()) is not None:
            return 503, body | {"status": "failed", "error": why}
        return 200, body

    async def predict(self, scope, receive, info: dict) -> dict:
        body = await read_body(receive, scope, self.limits)
        texts, single = parse_request(body, self.limits)
        info["texts"] = len(texts)
        try:
            future = self.batcher.submit(texts)
        except Overloaded as exc:
            raise HTTPError(503, f"overloaded: {exc}", retry_after=exc.retry_after) from None
        answer = await self._wait(future, receive)
        if single:
            return _prediction(answer.predictions[0]) | {"sha256": answer.sha256}
        predictions = [_prediction(p) for p in answer.predictions]
        return {"predictions": predictions, "sha256": answer.sha256}

    async def _wait(self, future, receive):
        """The answer, within ``predict_timeout``. If the client leaves first, or the time is
        up, the request is cancelled: its texts leave the queue at once."""
        answer = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            done, _ = await asyncio.wait(
                (answer, gone), timeout=self.limits.predict_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            gone.cancel()
        if answer not in done:
            answer.cancel()
            if gone in done:
                raise ConnectionResetError("client went away")
            raise HTTPError(
                504, f"no answer from the model within {self.limits.predict_timeout:g} s"
            )
        try:
            return answer.result()
        except Exception as exc:
            raise HTTPError(500, f"prediction failed: {type(exc).__name__}: {exc}") from None


async def _disconnect(receive) -> None:
    """Returns once the client has gone (the body has been read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass
