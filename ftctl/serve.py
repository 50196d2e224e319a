"""The reference inference service: POST /predict, GET /health, hot reload on SIGHUP.

A reload loads the model the link points at *now* beside the old one, then swaps one reference;
requests already running finish on the old model, so a deploy that reloads instead of restarting
fails zero requests. A model that does not load leaves the old one serving (and /health keeps
reporting the old digest, which the deploy's health check notices).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ftctl.errors import FtctlError
from ftctl.evaluate import predict
from ftctl.manifest import model_digest
from ftctl.model import check_supported, read_labels

MAX_BODY = 1 << 20
MAX_BATCH = 256


@dataclass
class Predictor:
    """One loaded model; its own lock (fast tokenizers are not safe across threads)."""

    model_dir: str  # realpath it was loaded from
    sha256: str
    labels: list[str]
    model: object
    tokenizer: object
    max_length: int = 64
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def predict(self, texts: list[str]) -> tuple[list[str], list[float]]:
        with self.lock:
            return predict(
                self.model, self.tokenizer, texts, MAX_BATCH, self.max_length, self.device
            )


def load_predictor(model_dir: str | Path, *, max_length: int = 64, device: str = "cpu"):
    """Resolve the link now and load what it points at (checks first, cheap, then weights)."""
    from ftctl.model import load_classifier

    real = os.path.realpath(model_dir)
    check_supported(real)
    labels = read_labels(real)
    digest = model_digest(real)
    model, tokenizer = load_classifier(real, device=device)
    return Predictor(real, digest, labels, model, tokenizer, max_length, device)


class ModelHolder:
    """The live predictor; ``reload()`` swaps in a new one only once it has loaded."""

    def __init__(self, model_dir: str | Path, *, max_length: int = 64, device: str = "cpu",
                 log: Callable[[str], None] = lambda m: None) -> None:  # fmt: skip
        self.model_dir = str(model_dir)
        self.max_length = max_length
        self.device = device
        self.log = log
        self.current = load_predictor(model_dir, max_length=max_length, device=device)
        self.reloads = 0
        self.last_error: str | None = None
        self._reload_lock = threading.Lock()

    def reload(self) -> bool:
        with self._reload_lock:
            try:
                new = load_predictor(self.model_dir, max_length=self.max_length, device=self.device)
            except Exception as exc:  # any failure keeps the old model serving
                self.last_error = str(getattr(exc, "message", exc))
                self.log(f"reload failed, still serving {self.current.sha256[:8]}: {exc}")
                return False
            old, self.current = self.current, new
            self.reloads += 1
            self.last_error = None
            self.log(f"reloaded: {old.sha256[:8]} -> {new.sha256[:8]} ({new.model_dir})")
            return True

    def reload_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.reload, name="ftctl-reload", daemon=True)
        t.start()
        return t

    def health(self) -> dict:
        p = self.current
        return {
            "status": "ok",
            "sha256": p.sha256,
            "labels": p.labels,
            "model_dir": p.model_dir,
            "reloads": self.reloads,
            "last_reload_error": self.last_error,
        }


def _handler(holder: ModelHolder, log: Callable[[str], None]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ftctl-serve"

        def log_message(self, fmt, *args):  # route access logs to the caller's log
            log(fmt % args)

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.split("?")[0] == "/health":
                self._send(200, holder.health())
            else:
                self._send(404, {"error": "not found: GET /health, POST /predict"})

        def do_POST(self):
            if self.path.split("?")[0] != "/predict":
                self._send(404, {"error": "not found: GET /health, POST /predict"})
                return
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    raise ValueError("body too large")
                req = json.loads(self.rfile.read(n) or b"null")
                texts, single = _texts(req)
            except (ValueError, json.JSONDecodeError) as exc:
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            p = holder.current  # one model for the whole request, even across a reload
            labels, scores = p.predict(texts)
            if single:
                self._send(200, {"label": labels[0], "score": scores[0], "sha256": p.sha256})
            else:
                out = [{"label": lab, "score": s} for lab, s in zip(labels, scores, strict=True)]
                self._send(200, {"predictions": out, "sha256": p.sha256})

    return Handler


def _texts(req) -> tuple[list[str], bool]:
    """{"text": str} or {"texts": [str, ...]} -> (texts, single)."""
    if isinstance(req, dict) and isinstance(req.get("text"), str) and req["text"].strip():
        return [req["text"]], True
    if isinstance(req, dict) and isinstance(req.get("texts"), list):
        texts = req["texts"]
        if texts and len(texts) <= MAX_BATCH and all(isinstance(t, str) for t in texts):
            return texts, False
    raise ValueError(f'expected {{"text": "..."}} or {{"texts": [...]}} (at most {MAX_BATCH})')


def make_server(holder: ModelHolder, host: str, port: int, log=lambda m: None):
    try:
        server = ThreadingHTTPServer((host, port), _handler(holder, log))
    except OSError as exc:  # port in use, privileged port, unknown address
        raise FtctlError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="another process may hold that port: stop it or pass --port / --host",
        ) from exc
    server.daemon_threads = True
    return server


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_length: int = 64,
    device: str = "cpu",
    log: Callable[[str], None] = lambda m: None,
    on_ready: Callable[[ThreadingHTTPServer, ModelHolder], None] | None = None,
) -> None:
    """Load, listen, reload on SIGHUP, stop on SIGTERM/SIGINT. Blocks until stopped."""
    import signal

    holder = ModelHolder(model_dir, max_length=max_length, device=device, log=log)
    server = make_server(holder, host, port, log)

    def on_hup(_sig, _frame):
        holder.reload_in_background()

    def on_term(_sig, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    log(f"serving {holder.current.sha256[:8]} from {holder.current.model_dir} on {host}:{port}")
    if on_ready:
        on_ready(server, holder)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
