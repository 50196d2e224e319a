"""The tensor delta (ftctl/deploy/tensordelta.py) against rsync's delta, on a real fine-tune.

The model is chinese-roberta-wwm-ext's shape with random weights (768x12, vocab 21128, 410 MB;
bench/deploykit.py), fine-tuned by `ftctl train` with the seed's settings: lr 5e-6, 2 epochs,
batch 8, embeddings + 8 layers frozen, on 200 stratified rows of
data/incremental_training_data.jsonl and 400 of data/original_training_data.jsonl, all 400
replayed (--replay-ratio 0.6667). Both are built once into the cache.

Measured, in one run:
  1. the byte picture: tensors identical to the base, tensors changed;
  2. the codec alone (into a counter, nothing sent): delta bytes, wall and CPU seconds and
     MB/s of model file encoded, per zlib level; with --lzma, what lzma preset 1 would make of
     the same byte planes;
  3. over a real sshd on 127.0.0.1, alternating, --rounds times: today's transfer (rsync
     --no-whole-file against the old file, as ftctl/deploy/transfer.py runs it) and the tensor
     delta streamed into `ssh ... python3 tensordelta.py apply` under the server Pythons
     (--server-python, default /usr/bin/python3 = 3.11 and pyenv's 3.6.15): wall time, bytes on
     loopback, client CPU (ours + ssh's), the server apply's CPU and peak RSS (ru_maxrss of the
     child); and the seed's `scp -r` of the model directory once, for the byte ratio;
  4. what these bytes predict for a 50 Mbit/s link (--rate-mbit): the transfer alone, and the
     whole deploy given --fixed-s, the seconds a deploy spends besides the transfer (lock,
     probe, go-live, restart, health; 4.5 s in bench/README.md's WAN figure, measured by
     bench/bench_deploy_wan.py, which deploys for real).

    .venv/bin/python bench/bench_tensor_delta.py [--cache DIR] [--rounds 2] [--levels 0,1,6,9]
        [--lzma] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploykit import (
    build_base_size_model,
    build_train8_finetune,
    cache_arg,
    emit,
    identical_share,
    lo_bytes,
)

from ftctl.demo.localserver import LocalSSHD
from ftctl.deploy import tensordelta as td
from ftctl.deploy.server import tensordelta as wire
from ftctl.fsutil import sha256_file
from tests.helpers import CHILD_RUSAGE as RUSAGE
from tests.helpers import child_rusage

WEIGHTS = "model.safetensors"
PY36 = "/root/.pyenv/versions/3.6.15/bin/python"
# what ftctl's verify does to a received file: sha256 it, fsync it
VERIFY = (
    "import hashlib,os,sys;h=hashlib.sha256();f=open(sys.argv[1],'rb')\n"
    "for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n"
    "os.fsync(f.fileno());print(h.hexdigest())"
)


def largest_tensor(path: Path) -> int:
    return max(t.end - t.begin for t in td.read_layout(path).tensors.values())


def codec_sweep(new: Path, basis: Path, levels: list[int]) -> dict[str, dict]:
    out = {}
    for level in levels:
        st = td.encode(new, basis, td.CountingSink(), level=level)
        out[f"zlib-{level}"] = {
            "delta_bytes": st.delta_bytes, "ratio": round(st.ratio, 4),
            "seconds": round(st.seconds, 2), "cpu_s": round(st.cpu_seconds, 2),
            "mb_per_s": round(st.mb_per_s, 1),
        }  # fmt: skip
        print(f"  zlib-{level}: {st.delta_bytes:,} bytes in {st.seconds:.1f}s", flush=True)
    return out


def lzma_planes(new: Path, basis: Path) -> dict:
    """The changed blocks' byte planes (the same ones encode makes) through lzma preset 1,
    each kept only where it is smaller (the rest stored), plus every other record as zlib-1."""
    import lzma

    import numpy as np

    nl, bl = td.read_layout(new), td.read_layout(basis)
    a = np.memmap(new, dtype=np.uint8, mode="r")
    b = np.memmap(basis, dtype=np.uint8, mode="r")
    total, c0 = 0, time.process_time()
    for p in td.pieces(nl, bl, a.size):
        x = a[p.start : p.start + p.length]
        y = b[p.basis : p.basis + p.length]
        if p.kind == "L" or np.array_equal(x, y):
            total += len(b"".join(td._record(p, a, b, 1)[0]))
            continue
        total += 1 + wire.XOR.size
        for plane in np.bitwise_xor(x, y).reshape(-1, p.k).T.copy():
            total += wire.PAYLOAD.size + min(len(lzma.compress(plane, preset=1)), plane.size)
    return {"delta_bytes": total, "ratio": round(total / a.size, 4),
            "cpu_s": round(time.process_time() - c0, 2)}  # fmt: skip


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Loopback:
    """A real sshd on 127.0.0.1 and the ssh/rsync/scp commands that reach it."""

    def __init__(self, sshd: LocalSSHD, root: Path) -> None:
        self.sshd, self.root = sshd, root
        self.opts = ["-i", str(sshd.client_key), "-o", f"UserKnownHostsFile={sshd.known_hosts}",
                     "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                     "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
                     "-o", "Compression=no"]  # fmt: skip
        self.target = f"{sshd.user}@{sshd.address}"
        self.ssh = ["ssh", "-p", str(sshd.port), *self.opts, self.target]

    def fresh_dir(self, name: str, basis: Path) -> Path:
        """A server-side upload dir holding the old file (a hard link, as ftctl prepares it)."""
        d = self.root / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        os.link(basis, d / WEIGHTS)
        return d

    def rsync(self, new: Path, basis: Path, python: str) -> dict:
        """rsync, then the server's verify: ``python`` hashes and fsyncs the file (ftctl's
        verify does that too, partly while rsync writes; the tensor delta's apply does both)."""
        d = self.fresh_dir("rsync", basis)
        e = shlex.join(["ssh", "-p", str(self.sshd.port), *self.opts])
        cmd = ["rsync", "--ignore-times", "--no-whole-file", "--stats", "-e", e,
               str(new), f"{self.target}:{d}/"]  # fmt: skip
        c0, b0, t0 = children_cpu(), lo_bytes(), time.monotonic()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        wall = time.monotonic() - t0
        c1 = children_cpu()
        verify = [python, "-c", RUSAGE, python, "-I", "-c", VERIFY, str(d / WEIGHTS)]
        err = subprocess.run([*self.ssh, shlex.join(verify)], capture_output=True, text=True,
                             check=True).stderr  # fmt: skip
        verified = time.monotonic() - t0
        sent = int(re.search(r"Total bytes sent:\s*([\d,]+)", out)[1].replace(",", ""))
        assert sha256_file(d / WEIGHTS) == sha256_file(new), "rsync made another file"
        verify_cpu = child_rusage(err)["cpu_s"]
        res = {"wall_s": round(wall, 2), "with_verify_s": round(verified, 2),
               "lo_bytes": lo_bytes() - b0, "bytes": sent, "client_cpu_s": round(c1 - c0, 2),
               "verify_cpu_s": round(verify_cpu, 2)}  # fmt: skip
        shutil.rmtree(d)
        return res

    def tensor_delta(self, new: Path, basis: Path, python: str, level: int) -> dict:
        d = self.fresh_dir("tdelta", basis)
        server = shlex.join([python, "-c", RUSAGE, python, "-I", wire.__file__, "apply",
                             str(d / WEIGHTS), str(d / "new.safetensors")])  # fmt: skip
        c0, b0, t0 = children_cpu(), lo_bytes(), time.monotonic()
        with subprocess.Popen(
            [*self.ssh, server], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:  # fmt: skip
            st = td.encode(new, basis, proc.stdin, level=level)
            proc.stdin.close()
            answer, err = proc.stdout.read(), proc.stderr.read().decode()
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"apply failed: {err}")
        assert json.loads(answer)["sha256"] == sha256_file(new)
        usage = child_rusage(err)
        shutil.rmtree(d)
        return {"wall_s": round(wall, 2), "lo_bytes": lo_bytes() - b0,
                "bytes": st.delta_bytes, "encode_cpu_s": round(st.cpu_seconds, 2),
                "client_cpu_s": round(st.cpu_seconds + children_cpu() - c0, 2),
                "server_cpu_s": round(usage["cpu_s"], 2),
                "server_maxrss_mb": round(usage["maxrss_kb"] / 1024, 1)}  # fmt: skip

    def scp_dir(self, model: Path) -> dict:
        d = self.root / "scp"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        b0, t0 = lo_bytes(), time.monotonic()
        subprocess.run(["scp", "-q", "-r", "-P", str(self.sshd.port), *self.opts, str(model),
                        f"{self.target}:{d}/"], check=True)  # fmt: skip
        res = {
            "wall_s": round(time.monotonic() - t0, 2),
            "lo_bytes": lo_bytes() - b0,
            "bytes": sum(p.stat().st_size for p in model.rglob("*") if p.is_file()),
        }
        shutil.rmtree(d)
        return res

    def interpreter_rss(self, python: str) -> float:
        """Peak RSS (MB) of the bare interpreter, measured the same way as the apply."""
        err = subprocess.run([python, "-c", RUSAGE, python, "-I", "-c", "pass"],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
        return round(child_rusage(err)["maxrss_kb"] / 1024, 1)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    ap.add_argument("--rounds", type=int, default=2, help="loopback rounds, sides alternating")
    ap.add_argument("--levels", default="0,1,6,9", help="zlib levels of the codec sweep")
    ap.add_argument("--level", type=int, default=td.LEVEL, help="zlib level over ssh")
    ap.add_argument("--lzma", action="store_true", help="also lzma preset 1 on the planes")
    ap.add_argument("--server-python", action="append", help="server interpreters (repeatable)")
    ap.add_argument("--rate-mbit", type=float, default=50.0, help="link of the prediction")
    ap.add_argument("--fixed-s", type=float, default=4.5, help="a deploy's non-transfer seconds")
    args = ap.parse_args()
    pythons = args.server_python or ["/usr/bin/python3", PY36]
    base = build_base_size_model(args.cache / "base-old" / "final", seed=0)
    tuned = build_train8_finetune(base, args.cache)
    new, basis = tuned / WEIGHTS, base / WEIGHTS
    found = td.find_local_basis(tuned, {sha256_file(basis): basis.stat().st_size})
    assert found and found.path == basis, "the manifest's base model is the basis"
    size = new.stat().st_size
    dir_size = sum(p.stat().st_size for p in tuned.rglob("*") if p.is_file())
    share = identical_share(basis, new)
    print(f"fine-tune: {share:.1%} of {WEIGHTS} identical at the same offsets", flush=True)
    print("codec alone (into a counter):", flush=True)
    figures: dict = {"model_bytes": size, "dir_bytes": dir_size, "identical_share": share,
                     "largest_tensor": largest_tensor(new)}  # fmt: skip
    figures["codec"] = codec_sweep(new, basis, [int(x) for x in args.levels.split(",")])
    if args.lzma:
        figures["codec"]["lzma-1 (planes)"] = lzma_planes(new, basis)
    runs: dict[str, list[dict]] = {}
    for py in pythons:
        runs[f"rsync + verify, server {py}"] = []
        runs[f"tensor delta, server {py}"] = []
    with tempfile.TemporaryDirectory(prefix="ftctl-bench-tdelta-") as tmp:
        root = Path(tmp)
        with LocalSSHD(root / "sshd") as sshd:
            lb = Loopback(sshd, root / "srv")
            figures["interpreter_rss_mb"] = {py: lb.interpreter_rss(py) for py in pythons}
            figures["scp -r"] = lb.scp_dir(tuned)
            for r in range(args.rounds):
                order = list(runs)
                for name in order if r % 2 == 0 else order[::-1]:
                    print(f"round {r + 1}: {name} ...", flush=True)
                    py = name.rsplit(" ", 1)[1]
                    if name.startswith("rsync"):
                        runs[name].append(lb.rsync(new, basis, py))
                    else:
                        runs[name].append(lb.tensor_delta(new, basis, py, args.level))
    figures["loopback"] = runs
    emit(figures, args.json, report(figures, runs, args))
    return 0


def report(figures: dict, runs: dict[str, list[dict]], args) -> list[str]:
    size, mb = figures["model_bytes"], 1e6
    lines = [f"\n{size / mb:.0f} MB {WEIGHTS}, real fine-tune (freeze 8, seed settings): "
             f"{figures['identical_share']:.1%} identical, largest tensor "
             f"{figures['largest_tensor'] / mb:.1f} MB",
             f"  {'codec alone':22s} {'delta bytes':>14s} {'x file':>7s} {'wall s':>7s} "
             f"{'cpu s':>6s} {'MB/s':>6s}"]  # fmt: skip
    for name, c in figures["codec"].items():
        wall = f"{c['seconds']:7.2f}" if "seconds" in c else f"{'-':>7s}"
        speed = f"{c['mb_per_s']:6.0f}" if "mb_per_s" in c else f"{'-':>6s}"
        lines.append(f"  {name:22s} {c['delta_bytes']:14,d} {c['ratio']:7.3f} {wall} "
                     f"{c['cpu_s']:6.2f} {speed}")  # fmt: skip
    scp = figures["scp -r"]
    lines += [f"\n  loopback over sshd, median of {args.rounds} (tensor delta: zlib-{args.level}; "
              "bytes: what each tool wrote into ssh; lo: the loopback counter, shared;",
              "  server cpu: the apply's, or for rsync the verify's (the receiving rsync's is "
              "not counted))",
              f"  {'':46s} {'wall s':>7s} {'bytes':>12s} {'lo bytes':>12s} {'client cpu':>10s} "
              f"{'server cpu':>10s} {'server RSS':>10s}",
              f"  {'scp -r of the directory (the seed)':46s} {scp['wall_s']:7.2f} "
              f"{scp['bytes']:12,d} {scp['lo_bytes']:12,d}"]  # fmt: skip
    med = {name: {k: median([x[k] for x in xs]) for k in xs[0]} for name, xs in runs.items()}
    for name, m in med.items():
        wall = m.get("with_verify_s", m["wall_s"])
        server = m.get("server_cpu_s", m.get("verify_cpu_s", 0))
        rss = (
            f"{max(x['server_maxrss_mb'] for x in runs[name]):8.1f} MB"
            if "server_maxrss_mb" in m
            else ""
        )
        lines.append(f"  {name:46s} {wall:7.2f} {m['bytes']:12,.0f} {m['lo_bytes']:12,.0f} "
                     f"{m['client_cpu_s']:10.2f} {server:10.2f} {rss}")  # fmt: skip
        if name.startswith("tensor"):
            rs = med["rsync + verify" + name[len("tensor delta") :]]
            lines.append(f"  {'':4s}vs rsync + verify: wall {wall / rs['with_verify_s']:.2f}x "
                         f"(rsync alone {rs['wall_s']:.2f} s: {wall / rs['wall_s']:.2f}x), "
                         f"bytes {m['bytes'] / rs['bytes']:.2f}x")  # fmt: skip
    rate = args.rate_mbit * 1e6 / 8
    td_b = median([m["bytes"] for n, m in med.items() if n.startswith("tensor")])
    rs_b = median([m["bytes"] for n, m in med.items() if n.startswith("rsync")])
    t_scp, t_rs, t_td, fx = scp["bytes"] / rate, rs_b / rate, td_b / rate, args.fixed_s
    lines += [f"\n  predicted at {args.rate_mbit:g} Mbit/s (bytes / rate; a deploy = transfer + "
              f"{fx:g} s fixed, the seed's = scp -r + {fx:g} s)",
              f"    transfer: scp -r {t_scp:.1f} s, rsync {t_rs:.1f} s, tensor delta {t_td:.1f} s",
              f"    tensor delta / scp -r: bytes {td_b / scp['bytes']:.3f}x (target <= 0.19x), "
              f"deploy time {(t_td + fx) / (t_scp + fx):.3f}x (target <= 0.25x)",
              f"    rsync / scp -r: bytes {rs_b / scp['bytes']:.3f}x, "
              f"deploy time {(t_rs + fx) / (t_scp + fx):.3f}x"]  # fmt: skip
    lines.append("  interpreter peak RSS: " + ", ".join(
        f"{py} {v} MB" for py, v in figures["interpreter_rss_mb"].items()))  # fmt: skip
    return lines


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
