"""A fine-tune over a thin link: `ftctl deploy` vs the seed's `scp -r` + `ssh ... restart`.

The server is a real sshd inside a network namespace this script creates (root, iproute2),
reached through a veth pair shaped with `tc qdisc ... tbf rate 50mbit` on both ends, the way a
cloud host's public bandwidth limits a deploy (latency cannot be shaped here: no netem). Only
the two addresses of that veth pair are used; the namespace is deleted at the end. In it:
supervisord running `ftctl serve` (program `python-services`) on the seed's layout, serving
the 410 MB base model from a real `final/` directory. Deployed: a freeze-8 fine-tune of it
(layers 8-11, pooler and classifier changed, same safetensors header: see
deploykit.build_freeze8_finetune). Both ways restart the service; the clock runs until
/health reports the fine-tune; bytes are the veth's counter towards the server.

    .venv/bin/python bench/bench_deploy_wan.py [--cache DIR] [--rate 50mbit] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
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
    REPO,
    build_base_size_model,
    build_freeze8_finetune,
    cache_arg,
    emit,
    identical_share,
    ratio,
)

from ftctl.config import DeployConfig
from ftctl.deploy import deploy
from ftctl.localserver import LocalSSHD, Supervisor
from ftctl.manifest import model_digest
from ftctl.remote import connect, parse_host

assert REPO  # deploykit put the repository on sys.path


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


def tx_bytes(dev: str) -> int:
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())


def health_sha(url: str) -> str | None:
    import json

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
        time.sleep(0.2)
    raise RuntimeError(f"service did not serve {digest[:8]} within {timeout}s")


def run_one(name, fn, dev: str, url: str, digest: str) -> dict:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    ap.add_argument("--rate", default="50mbit", help="tbf rate of both veth ends")
    args = ap.parse_args()
    base = build_base_size_model(args.cache / "base-old" / "final", seed=0)
    tuned = build_freeze8_finetune(base, args.cache / "base-old-ft8" / "final")
    share = identical_share(base / "model.safetensors", tuned / "model.safetensors")
    size = sum(p.stat().st_size for p in tuned.rglob("*") if p.is_file())
    print(f"fine-tune: {share:.1%} of model.safetensors identical at the same offsets", flush=True)
    digest = model_digest(tuned)
    with (
        tempfile.TemporaryDirectory(prefix="ftctl-deploy-wan-") as tmp,
        shaped_netns(args.rate) as (ns, dev, addr),
    ):
        root = Path(tmp)
        remote_dir = root / "srv" / "chinese-roberta-wwm-ext-classifier"
        port = 8000
        ftctl = str(Path(sys.executable).parent / "ftctl")
        cmd = [ftctl, "serve", "--model-path", str(remote_dir / "final"), "--host", addr,
               "--port", str(port)]  # fmt: skip
        sup = Supervisor(root / "sup", cmd)
        sup.prefix = ["ip", "netns", "exec", ns]
        sshd = LocalSSHD(root / "sshd", address=addr)
        sshd.prefix = ["ip", "netns", "exec", ns]
        url = f"http://{addr}:{port}/health"

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
                health_timeout=300.0,
            )  # fmt: skip

            def seed() -> None:
                from deploykit import seed_deploy

                seed_deploy(sshd, tuned, remote_dir, sup.restart_cmd)

            def ftctl_deploy() -> dict:
                res = deploy(tuned, cfg, [parse_host(sshd.host)], lambda s: connect(s, cfg))
                res.raise_for_error()
                h = res.hosts[0]
                import json

                steps = json.loads((remote_dir / ".ftctl" / "status.json").read_text())["steps"]
                return {"method": h.method, "file_bytes": h.uploaded_bytes,
                        "rsync_sent": h.wire_bytes, "linked_files": h.linked_files,
                        "seconds": round(h.seconds, 2),
                        "go_live_steps_s": {x["step"]: x["t"] for x in steps}}  # fmt: skip

            runs = {}
            for name, fn in (("seed scp -r + restart", seed), ("ftctl deploy", ftctl_deploy)):
                reset()
                runs[name] = run_one(name, fn, dev, url, digest)
    s, f = runs["seed scp -r + restart"], runs["ftctl deploy"]
    lines = [
        f"\n{size / 1e6:.0f} MB model, freeze-8 fine-tune ({share:.0%} identical), "
        f"link {args.rate} both ways, restart path",
        f"  {'':24s} {'until serving':>14s} {'bytes to server':>16s}",
    ]
    for name, x in runs.items():
        lines.append(f"  {name:24s} {x['until_serving_s']:12.1f} s {x['bytes_to_server']:16,d}")
    lines.append(
        f"  ftctl / seed: wall {ratio(f['until_serving_s'], s['until_serving_s'])} "
        f"(target <= 0.40x), bytes {ratio(f['bytes_to_server'], s['bytes_to_server'])} "
        "(target <= 0.32x)"
    )
    emit({"identical_share": share, "model_bytes": size, "rate": args.rate, "runs": runs},
         args.json, lines)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
