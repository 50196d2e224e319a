"""ftctl train: replay, freezing, labels, early stopping, output, manifest, determinism, resume,
bad inputs. Tiny real models (12 layers x hidden 32) built in fixtures; no mocks."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import TrainConfig
from ftctl.data.examples import Example
from ftctl.errors import DataError, ExitCode
from ftctl.manifest import read_manifest, verify_manifest
from ftctl.progress import NullReporter
from ftctl.train.finetune import train
from ftctl.train.mix import mix_data, replay_count, stratified_sample, stratified_split
from tests.helpers import INTENTS, make_tiny_model, write_jsonl

runner = CliRunner()

# one distinctive cue per intent, so a tiny model can learn something in a few steps
CUES = dict(
    zip(
        INTENTS,
        [
            *("在产批次", "原料批次", "帮我打卡", "今日出勤", "发货统计", "下班签退", "新建发货"),
            *("查库存", "质检记录", "设备状态", "生产计划", "查订单", "我要请假", "供应商"),
            *("产品溯源", "告警列表", "冷库温度", "生产日报", "原料入库", "排班表"),
        ],
        strict=True,
    )
)
FILL = "请帮我查看一下现在的情况吧麻烦你们这个那个"


def synth(n_per: int, seed: int = 0, labels=INTENTS) -> list[tuple[str, str]]:
    """``n_per`` distinct short sentences per label: filler + the label's cue + filler."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for lab in labels:
        cue = CUES.get(lab, "新意图")
        while sum(1 for _, lb in rows if lb == lab) < n_per:
            pre = "".join(rng.choice(FILL) for _ in range(rng.randint(0, 3)))
            post = "".join(rng.choice(FILL) for _ in range(rng.randint(0, 4)))
            text = pre + cue + post
            if text not in seen:
                seen.add(text)
                rows.append((text, lab))
    rng.shuffle(rows)
    return rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a loaded 2-core CI box, two spinning threads per process are ~10x
    slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """No line wrapping of messages that name long tmp paths."""
    from ftctl.cli import common

    monkeypatch.setattr(common.err, "width", 400)
    monkeypatch.setattr(common.out, "width", 400)


def write_job(root: Path) -> Path:
    """new (4 intents x 10) + old (8 intents x 12) data files in ``root``: a mix on which the
    tiny random base model (epoch 0) is beaten within two epochs."""
    write_jsonl(root / "new.jsonl", synth(10, seed=1, labels=INTENTS[:4]))
    write_jsonl(root / "old.jsonl", synth(12, seed=2, labels=INTENTS[:8]))
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_job(tmp_path_factory.mktemp("train"))


def cfg(work: Path, tiny_model_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        new_data=work / "new.jsonl",
        old_data=work / "old.jsonl",
        model_path=tiny_model_dir,
        output_path=out,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        patience=0,
        device="cpu",
    )
    return TrainConfig(**(base | kw))


def ex(text: str, label: str) -> Example:
    return Example(text, label)


# ------------------------------------------------------------------ replay + split


def test_replay_count_formula_and_cap():
    assert replay_count(100, 0.5, 1000) == 100  # 0.5: as many old as new
    assert replay_count(100, 0.75, 1000) == 300
    assert replay_count(100, 0.75, 50) == 50  # capped at what exists
    assert replay_count(100, 0.0, 1000) == 0


def test_stratified_sample_keeps_every_old_intent():
    old = [ex(f"{lab}{i}", lab) for lab in INTENTS for i in range(30 if lab == INTENTS[0] else 5)]
    got = stratified_sample(old, 40, seed=3)
    counts = Counter(e.label for e in got)
    assert len(got) == 40
    assert set(counts) == set(INTENTS)  # every old intent present
    assert counts[INTENTS[0]] > counts[INTENTS[1]]  # proportional to availability


