"""Serving throughput and latency: `ftctl serve` vs FastAPI + transformers.pipeline.

Both services run at once on this machine, on the same model: chinese-roberta-wwm-ext's shape
with random weights (hidden 768, 12 layers, vocab 21128, ~410 MB; built once into the cache
by bench/deploykit.py). The peer (bench/serve_peer.py) is written the way such services
usually are: FastAPI, a pipeline("text-classification") loaded once, one pipeline call per
request. At each level, N clients each send requests back to back over a keep-alive
connection (texts from data/test_cases.jsonl) for a fixed time; the two services take turns,
level by level, in ``--rounds`` slices of the time each (ftctl, peer, ftctl, peer, ...), so
drift in the machine's load hits both alike.

    .venv/bin/python bench/bench_serve.py                    # 1, 16, 64 clients, 15 s each
    .venv/bin/python bench/bench_serve.py --seconds 30 --rounds 2 --json

Prints requests/s and p50/p99 latency per level and the ratios; exits 1 if the two services
disagree on a label (they serve the same model) or any request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.deploykit import build_base_size_model  # noqa: E402
from ftctl.demo.localserver import free_port, wait_http  # noqa: E402
from ftctl.quiet import silence_libraries  # noqa: E402

silence_libraries()

FTCTL, PEER = "ftctl serve", "FastAPI + pipeline"


def start(name: str, cmd: list[str], port: int, log: Path, env: dict) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    if not wait_http(f"http://127.0.0.1:{port}/health", 600):
        proc.kill()
        raise RuntimeError(f"{name} did not start; see {log}")
    return proc


def ask(port: int, text: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"text": text}, ensure_ascii=False).encode()
    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    return out


def measure(port: int, clients: int, seconds: float, texts: list[str], warmup: float = 2.0):
    """N client threads, back-to-back requests on keep-alive connections. Throughput: the
    requests that finish inside the window (it opens ``warmup`` s after the clients start);
    latency: theirs, from send to answer. Returns the raw latencies and failures."""
    t_start = time.monotonic() + warmup
    t_end = t_start + seconds
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        i = k
        while time.monotonic() < t_end:
            body = json.dumps({"text": texts[i % len(texts)]}, ensure_ascii=False).encode()
            i += clients
            t0 = time.monotonic()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                why = f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            t1 = time.monotonic()
            if t_start <= t1 <= t_end:
                with lock:
                    (latencies.append(t1 - t0) if ok else failures.append(why))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures


def summary(clients: int, seconds: float, latencies: list[float], failures: list[str]) -> dict:
    latencies = sorted(latencies)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "clients": clients,
        "requests": len(latencies),
        "failed": len(failures),
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(pct(0.50), 1) if latencies else None,
        "p99_ms": round(pct(0.99), 1) if latencies else None,
        "failures": failures[:3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/ftctl-bench").expanduser())
    ap.add_argument("--model", type=Path, help="another model directory (default: 768x12)")
    ap.add_argument("--clients", default="1,16,64", help="concurrency levels")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured time per level")
    ap.add_argument(
        "--rounds", type=int, default=1,
        help="turns each side takes per level (on a shared machine: 2-3, with --seconds long "
        "enough that each turn still holds many batches: a batch of 64 takes seconds on CPU)",
    )  # fmt: skip
    ap.add_argument("--test-data", type=Path, default=ROOT / "data/test_cases.jsonl")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    from ftctl.data.examples import load_examples

    texts = [ex.text for ex in load_examples(args.test_data, what="test")]
    t = time.monotonic()
    model = args.model or build_base_size_model(args.cache / "base-old" / "final", seed=0)
    print(f"model {model} ready in {time.monotonic() - t:.0f}s", flush=True)
    env = dict(os.environ)
    bindir = Path(sys.executable).parent
    ports = {FTCTL: free_port(), PEER: free_port()}
    with tempfile.TemporaryDirectory(prefix="ftctl-bench-serve-") as tmp:
        cmds = {
            FTCTL: [str(bindir / "ftctl"), "serve", "--model-path", str(model),
                    "--port", str(ports[FTCTL]), "--prediction-log", f"{tmp}/predictions.jsonl"],
            PEER: [sys.executable, "-m", "uvicorn", "bench.serve_peer:app", "--port",
                   str(ports[PEER]), "--log-level", "warning"],
        }  # fmt: skip
        procs = {}
        try:
            for name, cmd in cmds.items():
                print(f"starting {name} ...", flush=True)
                procs[name] = start(name, cmd, ports[name], Path(tmp) / f"{ports[name]}.log",
                                    env | {"PEER_MODEL_DIR": str(model)})  # fmt: skip
            agree = all(
                ask(ports[FTCTL], x)["label"] == ask(ports[PEER], x)["label"] for x in texts[:20]
            )
            results: dict[str, list[dict]] = {FTCTL: [], PEER: []}
            for n in (int(c) for c in args.clients.split(",")):
                print(f"{n} clients: {args.rounds} turns each ...", flush=True)
                raw: dict[str, tuple[list, list]] = {FTCTL: ([], []), PEER: ([], [])}
                for _ in range(args.rounds):
                    for name in (FTCTL, PEER):
                        lat, fail = measure(ports[name], n, args.seconds / args.rounds, texts)
                        raw[name][0].extend(lat)
                        raw[name][1].extend(fail)
                for name in (FTCTL, PEER):
                    results[name].append(summary(n, args.seconds, *raw[name]))
        finally:
            for proc in procs.values():
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(60)
    lines = [
        f"\n{'clients':>7}  {'ftctl req/s':>11}  {'peer req/s':>10}  {'ratio':>6}  "
        f"{'ftctl p50/p99 ms':>17}  {'peer p50/p99 ms':>16}"
    ]
    for a, b in zip(results[FTCTL], results[PEER], strict=True):
        ratio = f"{a['rps'] / b['rps']:.2f}x" if b["rps"] else "inf"
        lines.append(
            f"{a['clients']:>7}  {a['rps']:>11}  {b['rps']:>10}  {ratio:>6}  "
            f"{a['p50_ms']!s:>8}/{a['p99_ms']!s:<8}  {b['p50_ms']!s:>7}/{b['p99_ms']!s:<8}"
        )
        for name, r in ((FTCTL, a), (PEER, b)):
            if r["failed"]:
                lines.append(f"  {name}: {r['failed']} failed, e.g. {r['failures'][0]}")
    lines.append(f"labels agree: {agree}")
    failed = sum(r["failed"] for rs in results.values() for r in rs)
    if args.json:
        print(json.dumps({"model": str(model), "seconds": args.seconds, "rounds": args.rounds,
                          "labels_agree": agree, "results": results}, indent=2))  # fmt: skip
    else:
        print("\n".join(lines))
    return 0 if agree and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
