"""ftctl train as it runs for real: precision, checkpoints (contents, map_location, mid-epoch
resume, --checkpoint none), SIGINT/SIGTERM from another process, --nproc 2 on CPU (gloo), and
the progress lines printed without a terminal. Tiny real models; real subprocesses and signals."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftctl.cli.common import RichReporter
from ftctl.cli.main import app
from ftctl.config import TrainConfig
from ftctl.errors import ExitCode
from ftctl.manifest import read_manifest
from ftctl.model.files import load_classifier
from ftctl.train import checkpoint as ckpt
from ftctl.train.finetune import train
from ftctl.train.fit import Interrupted
from tests.helpers import INTENTS, write_jsonl
from tests.unit.test_train import cfg as train_cfg
from tests.unit.test_train import one_thread, synth, write_job  # noqa: F401 (one_thread: autouse)

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return write_job(tmp_path_factory.mktemp("runtime"))


def cfg(root: Path, model: Path, out: Path, **kw) -> TrainConfig:
    """test_train's job, 3 epochs at lr 3e-3 (the tiny model beats its epoch 0 there)."""
    return train_cfg(root, model, out, **({"epochs": 3, "lr": 3e-3} | kw))


def weights(out: Path) -> bytes:
    return (out / "final" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(job, tiny_model_dir):
    """reference(precision): the output directory of an uninterrupted 3-epoch run."""
    made: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in made:
            made[precision] = job / f"reference-{precision}"
            train(cfg(job, tiny_model_dir, made[precision], precision=precision))
        return made[precision]

    return get


class StopAt:
    """A stop request that arrives once epoch ``epoch`` is over, before step ``batch`` (from
    0) of the next one. Pass it as ``stop`` and its ``arm`` as ``on_epoch_end``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch, self.polls = epoch, batch, None

    def arm(self, record) -> None:
        if record["epoch"] == self.epoch:
            self.polls = 0

    def __call__(self) -> bool:
        if self.polls is None:
            return False
        self.polls += 1
        return self.polls > self.batch

    def run(self, config: TrainConfig):
        return train(config, stop=self, on_epoch_end=self.arm)


# ------------------------------------------------------------------ checkpoints + resume


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stop_mid_epoch_then_resume_equals_uninterrupted(precision, job, tiny_model_dir, reference):
    out = job / f"mid-{precision}"
    with pytest.raises(Interrupted) as info:
        StopAt(epoch=1, batch=4).run(cfg(job, tiny_model_dir, out, precision=precision))
    assert (info.value.epoch, info.value.batch) == (1, 4)
    assert info.value.checkpoint == out / "checkpoints" / "last.pt"
    assert not (out / "final").exists()
    state = torch.load(info.value.checkpoint, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 4, 9 + 4)  # 9 steps an epoch
    result = train(cfg(job, tiny_model_dir, out, precision=precision), resume=True)
    assert (result.manifest["resumed_from_epoch"], result.manifest["resumed_at_batch"]) == (1, 4)
    assert weights(out) == weights(reference(precision))
    figures = ("epoch", "step", "train_loss", "val_loss", "val_accuracy", "improved")
    expected = read_manifest(reference(precision) / "final")["metrics"]
    assert [[r[k] for k in figures] for r in result.history] == [
        [r[k] for k in figures] for r in expected
    ]


def test_checkpoint_holds_only_what_resume_needs(job, tiny_model_dir):
    out = job / "contents"

    def crash(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(job, tiny_model_dir, out, freeze_layers=8), on_epoch_end=crash)
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert set(state) == {
        *("format", "fingerprint", "epoch", "batch", "step", "sums"),
        *("trainable", "optimizer", "scheduler", "rng", "best", "best_weights"),
        *("bad_evals", "history"),
    }
    frozen = [n for n in state["trainable"] if ".embeddings." in n or ".layer.0." in n]
    assert not frozen and any(".layer.11." in n for n in state["trainable"])
    assert state["best"]["epoch"] == 1 and state["best_weights"] is None  # = trainable
    assert isinstance(state["rng"][0]["cpu"], bytes)
    assert state["sums"] == [{"loss_sum": 0.0, "seen": 0}]  # per process; an epoch's end
    model_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert path.stat().st_size < model_bytes  # the frozen embeddings + 8 layers are not in it


def test_rng_states_survive_a_map_location_to_another_device(job, tiny_model_dir):
    """The bug this guards against: a checkpoint loaded with map_location='cuda' put the RNG
    states on the GPU, and torch.set_rng_state refused them. Here the other device is 'meta'
    (the one every torch has): every tensor moves there, the RNG states are bytes and do not."""
    out = job / "maploc"
    with pytest.raises(Interrupted):
        StopAt(epoch=1, batch=2).run(cfg(job, tiny_model_dir, out))
    path = out / "checkpoints" / "last.pt"
    moved = torch.load(path, map_location="meta", weights_only=False)
    assert all(t.device.type == "meta" for t in moved["trainable"].values())
    on_cpu = ckpt.load(path, moved["fingerprint"])
    assert all(t.device.type == "cpu" for t in on_cpu["trainable"].values())
    ckpt.set_rng_state(moved["rng"][0], "cpu")
    a = torch.rand(4)
    ckpt.set_rng_state(on_cpu["rng"][0], "cpu")
    assert torch.equal(a, torch.rand(4))
    result = train(cfg(job, tiny_model_dir, out), resume=True)
    assert result.manifest["resumed_at_batch"] == 2


def test_checkpoint_none_keeps_nothing_and_refuses_resume(job, tiny_model_dir, tmp_path):
    out = tmp_path / "none"
    seen = []
    train(
        cfg(job, tiny_model_dir, out, checkpoint="none", epochs=2),
        on_epoch_end=lambda r: seen.append((out / "checkpoints").exists()),
    )
    assert seen == [False, False]
    with pytest.raises(Interrupted) as info:
        StopAt(epoch=1, batch=2).run(cfg(job, tiny_model_dir, out, checkpoint="none"))
    assert info.value.checkpoint is None
    res = runner.invoke(
        app,
        [
            *("train", "--new-data", str(job / "new.jsonl"), "--model-path", str(tiny_model_dir)),
            *("--output-path", str(out), "--checkpoint", "none", "--resume"),
        ],
    )
    assert res.exit_code == ExitCode.USAGE and "--checkpoint none" in res.output


def test_an_old_format_checkpoint_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"fingerprint": "x", "epoch": 1}, path)
    with pytest.raises(Exception, match="older ftctl") as info:
        ckpt.load(path, "x")
    assert "delete OUTPUT/checkpoints/" in info.value.hint


# ------------------------------------------------------------------ precision


def test_bf16_on_cpu_trains_keeps_fp32_weights_and_is_deterministic(job, tiny_model_dir):
    a, b = job / "bf16a", job / "bf16b"
    result = train(cfg(job, tiny_model_dir, a, precision="bf16", freeze_layers=8))
    train(cfg(job, tiny_model_dir, b, precision="bf16", freeze_layers=8))
    m = read_manifest(a / "final")
    assert m["precision"] == {"requested": "bf16", "used": "bf16", "tf32": False}
    assert result.best_epoch > 0
    saved = load_file(a / "final" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    frozen = [k for k in base if ".embeddings." in k or any(f".layer.{i}." in k for i in range(8))]
    assert all(base[k].equal(saved[k]) for k in frozen)
    assert weights(a) == weights(b)  # same seed, same bytes (CPU)
    load_classifier(a / "final")


def test_precision_auto_is_fp32_on_cpu_and_bad_values_are_refused(job, tiny_model_dir):
    from ftctl.train.numerics import resolve_precision

    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu").name == "bf16"
    assert resolve_precision("fp32", "cpu").tf32 is False
    res = runner.invoke(app, ["train", "--precision", "fp16", "--device", "cpu"])
    assert res.exit_code == ExitCode.USAGE and "train.precision" in res.output


# ------------------------------------------------------------------ progress without a TTY


def test_progress_without_a_terminal_prints_a_line_every_30_s_and_at_the_end():
    buf = io.StringIO()
    now = [0.0]
    rep = RichReporter(Console(file=buf, width=200), clock=lambda: now[0])
    with rep.task("epoch 1/2", total=100, unit="batch") as adv:
        for _ in range(100):
            now[0] += 1.0  # one step a second: 100 s in all
            adv(1, loss=0.5)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4  # at 30, 60 and 90 s, and at the end
    assert lines[0] == "epoch 1/2: 30/100 batch, 30.0 s, eta 1:10  loss=0.5"
    assert lines[-1] == "epoch 1/2: 100/100 batch in 1:40  loss=0.5"


def test_a_stopped_task_says_so_without_a_terminal():
    buf = io.StringIO()
    rep = RichReporter(Console(file=buf, width=200), clock=lambda: 5.0)
    with pytest.raises(KeyboardInterrupt), rep.task("epoch 2/3", total=10, unit="batch") as adv:
        adv(3)
        raise KeyboardInterrupt
    assert buf.getvalue().strip() == "epoch 2/3: 3/10 batch, stopped after 0.0 s"


# ------------------------------------------------------------------ real signals


def _cli_args(job: Path, model: Path, out: Path, epochs: int) -> list[str]:
    return [
        *("train", "--new-data", str(job / "new.jsonl"), "--old-data", str(job / "old.jsonl")),
        *("--model-path", str(model), "--output-path", str(out), "--epochs", str(epochs)),
        *("--batch-size", "8", "--lr", "3e-3", "--patience", "0", "--device", "cpu"),
    ]


def _ftctl(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "ftctl", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _signal_after_epoch_1(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    """Send ``sig`` once epoch 1 is done; return (stdout, stderr) of the whole run."""
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        lines.append(line)
        if re.match(r"epoch 1/\d+: .* in ", line):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines)
    out, err = proc.communicate(timeout=300)
    return out, "".join(lines) + err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_and_resume_finishes_the_same_run(sig, job, tiny_model_dir):
    epochs = 15
    out = job / f"signal-{sig}"
    proc = _ftctl(_cli_args(job, tiny_model_dir, out, epochs))
    _, err = _signal_after_epoch_1(proc, sig)
    assert proc.returncode == 130, err
    assert "checkpoint kept" in err and "run the same command with --resume" in err, err
    assert "Traceback" not in err
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert 1 <= state["epoch"] < epochs
    assert not (out / "final").exists()
    if sig != signal.SIGINT:
        return  # one resume comparison is enough
    resumed = _ftctl([*_cli_args(job, tiny_model_dir, out, epochs), "--resume", "--json"])
    doc, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads(doc)["epochs_run"] == epochs
    reference = job / "signal-reference"
    train(cfg(job, tiny_model_dir, reference, epochs=epochs))
    assert weights(out) == weights(reference)


def test_a_signal_with_checkpoint_none_says_nothing_was_kept(job, tiny_model_dir):
    out = job / "signal-none"
    proc = _ftctl([*_cli_args(job, tiny_model_dir, out, 15), "--checkpoint", "none"])
    _, err = _signal_after_epoch_1(proc, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "nothing was kept" in err
    assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------ --nproc 2 (gloo, CPU)


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory) -> Path:
    """A small base classifier that knows its 6 intents (so accuracies mean something)."""
    from tests.unit.test_base import build_small_base

    root = tmp_path_factory.mktemp("nproc")
    build_small_base(root)
    write_jsonl(root / "new.jsonl", synth(30, seed=21, labels=INTENTS[:6]))
    return root


@pytest.mark.slow
def test_nproc_2_on_cpu_matches_one_process(trained_base):
    root = trained_base
    base = root / "base" / "final"
    common = dict(new_data=root / "new.jsonl", old_data=root / "orig.jsonl", model_path=base)
    one = train(
        TrainConfig(
            **common,
            output_path=root / "one",
            lr=1e-3,
            epochs=2,
            patience=0,
            val_ratio=0.3,
            device="cpu",
        )
    )
    proc = _ftctl(
        [
            *(
                "train",
                "--new-data",
                str(root / "new.jsonl"),
                "--old-data",
                str(root / "orig.jsonl"),
            ),
            *("--model-path", str(base), "--output-path", str(root / "two"), "--lr", "1e-3"),
            *("--epochs", "2", "--patience", "0", "--val-ratio", "0.3", "--device", "cpu"),
            *("--nproc", "2", "--json"),
        ]
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    doc = json.loads(out)  # one document: rank 0's
    assert doc["processes"] == 2 and doc["epochs_run"] == 2
    assert abs(doc["val_accuracy"] - one.val_accuracy) <= 0.02
    assert doc["history"][0]["val_loss"] == pytest.approx(one.history[0]["val_loss"], rel=1e-6)
    m = read_manifest(root / "two" / "final")
    assert m["distributed"]["processes"] == 2 and m["distributed"]["backend"] == "gloo"
    assert m["plan"]["rows_per_step"] == 16
    before = load_file(base / "model.safetensors")
    after = load_file(root / "two" / "final" / "model.safetensors")
    frozen = [
        k for k in before if ".embeddings." in k or any(f".layer.{i}." in k for i in range(8))
    ]
    assert frozen and all(before[k].equal(after[k]) for k in frozen)
    assert any(not before[k].equal(after[k]) for k in before if ".layer.11." in k)
    model, _ = load_classifier(root / "two" / "final")
    assert model.config.num_labels == 6
    assert not (root / "two" / "checkpoints").exists()


def _nproc2_args(root: Path, out: Path, *more: str) -> list[str]:
    return [
        *("train", "--new-data", str(root / "new.jsonl"), "--old-data", str(root / "orig.jsonl")),
        *("--model-path", str(root / "base" / "final"), "--output-path", str(out)),
        *("--lr", "1e-3", "--epochs", "3", "--patience", "0", "--val-ratio", "0.3"),
        *("--batch-size", "4", "--device", "cpu", "--nproc", "2", *more),
    ]


@pytest.mark.slow
def test_nproc_2_resumed_mid_epoch_keeps_each_process_loss_sum(trained_base):
    """Two gloo processes stopped by SIGINT in the middle of epoch 2 (they agree on a step a
    multiple of 8 in): the checkpoint holds each process's own running loss, and --resume ends
    with the uninterrupted run's weights and train_loss in every epoch (before, every process
    got rank 0's sum)."""
    root = trained_base
    straight = _ftctl(_nproc2_args(root, root / "ddp-straight", "--json"))
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err
    expected = json.loads(out)["history"]
    stopped = root / "ddp-stopped"
    proc = _ftctl(_nproc2_args(root, stopped))
    ckpt_file = stopped / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not ckpt_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # epoch 1's checkpoint: the processes have just begun epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["batch"] > 0, (state["epoch"], state["batch"])
    sums = state["sums"]
    assert len(sums) == 2 and sums[0]["seen"] == sums[1]["seen"] > 0
    assert sums[0]["loss_sum"] != sums[1]["loss_sum"]  # each process's own rows
    resumed = _ftctl(_nproc2_args(root, stopped, "--resume", "--json"))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    got = json.loads(out)["history"]
    assert len(got) == len(expected) == 4 and got[0] == expected[0]  # epoch 0: the base
    for a, b in zip(got[1:], expected[1:], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), (a, b)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    assert weights(stopped) == weights(root / "ddp-straight")


def test_launcher_command_lines():
    from ftctl.train.distributed import torchrun_args

    one = torchrun_args(["train", "--nproc", "2"], nproc=2, nnodes=1, rdzv_endpoint=None)
    assert one[:4] == ["--nproc-per-node", "2", "--nnodes", "1"] and "--standalone" in one
    assert one[-5:] == ["-m", "ftctl", "train", "--nproc", "2"]
    two = torchrun_args(["train"], nproc=8, nnodes=2, rdzv_endpoint="node1:29400")
    assert two[two.index("--rdzv-endpoint") + 1] == "node1:29400"
    assert two[two.index("--rdzv-backend") + 1] == "c10d" and "--standalone" not in two
    res = runner.invoke(app, ["train", "--nnodes", "2", "--device", "cpu"])
    assert res.exit_code == ExitCode.USAGE and "rdzv_endpoint" in res.output


def test_shards_are_fixed_disjoint_and_equally_long():
    from ftctl.train.features import shard_rows

    lengths = [5, 9, 3, 7, 7, 2, 8]
    a = shard_rows(lengths, 0, 2, pad=True)
    b = shard_rows(lengths, 1, 2, pad=True)
    assert len(a) == len(b) == 4
    assert set(a) | set(b) == set(range(7)) and not set(a[:4]) & set(b[:3])
    assert shard_rows(lengths, 1, 2, pad=False) == b[:3]  # validation: no repeats
    assert shard_rows(lengths, 0, 1, pad=True) == list(range(7))


def test_nproc_without_torchrun_trains_in_one_process_and_says_so(job, tiny_model_dir):
    from ftctl.progress import NullReporter

    rep = NullReporter()
    result = train(cfg(job, tiny_model_dir, job / "nproc-lib", nproc=2, epochs=1), reporter=rep)
    assert result.processes == 1
    assert any("not started by torchrun" in w for w in rep.warnings)