def test_mix_records_counts_and_val_is_stratified():
    new = [ex(f"n{lab}{i}", lab) for lab in INTENTS[:4] for i in range(10)]
    old = [ex(f"o{lab}{i}", lab) for lab in INTENTS for i in range(6)]
    mix = mix_data(new, old, replay_ratio=0.5, val_ratio=0.1, seed=0)
    assert (mix.n_new, mix.n_replay, mix.n_old_available) == (40, 40, 120)
    assert sum(mix.replay_by_label.values()) == 40
    assert set(mix.replay_by_label) == set(INTENTS)
    assert len(mix.train) + len(mix.val) == 80
    assert {e.label for e in mix.val} == set(INTENTS)  # every label with >= 2 examples
    train_texts = {e.text for e in mix.train}
    assert not train_texts & {e.text for e in mix.val}


def test_split_is_deterministic_for_a_seed():
    data = [ex(f"t{i}", INTENTS[i % 3]) for i in range(30)]
    assert stratified_split(data, 0.2, 7) == stratified_split(data, 0.2, 7)


# ------------------------------------------------------------------ one full run, many checks


@pytest.fixture(scope="module")
def run(work, tiny_model_dir):
    out = work / "run1"
    result = train(cfg(work, tiny_model_dir, out))
    return out, result


def test_final_dir_is_a_plain_hf_directory(run):
    out, result = run
    final = out / "final"
    assert result.final_dir == final
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= names
    assert "manifest.json" in names
    assert not (out / "checkpoints").exists()  # removed once final/ is complete
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"]["0"] == INTENTS[0]
    assert config["label2id"][INTENTS[5]] == 5


def test_frozen_layers_are_bit_identical(run, tiny_model_dir):
    out, _ = run
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    frozen = [
        k for k in before if ".embeddings." in k or any(f".layer.{i}." in k for i in range(8))
    ]
    trained = [k for k in before if ".layer.11." in k or k.startswith("classifier")]
    assert frozen and trained
    assert all(before[k].equal(after[k]) for k in frozen)
    assert any(not before[k].equal(after[k]) for k in trained)


