"""A real fine-tune over a thin link: `ftctl deploy` (the tensor delta; and rsync, as before it)
vs the seed's `scp -r` + `ssh ... restart`.

The server is a real sshd inside a network namespace this script creates (root, iproute2),
reached through a veth pair shaped with `tc qdisc ... tbf rate 50mbit` on both ends, the way a
cloud host's public bandwidth limits a deploy (latency cannot be shaped here: no netem). Only
the two addresses of that veth pair are used; the namespace is deleted at the end. In it:
supervisord running `ftctl serve` (program `python-services`) on the seed's layout, serving the
410 MB base model from a real `final/` directory. Deployed: a real freeze-8 fine-tune of it,
made once by `ftctl train` with the seed's settings (deploykit.build_train8_finetune; its
manifest names the base, of which this machine holds the copy the tensor delta needs).

Each run starts from the seed's state (final/ holding the base, the service restarted on it);
--rounds N alternates their order. The runs: the seed's way; `ftctl deploy --transfer rsync`
(ftctl before the tensor delta); `ftctl deploy` (auto: the tensor delta); with --reload also
both ftctl ways with a reload instead of the restart (no service restart to add its noise).
The clock runs until /health reports the fine-tune; bytes are the veth's counter towards
the server (--loopback: the lo counter, which anything else on the machine adds to). For
ftctl: its client CPU (this process and its ssh/rsync children), the peak RSS of the server's
apply (remote_python is wrapped to report it), and each step of the deploy (client side, and
the go-live's on the server).

--loopback: the same against a real sshd on 127.0.0.1, no namespace (the CPU is the limit).

    .venv/bin/python bench/bench_deploy_wan.py [--cache DIR] [--rate 50mbit] [--loopback]
        [--rounds 1] [--reload] [--server-python PYTHON] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from deploykit import (
    build_base_size_model,
    build_train8_finetune,
    cache_arg,
    emit,
    identical_share,
    lo_bytes,
    ratio,
    seed_deploy,
)

from ftctl.config import DeployConfig
from ftctl.demo.localserver import LocalSSHD, Supervisor
from ftctl.deploy import deploy
from ftctl.manifest import model_digest
from ftctl.progress import NullReporter
from ftctl.remote import connect, parse_host

SEED = "seed scp -r + restart"
RSYNC = "ftctl --transfer rsync"
TDELTA = "ftctl (tensor delta)"
TDELTA_RELOAD = "ftctl (tensor delta), reload"
RSYNC_RELOAD = "ftctl --transfer rsync, reload"
# remote_python for ftctl's runs: the server's python3, run as the only child of this wrapper,
# which then writes that child's peak RSS and CPU to stderr (the client shows it as a server
# line): `RUSAGE <subcommand> {json}`
RUSAGE_WRAPPER = """import json,resource,subprocess,sys
rc = subprocess.call([sys.executable] + sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
sub = sys.argv[4] if len(sys.argv) > 4 else "?"
sys.stderr.write("RUSAGE %s %s\\n" % (sub, json.dumps(
    {"maxrss_kb": r.ru_maxrss, "cpu_s": round(r.ru_utime + r.ru_stime, 2)})))
sys.exit(rc)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def shaped_netns(rate: str) -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side veth, server address): a namespace behind a shaped veth pair."""
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"ftctl-deploy-wan-{tag}", f"ftdw{tag}h", f"ftdw{tag}n"
    net = f"10.231.{os.getpid() % 250}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{net}.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        nsx = ["ip", "netns", "exec", ns]
        sh(*nsx, "ip", "addr", "add", f"{net}.2/30", "dev", ns_if)
        sh(*nsx, "ip", "link", "set", ns_if, "up")
        sh(*nsx, "ip", "link", "set", "lo", "up")
        tbf = ["root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms"]
        sh("tc", "qdisc", "add", "dev", host_if, *tbf)
        sh(*nsx, "tc", "qdisc", "add", "dev", ns_if, *tbf)
        yield ns, host_if, f"{net}.2"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


@contextlib.contextmanager
def loopback() -> Iterator[tuple[None, None, str]]:
    yield None, None, "127.0.0.1"


def tx_bytes(dev: str | None) -> int:
    if dev is None:
        return lo_bytes()
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())


def health_sha(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())["sha256"]
    except Exception:
        return None


def wait_sha(url: str, digest: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_sha(url) == digest:
            return
        time.sleep(0.05)
    raise RuntimeError(f"service did not serve {digest[:8]} within {timeout}s")


def run_one(name, fn, dev: str | None, url: str, digest: str) -> dict:
    print(f"{name} ...", flush=True)
    b0, t0 = tx_bytes(dev), time.monotonic()
    out = fn()
    cmd_s = time.monotonic() - t0
    wait_sha(url, digest)
    total = time.monotonic() - t0
    return {
        "until_serving_s": round(total, 2),
        "command_s": round(cmd_s, 2),
        "bytes_to_server": tx_bytes(dev) - b0,
        "result": out,
    }


def cpu_now() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def ftctl_run(model: Path, cfg: DeployConfig, host: str) -> dict:
    """One `ftctl deploy` (the core API, the same code as the CLI): what it did and cost."""
    rep = NullReporter()
    c0 = cpu_now()
    res = deploy(model, cfg, [parse_host(host)], lambda s: connect(s, cfg), reporter=rep)
    cpu = cpu_now() - c0
    res.raise_for_error()
    h = res.hosts[0]
    usage = {}
    for line in rep.warnings:
        if "server: RUSAGE " in line:
            sub, doc = line.split("server: RUSAGE ", 1)[1].split(" ", 1)
            usage[sub] = json.loads(doc)
    apply = usage.get("tdelta")
    return {
        "method": h.method,
        "methods": h.methods,
        "file_bytes": h.uploaded_bytes,
        "timings": h.timings,
        "golive_steps": h.golive_steps,
        "client_cpu_s": round(cpu, 2),
        "apply_maxrss_mb": round(apply["maxrss_kb"] / 1024, 1) if apply else None,
        "apply_cpu_s": apply["cpu_s"] if apply else None,
    }


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    ap.add_argument("--rate", default="50mbit", help="tbf rate of both veth ends")
    ap.add_argument("--loopback", action="store_true", help="127.0.0.1, no namespace, no shaping")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, the order alternating")
    ap.add_argument("--reload", action="store_true", help="also ftctl with a reload (SIGHUP)")
    ap.add_argument("--server-python", default="python3", help="the server's python3")
    args = ap.parse_args()
    base = build_base_size_model(args.cache / "base-old" / "final", seed=0)
    tuned = build_train8_finetune(base, args.cache)
    share = identical_share(base / "model.safetensors", tuned / "model.safetensors")
    size = sum(p.stat().st_size for p in tuned.rglob("*") if p.is_file())
    print(f"fine-tune: {share:.1%} of model.safetensors identical at the same offsets", flush=True)
    digest = model_digest(tuned)
    link = loopback() if args.loopback else shaped_netns(args.rate)
    with tempfile.TemporaryDirectory(prefix="ftctl-deploy-wan-") as tmp, link as (ns, dev, addr):
        root = Path(tmp)
        remote_dir = root / "srv" / "chinese-roberta-wwm-ext-classifier"
        port = 8000 if ns else 18000 + os.getpid() % 1000
        ftctl = str(Path(sys.executable).parent / "ftctl")
        cmd = [ftctl, "serve", "--model-path", str(remote_dir / "final"), "--host", addr,
               "--port", str(port)]  # fmt: skip
        sup = Supervisor(root / "sup", cmd)
        sshd = LocalSSHD(root / "sshd", address=addr)
        if ns:
            sup.prefix = sshd.prefix = ["ip", "netns", "exec", ns]
        url = f"http://{addr}:{port}/health"
        wrapper = root / "rusage.py"
        wrapper.write_text(RUSAGE_WRAPPER)

        def reset() -> None:
            sup.ctl("stop", sup.name)
            shutil.rmtree(remote_dir, ignore_errors=True)
            remote_dir.mkdir(parents=True)
            shutil.copytree(base, remote_dir / "final")
            sup.ctl("start", sup.name)
            wait_sha(url, model_digest(base))

        remote_dir.mkdir(parents=True)
        shutil.copytree(base, remote_dir / "final")
        with sshd, sup:
            wait_sha(url, model_digest(base))
            cfg = DeployConfig(
                hosts=(sshd.host,), identity=sshd.client_key, known_hosts=sshd.known_hosts,
                remote_dir=str(remote_dir), restart_cmd=sup.restart_cmd, health_url=url,
                health_timeout=300.0, remote_python=f"{args.server_python} {wrapper}",
            )  # fmt: skip
            rsync_cfg = dataclasses.replace(cfg, transfer="rsync")
            ways = {
                SEED: lambda: seed_deploy(sshd, tuned, remote_dir, sup.restart_cmd),
                RSYNC: lambda: ftctl_run(tuned, rsync_cfg, sshd.host),
                TDELTA: lambda: ftctl_run(tuned, cfg, sshd.host),
            }
            if args.reload:
                reload_cfg = dataclasses.replace(cfg, reload_cmd=sup.reload_cmd)
                rsync_reload = dataclasses.replace(reload_cfg, transfer="rsync")
                ways[RSYNC_RELOAD] = lambda: ftctl_run(tuned, rsync_reload, sshd.host)
                ways[TDELTA_RELOAD] = lambda: ftctl_run(tuned, reload_cfg, sshd.host)
            runs: dict[str, list[dict]] = {name: [] for name in ways}
            for r in range(args.rounds):
                for name in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                    reset()
                    runs[name].append(run_one(name, ways[name], dev, url, digest))
    figures = {"identical_share": share, "model_bytes": size, "rounds": args.rounds,
               "link": "loopback" if args.loopback else args.rate,
               "server_python": args.server_python, "runs": runs}  # fmt: skip
    emit(figures, args.json, report(figures, runs, size, share))
    return 0


def report(figures: dict, runs: dict[str, list[dict]], size: int, share: float) -> list[str]:
    med = {n: {k: median([x[k] for x in xs]) for k in ("until_serving_s", "bytes_to_server")}
           for n, xs in runs.items()}  # fmt: skip
    lines = [
        f"\n{size / 1e6:.0f} MB model, a real freeze-8 fine-tune by `ftctl train` ({share:.0%} of "
        f"model.safetensors identical), link {figures['link']} both ways, server python "
        f"{figures['server_python']}, median of {figures['rounds']}",
        f"  {'':30s} {'until serving':>14s} {'transfer':>9s} {'bytes to server':>16s} "
        f"{'client CPU':>11s} {'apply RSS':>10s} {'vs seed: time':>14s} {'bytes':>7s}",
    ]
    seed = med[SEED]
    for name, m in med.items():
        last = runs[name][-1]["result"] or {}
        cpu = f"{median([x['result']['client_cpu_s'] for x in runs[name]]):9.2f} s" if last else ""
        rss = f"{last['apply_maxrss_mb']:7.1f} MB" if last.get("apply_maxrss_mb") else ""
        moved = median([x["result"]["timings"]["transfer"] for x in runs[name]]) if last else 0
        transfer = f"{moved:7.2f} s" if last else ""
        lines.append(
            f"  {name:30s} {m['until_serving_s']:12.1f} s {transfer:>9s} "
            f"{m['bytes_to_server']:16,.0f} {cpu:>11s} {rss:>10s} "
            f"{ratio(m['until_serving_s'], seed['until_serving_s']):>14s} "
            f"{ratio(m['bytes_to_server'], seed['bytes_to_server']):>7s}"
        )
    td = med[TDELTA]
    lines.append(
        f"  tensor delta / seed: time {ratio(td['until_serving_s'], seed['until_serving_s'])} "
        f"(target <= 0.25x), bytes {ratio(td['bytes_to_server'], seed['bytes_to_server'])} "
        "(target <= 0.19x)"
    )
    for name in (TDELTA, TDELTA_RELOAD):
        if name in runs:
            lines += steps_lines(name, runs[name][-1])
    return lines


def steps_lines(name: str, run: dict) -> list[str]:
    """Where one deploy's seconds went: the client's steps, then the go-live's on the server."""
    res = run["result"]
    t = res["timings"]
    lines = [f"\n  steps of the last '{name}' run ({run['until_serving_s']:.1f} s until serving):"]
    lines += [f"    {step:28s} {secs:6.2f} s" for step, secs in t.items() if step != "go-live"]
    for m, x in res["methods"].items():
        lines.append(f"      {m:26s} {x['seconds']:6.2f} s ({x['files']} files, {x['bytes']:,} B)")
    steps = res["golive_steps"]
    ends = [s["t"] for s in steps[1:]] + [t.get("go-live", 0.0)]
    lines.append(f"    {'go-live (on the server)':28s} {t.get('go-live', 0.0):6.2f} s")
    for s, end in zip(steps, ends, strict=True):
        lines.append(f"      {s['step']:26s} {end - s['t']:6.2f} s")
    lines.append(f"    {'after the command, until /health':28s} "
                 f"{run['until_serving_s'] - run['command_s']:6.2f} s")  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
