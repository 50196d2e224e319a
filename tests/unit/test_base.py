"""ftctl base: a 12-layer char-level Chinese BERT from scratch that ftctl train accepts as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.errors import ExitCode
from ftctl.manifest import read_manifest, verify_manifest
from ftctl.model.files import load_classifier
from ftctl.train.base import BaseConfig, build_base
from tests.helpers import INTENTS, write_jsonl
from tests.unit.test_train import synth

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_small_base(root: Path):
    """root/orig.jsonl (6 intents x 15) and root/base/final trained on it (it learns them)."""
    data = write_jsonl(root / "orig.jsonl", synth(15, seed=9, labels=INTENTS[:6]))
    cfg = BaseConfig(
        data=data,
        output_path=root / "base",
        epochs=8,
        hidden_size=32,
        batch_size=8,
        lr=3e-3,
        device="cpu",
    )
    return build_base(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return root, build_small_base(root)


def test_base_writes_a_12_layer_char_bert_with_manifest(built):
    root, result = built
    final = root / "base" / "final"
    assert result.final_dir == final
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["num_hidden_layers"] == 12
    assert config["vocab_size"] > 20_900  # every CJK ideograph + ASCII + punctuation
    assert sorted(config["label2id"]) == sorted(INTENTS[:6])
    assert (final / "vocab.txt").is_file()
    m = read_manifest(final)
    assert m["kind"] == "base" and verify_manifest(final) == []
    assert [r["epoch"] for r in m["metrics"]] == list(range(9))  # 0: the random initial model
    assert not (root / "base" / "checkpoints").exists()  # base has no --resume: none kept


def test_base_learns_the_easy_synthetic_task(built):
    _, result = built
    assert result.val_accuracy >= 0.8


def test_base_is_deterministic(built, tmp_path):
    root, _ = built
    cfg = BaseConfig(
        data=root / "orig.jsonl",
        output_path=tmp_path / "again",
        epochs=8,
        hidden_size=32,
        batch_size=8,
        lr=3e-3,
        device="cpu",
    )
    build_base(cfg)
    a = (root / "base" / "final" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "final" / "model.safetensors").read_bytes()


def test_train_accepts_the_base_model_unchanged(built, tmp_path):
    root, _ = built
    new = write_jsonl(tmp_path / "new.jsonl", synth(6, seed=11, labels=INTENTS[:2]))
    out = tmp_path / "inc"
    res = runner.invoke(
        app,
        [
            "train",
            "--new-data",
            str(new),
            "--old-data",
            str(root / "orig.jsonl"),
            "--model-path",
            str(root / "base" / "final"),
            "--output-path",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    model, _ = load_classifier(out / "final")
    assert model.config.num_hidden_layers == 12
    assert read_manifest(out / "final")["frozen"]["layers"] == 8


def test_cli_base_json_and_bad_input(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synth(4, seed=1, labels=INTENTS[:3]))
    res = runner.invoke(
        app,
        [
            "base",
            "--data",
            str(data),
            "--output-path",
            str(tmp_path / "b"),
            "--epochs",
            "1",
            "--hidden-size",
            "32",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["final_dir"] == str(tmp_path / "b" / "final")
    res = runner.invoke(
        app,
        ["base", "--data", str(tmp_path / "missing.jsonl"), "--output-path", str(tmp_path / "x")],
    )
    assert res.exit_code == ExitCode.DATA
    assert not (tmp_path / "x").exists()
    res = runner.invoke(
        app,
        ["base", "--data", str(data), "--output-path", str(tmp_path / "y"), "--hidden-size", "40"],
    )
    assert res.exit_code == ExitCode.USAGE