def test_manifest_contents(run, tiny_model_dir, work):
    out, _ = run
    m = read_manifest(out / "final")
    assert verify_manifest(out / "final") == []
    assert set(m["files"]) >= {"config.json", "model.safetensors", "vocab.txt"}
    assert "manifest.json" not in m["files"]
    from ftctl.fsutil import sha256_file

    assert m["base_model"]["sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert m["data"]["new"]["sha256"] == sha256_file(work / "new.jsonl")
    assert m["data"]["old"]["sha256"] == sha256_file(work / "old.jsonl")
    hp = m["hyperparameters"]
    assert (hp["epochs"], hp["batch_size"], hp["lr"], hp["freeze_layers"]) == (2, 8, 1e-3, 8)
    assert m["seed"] == 42
    assert set(m["packages"]) == {"ftctl", "torch", "transformers"}
    assert m["frozen"]["layers"] == 8 and m["frozen"]["verified_unchanged"] is True
    assert [r["epoch"] for r in m["metrics"]] == [0, 1, 2]  # 0: the base model
    assert m["improved_on_base"] is True and m["best"]["epoch"] > 0
    assert m["precision"] == {"requested": "auto", "used": "fp32", "tf32": False}
    assert m["plan"]["steps_per_epoch"] == 9  # ceil(70 train rows / 8)
    assert m["plan"]["early_stopping_possible"] is False  # --patience 0
    assert m["distributed"] == {"processes": 1}
    assert m["replay"]["replay"] == 40 and m["replay"]["new"] == 40
    assert sum(m["label_counts"]["train"].values()) + sum(m["label_counts"]["val"].values()) == 80
    assert m["device"] == "cpu"
    assert m["determinism"]["torch_deterministic_algorithms"] is True
    assert m["created_at"].endswith("Z")
    assert "git_commit" in m and "image_id" in m


def test_metrics_jsonl_has_every_evaluation(run):
    out, result = run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert lines == result.history
    assert lines[0]["train_loss"] is None  # epoch 0: the base model, scored before training
    assert all({"train_loss", "val_loss", "val_accuracy"} <= set(r) for r in lines)


def test_verify_manifest_detects_a_changed_file(run, tmp_path):
    out, _ = run
    copy = tmp_path / "final"
    shutil.copytree(out / "final", copy)
    (copy / "vocab.txt").write_text("x\n")
    assert verify_manifest(copy) == ["vocab.txt: sha256 differs"]


# ------------------------------------------------------------------ determinism + resume


def test_cpu_runs_are_byte_identical(run, work, tiny_model_dir):
    out, _ = run
    train(cfg(work, tiny_model_dir, work / "run2"))
    a = (out / "final" / "model.safetensors").read_bytes()
    b = (work / "run2" / "final" / "model.safetensors").read_bytes()
    assert a == b


def test_interrupted_and_resumed_equals_uninterrupted(run, work, tiny_model_dir):
    out, _ = run
    resumed = work / "resumed"

    def crash(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(work, tiny_model_dir, resumed), on_epoch_end=crash)
    assert not (resumed / "final").exists()  # final/ only when complete
    assert (resumed / "checkpoints" / "last.pt").is_file()
    result = train(cfg(work, tiny_model_dir, resumed), resume=True)
    assert result.manifest["resumed_from_epoch"] == 1
    a = (out / "final" / "model.safetensors").read_bytes()
    b = (resumed / "final" / "model.safetensors").read_bytes()
    assert a == b
    assert [r["epoch"] for r in result.history] == [0, 1, 2]


# ------------------------------------------------------------------ early stopping


def test_early_stopping_counts_from_the_base_model(work, tiny_model_dir):
    # an LR too small to move float32 weights: no epoch beats the base model (epoch 0)
    out = work / "early"
    rep = NullReporter()
    result = train(cfg(work, tiny_model_dir, out, epochs=5, lr=1e-30, patience=2), reporter=rep)
    assert result.stopped_early
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert [r["improved"] for r in result.history] == [None, False, False]
    assert result.best_epoch == 0 and result.summary()["improved_on_base"] is False
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    assert any("no epoch beat the base model" in w for w in rep.warnings)
    # the base model's weights are what final/ holds
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert all(before[k].equal(after[k]) for k in before)


def test_require_improvement_makes_no_improvement_an_error(work, tiny_model_dir, tmp_path):
    out = tmp_path / "strict"
    args = ["train", "--new-data", str(work / "new.jsonl"), "--model-path", str(tiny_model_dir)]
    args += ["--output-path", str(out), "--lr", "1e-30", "--epochs", "2", "--device", "cpu"]
    res = runner.invoke(app, [*args, "--require-improvement"])
    assert res.exit_code == ExitCode.ERROR, res.output
    assert "no epoch beat the base model" in res.output and "base: val acc" in res.output
    assert not (out / "final").exists()
    assert (out / "metrics.jsonl").is_file()  # every epoch's figures are kept
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "no epoch beat the base model" in res.output and (out / "final").is_dir()


def test_the_plan_says_when_patience_cannot_fire(work, tiny_model_dir, tmp_path):
    base = ["train", "--new-data", str(work / "new.jsonl"), "--model-path", str(tiny_model_dir)]
    base += ["--output-path", str(tmp_path / "o"), "--epochs", "1", "--device", "cpu"]
    res = runner.invoke(app, [*base, "--patience", "1"])
    assert res.exit_code == 0, res.output
    assert "early stopping cannot fire: --patience 1 needs more than 1 epochs" in res.output
    assert "epoch 0 (the base model): val_loss" in res.output
    assert read_manifest(tmp_path / "o" / "final")["plan"]["early_stopping_possible"] is False


def test_the_best_epochs_weights_are_saved(work, tiny_model_dir):
    from ftctl.data.examples import load_examples
    from ftctl.model.files import load_classifier
    from ftctl.train.features import Staged, encode, evaluate_sums, trainable_top

    out = work / "best"
    c = cfg(work, tiny_model_dir, out, epochs=4, lr=0.05)
    result = train(c)
    best = max(result.history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"]
    # re-evaluate the saved model on the same validation split: the best epoch's figures
    assert best["epoch"] > 0
    mix = mix_data(
        load_examples(c.new_data[0]),
        load_examples(c.old_data),
        replay_ratio=0.5,
        val_ratio=0.1,
        seed=42,
    )
    model, tok = load_classifier(out / "final")
    feats = encode(tok, mix.val, model.config.label2id, 64)
    loss_sum, correct, n = evaluate_sums(trainable_top(model, 0), Staged(feats, "cpu"))
    loss, acc = float(loss_sum) / n, int(correct) / n
    assert acc == best["val_accuracy"]
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)


# ------------------------------------------------------------------ labels


def test_unknown_label_is_an_error_naming_file_line(work, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [("帮我打卡", "CLOCK_IN"), ("新的东西", "BRAND_NEW")])
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "train",
            "--new-data",
            str(bad),
            "--model-path",
            str(tiny_model_dir),
            "--output-path",
            str(out),
        ],
    )
    assert res.exit_code == ExitCode.DATA
    assert f"{bad}:2" in res.output and "BRAND_NEW" in res.output and "--add-labels" in res.output
    assert not out.exists()


