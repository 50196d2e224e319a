"""The GPU paths of ftctl train, run on the CPU through the same code: no host read inside a
step, batches staged on the device once, --grad-accum (4 x 2 trains as 8; a stop during an
accumulation resumes exactly), the frozen-prefix cache placed before it is built (GPU under a
budget, else pinned CPU memory streamed per batch; the spill path trains bit for bit as the
resident one), and CUDA out-of-memory injected into a step (the seed's advice and the exact
command). Tiny real models; the only stand-ins are the free-memory figures and the injected
error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.errors import ExitCode, TrainError
from ftctl.manifest import read_manifest
from ftctl.progress import NullReporter
from ftctl.train import features
from ftctl.train import finetune as train_mod
from ftctl.train import fit as fit_mod
from ftctl.train import layers as M
from ftctl.train.features import CachePlan, place_cache, to_device
from ftctl.train.finetune import train
from ftctl.train.fit import Interrupted
from ftctl.train.numerics import is_cuda_oom
from tests.unit.test_train import cfg as train_cfg
from tests.unit.test_train import one_thread, wide_console, write_job  # noqa: F401 (autouse)

runner = CliRunner()
GB = 10**9


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return write_job(tmp_path_factory.mktemp("device"))


def cfg(job: Path, model: Path, out: Path, **kw):
    return train_cfg(job, model, out, **({"lr": 3e-3} | kw))


def trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture
def no_dropout(monkeypatch):
    """The model train builds, with every dropout off (p = 0): batches that add up to the same
    rows then give the same gradients, whatever their split."""
    real = train_mod.build_model

    def build(*args, **kw):
        built = real(*args, **kw)
        for module in built.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return built

    monkeypatch.setattr(train_mod, "build_model", build)


# ------------------------------------------------------------------ --grad-accum


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("frozen", [8, 0], ids=["cached-prefix", "whole-model"])
def test_grad_accum_4x2_trains_as_batch_8(job, tiny_model_dir, no_dropout, frozen):
    """Same optimizer steps per epoch, same schedule, the loss a mean over the step's 8 rows:
    the weights of batch 4 x accumulation 2 match batch 8 within float rounding, and much
    closer than batch 4 alone does."""
    base = load_file(tiny_model_dir / "model.safetensors")
    runs = {}
    for name, bs, accum in (("8", 8, 1), ("4x2", 4, 2), ("4", 4, 1)):
        out = job / f"accum-{frozen}-{name}"
        result = train(cfg(job, tiny_model_dir, out, freeze_layers=frozen, batch_size=bs,
                           grad_accum=accum))  # fmt: skip
        runs[name] = (result, trained(out), read_manifest(out / "final")["plan"])
    big, acc, small = runs["8"], runs["4x2"], runs["4"]
    assert acc[2]["steps_per_epoch"] == big[2]["steps_per_epoch"] == 9  # 66 rows / 8
    assert small[2]["steps_per_epoch"] == 17
    assert acc[2]["rows_per_step"] == 8 and acc[2]["grad_accum"] == 2
    assert acc[0].history[-1]["step"] == big[0].history[-1]["step"]
    assert _max_diff(big[1], base) > 1e-3  # it trained
    close = _max_diff(acc[1], big[1])
    assert close < 1e-5, close
    assert _max_diff(small[1], big[1]) > 100 * close
    for a, b in zip(acc[0].history[1:], big[0].history[1:], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_a_stop_during_an_accumulation_lands_on_a_step_and_resumes_exactly(
    job, tiny_model_dir, monkeypatch
):
    """The stop request arrives after the 7th micro-batch (the first half of step 4): the
    accumulation finishes, the checkpoint holds 4 whole steps (never half-summed gradients),
    and --resume ends byte-identical to an uninterrupted run."""
    c = cfg(job, tiny_model_dir, job / "accum-stop", batch_size=4, grad_accum=2, epochs=2)
    reference = job / "accum-straight"
    train(dataclasses.replace(c, output_path=reference))
    micro = {"n": 0}
    real = train_mod.build_model

    def counting(*args, **kw):
        built = real(*args, **kw)

        def count(module, inputs):
            if module.training:
                micro["n"] += 1

        built.model.classifier.register_forward_pre_hook(count)
        return built

    monkeypatch.setattr(train_mod, "build_model", counting)
    with pytest.raises(Interrupted) as info:
        train(c, stop=lambda: micro["n"] >= 7)
    assert micro["n"] == 8  # the accumulation was finished, nothing more
    assert (info.value.epoch, info.value.batch) == (0, 4)
    state = torch.load(info.value.checkpoint, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 4, 4)
    monkeypatch.setattr(train_mod, "build_model", real)
    result = train(c, resume=True)
    assert result.manifest["resumed_at_batch"] == 4
    assert (c.output_path / "final" / "model.safetensors").read_bytes() == (
        reference / "final" / "model.safetensors"
    ).read_bytes()


def test_grad_accum_below_one_is_refused(job, tiny_model_dir, tmp_path):
    args = ["train", "--new-data", str(job / "new.jsonl"), "--model-path", str(tiny_model_dir)]
    res = runner.invoke(app, [*args, "--output-path", str(tmp_path), "--grad-accum", "0"])
    assert res.exit_code == ExitCode.USAGE and "train.grad_accum" in res.output


# ------------------------------------------------------------------ no host sync in a step


def test_a_step_reads_nothing_back_from_the_device_and_copies_nothing_to_it(
    job, tiny_model_dir, monkeypatch
):
    """On CUDA every read of a tensor's value on the host (item, float, bool, tolist...) and
    every tensor made from host data waits for the GPU. Inside the steps there are none: the
    batches are cut from what was staged once (labels, lengths, ids or prefix rows, the
    epoch's row order), and the loss is read at most once a second, outside the step."""
    inside = {"on": False}
    seen: list[str] = []

    def spy(name, real):
        def wrapper(*args, **kw):
            if inside["on"]:
                seen.append(name)
            return real(*args, **kw)

        return wrapper

    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, spy(f"torch.{name}", getattr(torch, name)))
    monkeypatch.setattr(features, "to_device", spy("to_device", features.to_device))
    real_step = fit_mod._step

    def step(*args, **kw):
        inside["on"] = True
        try:
            return real_step(*args, **kw)
        finally:
            inside["on"] = False

    steps = []
    monkeypatch.setattr(fit_mod, "_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    for frozen, accum in ((8, 1), (0, 2)):
        train(cfg(job, tiny_model_dir, job / f"nosync-{frozen}", freeze_layers=frozen,
                  batch_size=4, grad_accum=accum))  # fmt: skip
    assert len(steps) > 10
    assert seen == []


class _Recorder:
    """Stands for a CPU tensor: records what :func:`to_device` does with it."""

    def __init__(self) -> None:
        self.calls: list = []

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", device, non_blocking))
        return self


def test_host_data_reaches_a_gpu_through_pinned_memory_without_blocking():
    t = _Recorder()
    assert to_device(t, "cuda:1") is t
    assert t.calls == ["pin_memory", ("to", "cuda:1", True)]
    cpu = _Recorder()
    assert to_device(cpu, "cpu") is cpu and cpu.calls == []


# ------------------------------------------------------------------ the prefix cache


def test_cache_placement_from_the_free_memory():
    """A pure decision on given free-memory figures (here: 100k rows x 20 tokens x 768)."""
    texts, tokens, hidden = 100_000, 2_000_000, 768
    need = (tokens + 1) * hidden * 4  # ~6.1 GB
    big = place_cache(texts, tokens, hidden, cuda=True, budget=None, gpu_free=40 * GB,
                      host_free=100 * GB)  # fmt: skip
    assert (big.where, big.nbytes, big.budget) == ("device", need, 20 * GB)
    assert "on the GPU" in big.text() and "6.14 GB" in big.text()
    small = place_cache(texts, tokens, hidden, cuda=True, budget=None, gpu_free=8 * GB,
                        host_free=100 * GB)  # fmt: skip
    assert small.where == "pinned" and not small.on_device
    assert "in pinned CPU memory, streamed to the GPU per batch" in small.text()
    assert "over the budget" in small.text()
    named = place_cache(texts, tokens, hidden, cuda=True, budget=8 << 30, gpu_free=8 * GB,
                        host_free=100 * GB)  # fmt: skip
    assert named.where == "device"  # --cache-budget 8g overrides half of the free memory
    zero = place_cache(texts, tokens, hidden, cuda=True, budget=0, gpu_free=80 * GB,
                       host_free=100 * GB)  # fmt: skip
    assert zero.where == "pinned"  # --cache-budget 0: always CPU memory
    cpu = place_cache(texts, tokens, hidden, cuda=False, budget=None, gpu_free=None,
                      host_free=100 * GB)  # fmt: skip
    assert cpu.where == "cpu" and "in CPU memory" in cpu.text()
    with pytest.raises(TrainError) as info:
        place_cache(texts * 10, tokens * 10, hidden, cuda=True, budget=None, gpu_free=8 * GB,
                    host_free=40 * GB)  # fmt: skip
    assert "61.44 GB" in info.value.message and "--max-length" in info.value.hint


def test_the_spilled_cache_trains_bit_for_bit_as_the_resident_one(job, tiny_model_dir, monkeypatch):
    """The cache placed in (pinned) CPU memory: every batch is gathered on the host and copied
    to the device; the result is the resident cache's, byte for byte, and the plan says where
    the cache is and how big."""
    resident = job / "cache-resident"
    train(cfg(job, tiny_model_dir, resident))
    real = train_mod.cache_placement
    streamed = []

    def spilled(*args, **kw) -> CachePlan:
        return dataclasses.replace(real(*args, **kw), where="pinned", reason="test: spilled")

    monkeypatch.setattr(train_mod, "cache_placement", spilled)
    real_streamed = features.Staged._streamed
    monkeypatch.setattr(
        features.Staged,
        "_streamed",
        lambda self, *a: streamed.append(1) or real_streamed(self, *a),
    )
    infos: list[str] = []
    rep = NullReporter()
    rep.info = infos.append
    out = job / "cache-spilled"
    train(cfg(job, tiny_model_dir, out), reporter=rep)
    assert streamed  # every batch of the spilled cache came through the host
    weights = "final/model.safetensors"
    assert (out / weights).read_bytes() == (resident / weights).read_bytes()
    plan = read_manifest(out / "final")["plan"]
    assert plan["cache"]["where"] == "pinned"
    assert "in pinned CPU memory, streamed to the GPU per batch" in plan["text"]
    assert plan["cache"]["bytes"] == (plan["cache"]["tokens"] + 1) * 32 * 4  # hidden 32, fp32
    assert any(line.startswith("frozen-prefix cache") for line in infos)


def test_the_plan_says_where_the_cache_is_and_a_cache_too_big_is_refused(
    job, tiny_model_dir, tmp_path, monkeypatch
):
    args = ["train", "--new-data", str(job / "new.jsonl"), "--old-data", str(job / "old.jsonl")]
    args += ["--model-path", str(tiny_model_dir), "--epochs", "1", "--device", "cpu"]
    res = runner.invoke(app, [*args, "--output-path", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert "frozen-prefix cache" in res.output and "in CPU memory" in res.output
    monkeypatch.setattr(train_mod, "host_free_memory", lambda: 1000)  # 1 kB available
    res = runner.invoke(app, [*args, "--output-path", str(tmp_path / "no")])
    assert res.exit_code == ExitCode.ERROR, res.output
    assert "the frozen-prefix cache needs" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "no" / "final").exists()


# ------------------------------------------------------------------ CUDA out of memory


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.11 GiB of which 1.06 GiB is free."
        ),
        RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_cuda_out_of_memory_in_a_step_names_it_and_gives_the_exact_command(
    job, tiny_model_dir, tmp_path, monkeypatch, error
):
    """The error is raised inside the 3rd training step's forward: exit 1, no traceback, the
    step and the batch size named, the seed's advice, and the same command with
    --batch-size 4 --grad-accum 2 (the same effective batch on half the memory)."""
    real = M.head_forward
    calls = {"n": 0}

    def head(model, *args, **kw):
        if torch.is_grad_enabled():  # a training step (evaluation runs under no_grad)
            calls["n"] += 1
            if calls["n"] == 3:
                raise error
        return real(model, *args, **kw)

    monkeypatch.setattr(M, "head_forward", head)
    out = tmp_path / "oom"
    args = ["train", "--new-data", str(job / "new.jsonl"), "--model-path", str(tiny_model_dir)]
    args += ["--output-path", str(out), "--batch-size", "8", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == ExitCode.ERROR, res.output
    text = " ".join(res.output.split())
    assert "GPU 内存不足 (CUDA out of memory) at optimizer step 3 (epoch 1, batch 3)" in text
    assert "--batch-size 8" in text and "--freeze-layers" in text
    rest = " ".join(a for a in args[1:] if a not in ("--batch-size", "8"))
    assert f"ftctl train --batch-size 4 --grad-accum 2 {rest}" in text
    assert "Traceback" not in res.output
    assert not (out / "final").exists()
    calls["n"] = 0
    doc = runner.invoke(app, [*args, "--json"]).stdout
    import json

    err = json.loads(doc)
    assert err["error"] == "OutOfMemory" and "--grad-accum 2" in err["hint"]


def test_only_cuda_out_of_memory_is_explained():
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_cuda_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_cuda_oom(MemoryError())


def test_the_retry_command_replaces_batch_size_and_grad_accum_wherever_they_are(monkeypatch):
    from ftctl.cli.train import retry_command

    monkeypatch.delenv("FTCTL_HOST_PATHS", raising=False)
    args = ["--config", "a b.toml", "train", "--batch-size=16", "--grad-accum", "2", "--lr", "1"]
    assert retry_command(args, 8, 4) == (
        "ftctl --config 'a b.toml' train --batch-size 8 --grad-accum 4 --lr 1"
    )
    monkeypatch.setenv("FTCTL_HOST_PATHS", "{}")  # inside --docker: the user's command has it
    assert retry_command(["train"], 4, 2) == "ftctl train --batch-size 4 --grad-accum 2 --docker"


def test_cuda_out_of_memory_while_caching_the_prefix_says_so(
    job, tiny_model_dir, tmp_path, monkeypatch
):
    def prefix(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")

    monkeypatch.setattr(M, "prefix_forward", prefix)
    args = ["train", "--new-data", str(job / "new.jsonl"), "--model-path", str(tiny_model_dir)]
    res = runner.invoke(app, [*args, "--output-path", str(tmp_path / "o"), "--device", "cpu"])
    assert res.exit_code == ExitCode.ERROR, res.output
    text = " ".join(res.output.split())
    assert "GPU 内存不足 (CUDA out of memory) while caching the frozen prefix" in text
    assert "--cache-budget" in text and "Traceback" not in res.output
