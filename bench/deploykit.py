"""Shared rig of the deploy benchmarks: a real sshd on loopback, a real supervisord running
`ftctl serve` (program `python-services`) on the seed's directory layout, and two realistic
base-size models (~400 MB each: BertForSequenceClassification, hidden 768, 12 layers, vocab
21128, random weights; built once into the cache directory).

The scripts that use it, one figure each:
    bench/bench_deploy_time.py      deploy wall time: ftctl vs the seed's scp -r + ssh restart
    bench/bench_deploy_downtime.py  failed requests during a deploy under load: ftctl vs seed
    bench/bench_redeploy_bytes.py   bytes sent to redeploy an unchanged model: ftctl vs scp -r
    bench/bench_deploy_wan.py       a fine-tune over a 50 Mbit/s link (network namespace)
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
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ftctl.config import DeployConfig  # noqa: E402
from ftctl.demo.localserver import LocalSSHD, Supervisor, free_port, wait_http  # noqa: E402
from ftctl.demo.run import DEMO_INTENTS as INTENTS  # noqa: E402
from ftctl.deploy import deploy  # noqa: E402
from ftctl.manifest import model_digest  # noqa: E402
from ftctl.remote import connect, parse_host  # noqa: E402


def build_base_size_model(out: Path, seed: int) -> Path:
    """chinese-roberta-wwm-ext's shape with random weights (~400 MB), once per cache."""
    if (out / "model.safetensors").is_file():
        if not (out / "manifest.json").is_file():  # caches made before the manifest was added
            from ftctl.manifest import write_manifest

            write_manifest(out, {"kind": "bench", "seed": seed})
        return out
    from ftctl.manifest import write_manifest
    from ftctl.model.files import save_classifier
    from ftctl.train.base import build_char_tokenizer, build_classifier, cjk_vocab

    vocab = cjk_vocab()[:21128]
    model = build_classifier(
        INTENTS,
        len(vocab),
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_position=512,
        seed=seed,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_classifier(model, build_char_tokenizer(vocab), tmp)
    write_manifest(tmp, {"kind": "bench", "seed": seed})  # as `ftctl train` writes one
    os.replace(tmp, out)
    return out


def build_train8_finetune(base: Path, cache: Path) -> Path:
    """A real freeze-8 fine-tune of ``base``: `ftctl train` with the seed's settings (lr 5e-6,
    2 epochs, batch 8, embeddings + 8 layers frozen) on 200 stratified rows of
    data/incremental_training_data.jsonl and 400 of data/original_training_data.jsonl, all
    replayed. Its manifest names ``base`` as its base model. Once per cache (~90 s here)."""
    out = cache / "base-old-train8"
    if (out / "final" / "manifest.json").is_file():
        return out / "final"
    from ftctl.data.examples import load_examples, write_examples
    from ftctl.train.mix import stratified_sample

    data = {}
    for name, src, n in (("new200", "incremental_training_data", 200),
                         ("old400", "original_training_data", 400)):  # fmt: skip
        rows = stratified_sample(load_examples(REPO / "data" / f"{src}.jsonl"), n, 42)
        data[name] = write_examples(cache / f"{name}.jsonl", rows)
    ftctl = str(Path(sys.executable).parent / "ftctl")
    cmd = [ftctl, "train", "--new-data", str(data["new200"]), "--old-data", str(data["old400"]),
           "--model-path", str(base), "--output-path", str(out), "--epochs", "2",
           "--batch-size", "8", "--lr", "5e-6", "--replay-ratio", "0.6667",
           "--freeze-layers", "8", "--device", "cpu"]  # fmt: skip
    print("fine-tuning with ftctl train (once) ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "final"


def identical_share(a: Path, b: Path, block: int = 1 << 16) -> float:
    """Share of ``b``'s bytes equal to ``a``'s at the same offsets (64 KiB blocks)."""
    same = total = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while y := fb.read(block):
            total += len(y)
            same += len(y) if fa.read(block) == y else 0
    return same / total if total else 0.0


def lo_bytes() -> int:
    """Bytes received on loopback so far (each loopback byte is counted once here)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


class Load:
    """2 threads POSTing /predict until stopped (bounded by count and time)."""

    def __init__(self, port: int, threads: int = 2, max_requests: int = 100_000) -> None:
        self.url = f"http://127.0.0.1:{port}/predict"
        self.ok = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.first_fail = 0.0
        self.last_fail = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._max = max_requests
        self._threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        deadline = time.monotonic() + 600
        body = json.dumps({"text": "查看在产批次"}).encode()
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.ok + self.failed >= self._max:
                    return
            req = urllib.request.Request(self.url, data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                with self._lock:
                    self.ok += 1
            except Exception as exc:
                with self._lock:
                    now = time.monotonic()
                    self.first_fail = self.first_fail or now
                    self.last_fail = now
                    self.failed += 1
                    k = type(exc).__name__
                    self.errors[k] = self.errors.get(k, 0) + 1
                time.sleep(0.05)  # a down service refuses at once: do not spin

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def health_sha(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read())["sha256"]
    except Exception:
        return None


def wait_sha(port: int, digest: str, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if health_sha(port) == digest:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"service did not serve {digest[:8]} within {timeout}s")


def reset_remote(remote_dir: Path, model: Path, sup: Supervisor, port: int) -> None:
    """The seed's state: a real final/ directory with ``model``, service restarted on it."""
    sup.ctl("stop", sup.name)
    shutil.rmtree(remote_dir, ignore_errors=True)
    remote_dir.mkdir(parents=True)
    shutil.copytree(model, remote_dir / "final")
    sup.ctl("start", sup.name)
    wait_sha(port, model_digest(model))


def seed_deploy(sshd: LocalSSHD, model: Path, remote_dir: Path, restart_cmd: str) -> None:
    """The seed's README, literally: scp -r final to the server dir, then ssh restart."""
    ssh_opts = [
        "-i",
        str(sshd.client_key),
        "-o",
        f"UserKnownHostsFile={sshd.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
    ]
    dest = f"{sshd.user}@{sshd.address}:{remote_dir}/"
    subprocess.run(
        ["scp", "-q", "-r", "-P", str(sshd.port), *ssh_opts, "--", str(model), dest], check=True
    )
    subprocess.run(
        ["ssh", "-p", str(sshd.port), *ssh_opts, "--", f"{sshd.user}@{sshd.address}", restart_cmd],
        check=True,
        capture_output=True,
    )


def timed(fn, port: int, digest: str, *, load_threads: int = 2) -> dict:
    """Run ``fn`` (under a load of ``load_threads`` request loops); time until the service
    serves ``digest``; count failed requests."""
    with Load(port, threads=load_threads) as load:
        time.sleep(1.0)
        t0 = time.monotonic()
        b0 = lo_bytes()
        out = fn()
        cmd_s = time.monotonic() - t0
        wait_sha(port, digest)
        total_s = time.monotonic() - t0
        time.sleep(1.0)
    return {
        "command_s": round(cmd_s, 2),
        "until_serving_s": round(total_s, 2),
        "requests_ok": load.ok,
        "requests_failed": load.failed,
        "errors": load.errors,
        "failing_window_s": round(load.last_fail - load.first_fail, 2),
        "lo_bytes_incl_load": lo_bytes() - b0,
        "result": out,
    }


SEED = "seed scp -r + restart"
FTCTL_RELOAD = "ftctl deploy (reload)"


@dataclasses.dataclass
class Rig:
    """Everything a figure needs: the models, the server and a deploy config for it."""

    old: Path
    new: Path
    model_bytes: int
    remote_dir: Path
    port: int
    sshd: LocalSSHD
    sup: Supervisor
    cfg: DeployConfig

    def ftctl_deploy(self, cfg: DeployConfig | None = None):
        """A callable running `ftctl deploy` of the new model (core API, same code as the CLI)."""
        cfg = cfg or self.cfg
        specs = [parse_host(self.sshd.host)]

        def go() -> dict:
            res = deploy(self.new, cfg, specs, lambda s: connect(s, cfg))
            res.raise_for_error()
            h = res.hosts[0]
            return {"uploaded_bytes": h.uploaded_bytes, "method": h.method}

        return go

    def seed_deploy(self):
        return lambda: seed_deploy(self.sshd, self.new, self.remote_dir, self.sup.restart_cmd)

    def reset(self) -> None:
        reset_remote(self.remote_dir, self.old, self.sup, self.port)

    def compare(self, *, load_threads: int) -> dict[str, dict]:
        """The seed's deploy, ftctl with restart, ftctl with reload: each from the seed's
        starting state (a real final/ directory serving the old model), timed under load."""
        reload_cfg = dataclasses.replace(self.cfg, reload_cmd=self.sup.reload_cmd)
        digest = model_digest(self.new)
        runs = {}
        for name, fn in (
            (SEED, self.seed_deploy()),
            ("ftctl deploy (restart)", self.ftctl_deploy()),
            (FTCTL_RELOAD, self.ftctl_deploy(reload_cfg)),
        ):
            print(f"{name} ...", flush=True)
            self.reset()
            runs[name] = timed(fn, self.port, digest, load_threads=load_threads)
        return runs


def cache_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/ftctl-bench").expanduser(),
        help="where the two ~400 MB models are built once",
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")


@contextlib.contextmanager
def rig(cache: Path) -> Iterator[Rig]:
    """Build (or reuse) the models, start sshd + supervisor + ftctl serve on the old model."""
    t = time.monotonic()
    old = build_base_size_model(cache / "base-old" / "final", seed=0)
    new = build_base_size_model(cache / "base-new" / "final", seed=1)
    size = sum(p.stat().st_size for p in new.rglob("*") if p.is_file())
    print(f"models ready ({size / 1e6:.0f} MB each) in {time.monotonic() - t:.0f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="ftctl-bench-") as tmp:
        root = Path(tmp)
        remote_dir = root / "srv" / "chinese-roberta-wwm-ext-classifier"
        remote_dir.mkdir(parents=True)
        shutil.copytree(old, remote_dir / "final")
        port = free_port()
        ftctl = str(Path(sys.executable).parent / "ftctl")
        cmd = [ftctl, "serve", "--model-path", str(remote_dir / "final"), "--port", str(port)]
        with LocalSSHD(root / "sshd") as sshd, Supervisor(root / "sup", cmd) as sup:
            if not wait_http(f"http://127.0.0.1:{port}/health", 300):
                raise RuntimeError(f"service did not start; see {root / 'sup'}")
            cfg = DeployConfig(
                hosts=(sshd.host,),
                identity=sshd.client_key,
                known_hosts=sshd.known_hosts,
                remote_dir=str(remote_dir),
                restart_cmd=sup.restart_cmd,
                health_url=f"http://127.0.0.1:{port}/health",
                health_timeout=300.0,
            )
            yield Rig(old, new, size, remote_dir, port, sshd, sup, cfg)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "inf"


def emit(figures: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(figures, indent=2, default=str))
    else:
        print("\n".join(lines))