def test_add_labels_grows_head_keeping_old_rows(work, tiny_model_dir, tmp_path):
    new = tmp_path / "new.jsonl"
    write_jsonl(new, synth(8, seed=4, labels=(*INTENTS[:2], "BRAND_NEW")))
    out = tmp_path / "out"
    result = train(
        cfg(work, tiny_model_dir, out, new_data=new, add_labels=True, epochs=1, freeze_layers=12)
    )
    assert result.added_labels == ["BRAND_NEW"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"][str(len(INTENTS))] == "BRAND_NEW"
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    # all encoder layers frozen -> pooler + head trained; head rows of old labels: shape kept
    assert after["classifier.weight"].shape[0] == len(INTENTS) + 1
    assert before["classifier.weight"].shape[0] == len(INTENTS)


def test_grow_head_keeps_old_rows_exactly(tiny_model_dir):
    from ftctl.model.files import load_classifier
    from ftctl.train.layers import grow_head

    model, _ = load_classifier(tiny_model_dir)
    w = model.classifier.weight.detach().clone()
    b = model.classifier.bias.detach().clone()
    assert grow_head(model, ["CLOCK_IN", "X", "Y"]) == ["X", "Y"]
    assert model.classifier.weight[: len(INTENTS)].equal(w)
    assert model.classifier.bias[: len(INTENTS)].equal(b)
    assert model.config.id2label[len(INTENTS) + 1] == "Y"
    assert model.config.label2id["X"] == len(INTENTS)


# ------------------------------------------------------------------ CLI + bad inputs


def test_cli_seed_full_invocation_json(work, tiny_model_dir, tmp_path):
    out = tmp_path / "models" / "incremental"
    res = runner.invoke(
        app,
        [
            "train",
            "--new-data",
            str(work / "new.jsonl"),
            "--old-data",
            str(work / "old.jsonl"),
            "--model-path",
            str(tiny_model_dir),
            "--output-path",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--lr",
            "5e-6",
            "--replay-ratio",
            "0.5",
            "--freeze-layers",
            "8",
            "--device",
            "cpu",
            "--json",
        ],
        env={"FTCTL_IMAGE_ID": "sha256:abc"},
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and doc["replay"]["replay"] == 40 and doc["frozen_layers"] == 8
    assert read_manifest(out / "final")["image_id"] == "sha256:abc"


def test_cli_basic_invocation_warns_without_old_data(work, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "train",
            "--new-data",
            str(work / "new.jsonl"),
            "--model-path",
            str(tiny_model_dir),
            "--output-path",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "forgetting protection is reduced" in res.output
    assert (out / "final" / "manifest.json").is_file()
    assert read_manifest(out / "final")["replay"]["replay"] == 0


def test_config_file_values_are_used_and_flags_win(work, tiny_model_dir, tmp_path):
    toml = tmp_path / "ftctl.toml"
    toml.write_text(
        f'[train]\nnew_data = "{work / "new.jsonl"}"\nmodel_path = "{tiny_model_dir}"\n'
        f'output_path = "{tmp_path / "out"}"\nepochs = 1\nfreeze_layers = 11\ndevice = "cpu"\n'
    )
    res = runner.invoke(app, ["-c", str(toml), "train", "--freeze-layers", "10", "--json"])
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "out" / "final")
    assert m["hyperparameters"]["epochs"] == 1  # from the file
    assert m["frozen"]["layers"] == 10  # the flag wins


def _invoke_bad(args: list[str], out: Path):
    res = runner.invoke(app, ["train", *args, "--output-path", str(out), "--device", "cpu"])
    assert not out.exists(), "a failed run must write nothing"
    assert "Traceback" not in res.output
    return res


def test_bad_inputs_give_clear_errors_and_write_nothing(work, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    model = ["--model-path", str(tiny_model_dir)]
    new = ["--new-data", str(work / "new.jsonl")]

    res = _invoke_bad(["--new-data", str(tmp_path / "missing.jsonl"), *model], out)
    assert res.exit_code == ExitCode.DATA and "file not found" in res.output

    res = _invoke_bad([*new, "--old-data", str(tmp_path / "nope.csv"), *model], out)
    assert res.exit_code == ExitCode.DATA and "nope.csv" in res.output

    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    res = _invoke_bad([*new, "--model-path", str(no_config)], out)
    assert res.exit_code == ExitCode.ERROR and "no config.json" in res.output

    res = _invoke_bad([*new, *model, "--freeze-layers", "13"], out)
    assert res.exit_code == ExitCode.USAGE and "only 12 layers" in res.output

    unk = tmp_path / "unk.jsonl"
    write_jsonl(unk, [("ｘｙｚ", "CLOCK_IN"), ("☃☃", "CLOCK_OUT")])  # every char [UNK]
    res = _invoke_bad(["--new-data", str(unk), *model], out)
    assert res.exit_code == ExitCode.DATA and "no usable examples" in res.output

    res = _invoke_bad([*new, *model, "--replay-ratio", "1.5"], out)
    assert res.exit_code == ExitCode.USAGE and "train.replay_ratio" in res.output

    res = runner.invoke(
        app, ["train", *new, *model, "--output-path", str(tiny_model_dir.parent), "--epochs", "1"]
    )
    assert res.exit_code == ExitCode.USAGE and "would replace the base model" in res.output

    res = _invoke_bad(model, out)
    assert res.exit_code == ExitCode.USAGE and "--new-data is required" in res.output


def test_non_bert_model_is_a_clear_error(tmp_path, work):
    model_dir = tmp_path / "gpt"
    make_tiny_model(model_dir, hidden=32, layers=2)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_dir / "config.json").write_text(json.dumps(config))
    res = _invoke_bad(
        ["--new-data", str(work / "new.jsonl"), "--model-path", str(model_dir)], tmp_path / "out"
    )
    assert (
        res.exit_code == ExitCode.ERROR and "gpt2" in res.output and "not supported" in res.output
    )


def test_data_without_a_validation_example_is_refused():
    # one example per intent: the split has no validation set (metrics would be NaN)
    with pytest.raises(DataError, match="nothing to validate on") as info:
        mix_data([ex("甲", INTENTS[0]), ex("乙", INTENTS[1])], [], replay_ratio=0.0,
                 val_ratio=0.1, seed=0)  # fmt: skip
    assert info.value.hint
