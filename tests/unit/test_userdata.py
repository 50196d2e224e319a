"""The user's own live model and data (issue 12): an older model directory kept intact, fp32
training of fp16 weights, relabels across files, generic LABEL_i names and label maps.

Every model here is a real tiny BERT written the way an older transformers wrote it
(tests/unit/legacykit.py) and fine-tuned by the real `ftctl train`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftctl.cli.main import app
from ftctl.config import TrainConfig
from ftctl.data.examples import Example
from ftctl.errors import DataError, ExitCode, ModelError
from ftctl.manifest import read_manifest, verify_manifest
from ftctl.model.files import (
    load_classifier,
    save_classifier,
    save_formats,
    stored_dtype,
    weight_formats,
)
from ftctl.model.inference import predict
from ftctl.model.labels import read_label_map, resolve_labels
from ftctl.train.finetune import train
from ftctl.train.mix import mix_data
from tests.helpers import INTENTS, write_jsonl
from tests.unit.legacykit import (
    LEGACY_TOKENIZER_FILES,
    make_legacy_model,
    rows,
    slow_bert_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
SAMPLES = ["帮我打卡", "查看在产批次今天的情况", "ABC库存", "请问冷库温度呢"]
TRAINED = "bert.encoder.layer.11.attention.self.query.weight"
FROZEN = "bert.encoder.layer.3.attention.self.query.weight"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """An fp16 legacy model (20 intents) + new (4 intents x 10) and old (20 x 6) data."""
    root = tmp_path_factory.mktemp("userdata")
    make_legacy_model(root / "legacy")
    write_jsonl(root / "new.jsonl", rows(10, seed=1, labels=INTENTS[:4]))
    write_jsonl(root / "old.jsonl", rows(6, seed=2))
    return root


def cfg(work: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        new_data=work / "new.jsonl",
        old_data=work / "old.jsonl",
        model_path=work / "legacy",
        output_path=out,
        epochs=2,
        batch_size=8,
        lr=5e-6,  # the seed's lr: its updates round away in fp16
        patience=0,
        device="cpu",
    )
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def legacy_run(work):
    out = work / "run"
    return out / "final", train(cfg(work, out))


# ------------------------------------------------------------------ keep the user's files


def test_tokenizer_files_come_out_byte_identical_and_nothing_new(legacy_run, work):
    final, _ = legacy_run
    for name in LEGACY_TOKENIZER_FILES:
        assert (final / name).read_bytes() == (work / "legacy" / name).read_bytes(), name
    names = {p.name for p in final.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "manifest.json",
        *LEGACY_TOKENIZER_FILES,
    }  # fmt: skip  (no tokenizer.json the old stack never had, no training_args.bin)
    assert verify_manifest(final) == []


def test_output_loads_with_the_slow_and_the_auto_tokenizer(legacy_run, work):
    from transformers import AutoTokenizer

    final, _ = legacy_run
    before = AutoTokenizer.from_pretrained(str(work / "legacy"))(SAMPLES)["input_ids"]
    auto = AutoTokenizer.from_pretrained(str(final))(SAMPLES)["input_ids"]
    slow = slow_bert_tokenizer(final / "vocab.txt")(SAMPLES)["input_ids"]
    assert auto == before == slow
    assert all(ids.count(1) == 0 for ids in auto[:2])  # [UNK] is 1: the vocab was really read


def test_weights_in_the_inputs_format_and_dtype(legacy_run, work):
    final, result = legacy_run
    bin_sd = torch.load(final / "pytorch_model.bin", weights_only=True)
    st_sd = load_file(final / "model.safetensors")
    input_sd = torch.load(work / "legacy" / "pytorch_model.bin", weights_only=True)
    assert set(bin_sd) == set(st_sd) == set(input_sd)
    assert all(torch.equal(bin_sd[k], st_sd[k]) for k in bin_sd)
    assert {t.dtype for t in bin_sd.values() if t.is_floating_point()} == {torch.float16}
    config = json.loads((final / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert result.manifest["weights"] | {} == {
        "files": ["model.safetensors", "pytorch_model.bin"], "format": "auto",
        "dtype": "float16", "input_dtype": "float16", "input_files": ["bin"],
        "train_dtype": "float32", "tokenizer_files_copied": list(LEGACY_TOKENIZER_FILES),
    }  # fmt: skip


def test_an_older_stack_loads_the_bin_as_it_always_did(legacy_run):
    """What transformers 4.x does with pytorch_model.bin: build the model from config.json,
    torch.load the state dict, load it strictly."""
    from transformers import BertConfig, BertForSequenceClassification

    final, _ = legacy_run
    old = BertForSequenceClassification(BertConfig.from_json_file(str(final / "config.json")))
    old.load_state_dict(torch.load(final / "pytorch_model.bin", weights_only=True), strict=True)
    new, tok = load_classifier(final, dtype="float32")
    enc = tok(SAMPLES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(old.eval()(**enc).logits, new(**enc).logits, atol=1e-5)
    assert old.config.id2label[0] == INTENTS[0]


def test_fp16_weights_are_saved_back_in_fp16_and_frozen_ones_bit_for_bit(legacy_run, work):
    final, result = legacy_run
    before = torch.load(work / "legacy" / "pytorch_model.bin", weights_only=True)
    after = load_file(final / "model.safetensors")
    assert after[TRAINED].dtype == torch.float16
    assert torch.equal(after[FROZEN], before[FROZEN])  # frozen: bit for bit
    assert result.manifest["weights"]["train_dtype"] == "float32"


def test_fp16_weights_are_trained_in_fp32_so_a_tiny_lr_still_moves_them(work, tmp_path):
    """A random model does not beat itself (epoch 0) at lr 5e-6, so final/ keeps the base
    weights; the weights the loop trained are the checkpoint's, taken after epoch 1."""
    from ftctl.train.fit import Interrupted

    epochs_done: list[dict] = []
    with pytest.raises(Interrupted):
        train(
            cfg(work, tmp_path / "run", epochs=3),
            on_epoch_end=epochs_done.append,
            stop=lambda: bool(epochs_done),
        )
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    trained = state["trainable"][TRAINED]
    assert trained.dtype == torch.float32
    w = torch.load(work / "legacy" / "pytorch_model.bin", weights_only=True)[TRAINED]
    # an Adam step moves a weight by about lr: for these weights a 5e-6 step rounds away in
    # fp16, so fp16 training could never move them...
    stuck = w + torch.tensor(5e-6, dtype=torch.float16) == w
    assert stuck.float().mean() > 0.2
    # ...yet the fp32 loop moved nearly all of them
    moved = trained != w.float()
    assert moved[stuck].float().mean() > 0.9
    assert FROZEN not in state["trainable"]  # the checkpoint holds only the trainable part


def test_every_file_and_the_directory_are_readable_by_others(legacy_run):
    final, _ = legacy_run
    assert oct(final.stat().st_mode & 0o777) == "0o755"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in final.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes


def test_save_format_and_dtype_flags(work, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        ["train", "--new-data", str(work / "new.jsonl"), "--old-data", str(work / "old.jsonl"),
         "--model-path", str(work / "legacy"), "--output-path", str(out), "--epochs", "1",
         "--device", "cpu", "--save-format", "safetensors", "--save-dtype", "float32", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    final = out / "final"
    assert not (final / "pytorch_model.bin").exists()
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    weights = read_manifest(final)["weights"]
    assert (weights["files"], weights["dtype"]) == (["model.safetensors"], "float32")
    assert read_manifest(final)["hyperparameters"]["save_format"] == "safetensors"
    bad = runner.invoke(app, ["train", "--save-format", "pickle", "--new-data", "x.jsonl"])
    assert bad.exit_code == ExitCode.USAGE and "train.save_format" in flat(bad.output)


def test_bin_only_output_still_loads(work, tmp_path):
    final = train(cfg(work, tmp_path / "o", epochs=1, save_format="bin")).final_dir
    assert {p.name for p in final.glob("*.bin")} == {"pytorch_model.bin"}
    assert not (final / "model.safetensors").exists()
    model, _ = load_classifier(final)
    assert model.config.id2label[3] == INTENTS[3]


def test_eval_compares_the_output_with_the_fp16_live_model(legacy_run, work, tmp_path):
    from ftctl.fsutil import sha256_file
    from tests.unit.evalkit import pool_rows, write_pool

    final, _ = legacy_run
    pool = write_pool(tmp_path / "pool.jsonl", pool_rows(3))
    res = runner.invoke(
        app,
        ["eval", "--model", str(final), "--baseline", str(work / "legacy"), "--test-data",
         str(pool), "--device", "cpu", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["baseline"]["weights_sha256"] == sha256_file(work / "legacy" / "pytorch_model.bin")
    assert doc["gate"]["verdict"] == "PASS"  # a tiny lr on a random model changes little
    assert [s["status"] for s in doc["leakage"]["sources"]] == ["checked", "checked"]


def test_stored_dtype_and_formats_are_read_from_the_files(work, tiny_model_dir):
    assert stored_dtype(work / "legacy") == "float16"
    assert weight_formats(work / "legacy") == ["bin"]
    assert stored_dtype(tiny_model_dir) == "float32"
    assert weight_formats(tiny_model_dir) == ["safetensors"]
    assert save_formats("auto", work / "legacy") == ["safetensors", "bin"]
    assert save_formats("auto", tiny_model_dir) == ["safetensors"]


# ------------------------------------------------------------------ generic labels


def test_generic_labels_are_refused_for_training_and_add_labels(tmp_path, work):
    generic = make_legacy_model(tmp_path / "generic", generic=True, layers=2)
    base = ["train", "--new-data", str(work / "new.jsonl"), "--model-path", str(generic),
            "--output-path", str(tmp_path / "out"), "--device", "cpu",
            "--freeze-layers", "0"]  # fmt: skip
    for extra in ([], ["--add-labels"]):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == ExitCode.ERROR, res.output
        out = flat(res.output)
        assert "20 of its 20 labels are generic (LABEL_0, LABEL_1" in out
        assert "--label-map" in out and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_a_label_map_names_generic_labels(tmp_path, work, kind):
    generic = make_legacy_model(tmp_path / "generic", generic=True, layers=2)
    if kind == "json":
        label_map = tmp_path / "labels.json"
        label_map.write_text(json.dumps({f"LABEL_{i}": lab for i, lab in enumerate(INTENTS)}))
    else:
        label_map = tmp_path / "labels.csv"
        lines = "".join(f"{i},{lab}\n" for i, lab in enumerate(INTENTS))
        label_map.write_text("id,intent\n" + lines)
    result = train(
        cfg(work, tmp_path / "out", model_path=generic, freeze_layers=0, epochs=1,
            label_map=label_map)
    )  # fmt: skip
    config = json.loads((result.final_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(20)] == list(INTENTS)
    assert result.added_labels == []
    assert result.manifest["label_map"]["path"] == str(label_map)
    assert result.manifest["labels"] == list(INTENTS)


def test_label_map_problems_are_named_with_their_lines(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("id,intent\n0,A\n0,B\nx,C\n2,A\n")
    with pytest.raises(DataError) as info:
        read_label_map(bad)
    text = str(info.value.message)
    assert "m.csv:3: id 0 named twice" in text
    assert "m.csv:4: id 'x' is not a number" in text
    assert "m.csv:5: intent 'A' given to ids 0 and 2" in text
    assert "missing [1]" in text
    wrong_size = tmp_path / "m.json"
    wrong_size.write_text('{"0": "A", "1": "B"}')
    generic = make_legacy_model(tmp_path / "g", generic=True, layers=1)
    with pytest.raises(DataError, match=r"names 2 ids, but .* has 20 outputs"):
        resolve_labels(generic, wrong_size)
    with pytest.raises(ModelError, match="generic"):
        resolve_labels(generic)


def test_validate_labels_says_the_same(tmp_path, work):
    generic = make_legacy_model(tmp_path / "g", generic=True, layers=1)
    args = ["data", "validate", str(work / "new.jsonl"), "--labels", str(generic)]
    res = runner.invoke(app, args)
    assert res.exit_code == ExitCode.ERROR and "generic" in flat(res.output)
    assert "--label-map" in flat(res.output)
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps(list(INTENTS)))
    res = runner.invoke(app, [*args, "--label-map", str(label_map)])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ relabels across files


def test_reconciled_data_never_puts_one_text_in_train_and_validation():
    from ftctl.data.reconcile import reconcile

    new = [Example(f"文本{i}", INTENTS[i % 2]) for i in range(20)]
    old = [Example(f"文本{i}", INTENTS[i % 2]) for i in range(10)]  # the same rows again
    old += [Example(f"旧{i}", INTENTS[i % 3]) for i in range(30)]
    n, o, rec = reconcile(new, old)
    assert len(rec.duplicates) == 10 and not rec.relabelled and len(o) == 30
    mix = mix_data(n, o, replay_ratio=0.5, val_ratio=0.3, seed=0)
    assert not {e.text for e in mix.train} & {e.text for e in mix.val}


@pytest.fixture(scope="module")
def relabel(tmp_path_factory, tiny_model_dir):
    """A base model trained to call 补卡 texts CLOCK_IN; new data relabels them
    ATTENDANCE_TODAY (plus a few copies of old rows)."""
    from tests.unit.evalkit import train_tiny

    root = tmp_path_factory.mktemp("relabel")
    bu = ["补卡", "帮我补卡", "我要补卡", "补卡一下", "麻烦补卡", "请帮我补卡", "现在补卡",
          "补卡吧", "补卡呢", "今天补卡"]  # fmt: skip
    old = rows(8, seed=3) + [(t, "CLOCK_IN") for t in bu]
    base = train_tiny(
        root / "base", [{"text": t, "label": lab} for t, lab in old], tiny_model_dir,
        steps=150, lr=3e-3,
    )  # fmt: skip
    known = {t for t, _ in old}
    extra = [r for r in rows(6, seed=4, labels=INTENTS[2:4]) if r[0] not in known]
    new = [(t, "ATTENDANCE_TODAY") for t in bu] + extra + old[:5]  # old[:5]: the same rows
    write_jsonl(root / "old.jsonl", old)
    write_jsonl(root / "new.jsonl", new)
    return root, base, bu


def test_a_relabelled_text_takes_the_new_label(relabel):
    root, base, bu = relabel
    model, tok = load_classifier(base)
    before, _ = predict(model, tok, bu)
    assert before.count("CLOCK_IN") >= 8  # the live model really says CLOCK_IN
    res = runner.invoke(
        app,
        ["train", "--new-data", str(root / "new.jsonl"), "--old-data", str(root / "old.jsonl"),
         "--model-path", str(base), "--output-path", str(root / "out"), "--freeze-layers", "0",
         "--lr", "2e-3", "--epochs", "6", "--patience", "0", "--replay-ratio", "0.5",
         "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = flat(res.output)
    assert "10 old row(s) relabelled by the new data (the new label wins)" in out
    assert "'补卡' CLOCK_IN -> ATTENDANCE_TODAY" in out
    assert "5 old row(s) repeated in the new data with the same label" in out
    final = root / "out" / "final"
    overlap = read_manifest(final)["data_overlap"]
    assert (overlap["relabelled"], overlap["duplicates"]) == (10, 5)
    assert {r["text"] for r in overlap["relabelled_rows"]} == set(bu)
    assert read_manifest(final)["replay"]["old_available"] == 20 * 8 + 10 - 10 - 5
    model, tok = load_classifier(final)
    after, _ = predict(model, tok, bu)
    assert "CLOCK_IN" not in after  # the old label is gone for these texts
    assert after.count("ATTENDANCE_TODAY") >= 8


def test_validate_reports_relabels_and_duplicates_across_files(relabel):
    root, _, _ = relabel
    new, old = root / "new.jsonl", root / "old.jsonl"
    res = runner.invoke(app, ["data", "validate", str(new), str(old), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["across_files"] == {"relabels": 10, "duplicates": 5}
    old_problems = next(f for f in doc["files"] if f["file"] == str(old))["problems"]
    relabels = [p for p in old_problems if p["message"].startswith("relabelled")]
    assert len(relabels) == 10 and all(p["severity"] == "warning" for p in relabels)
    assert f"'ATTENDANCE_TODAY' in {new}:1" in relabels[0]["message"]
    strict = runner.invoke(app, ["data", "validate", str(new), str(old), "--strict"])
    assert strict.exit_code == ExitCode.DATA
    assert "across files: 10 relabel(s), 5 duplicate(s)" in flat(strict.output)


def test_an_input_without_vocab_txt_gets_one_and_keeps_its_tokenizer_json(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "in"
    shutil.copytree(tiny_model_dir, src)
    (src / "vocab.txt").unlink()
    model, tok = load_classifier(src)
    saved = save_classifier(model, tok, tmp_path / "out", like=src)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        src / "tokenizer.json"
    ).read_bytes()
    assert "vocab.txt" not in saved["tokenizer_files_copied"]
    assert (
        slow_bert_tokenizer(tmp_path / "out" / "vocab.txt")(SAMPLES[:2])["input_ids"]
        == tok(SAMPLES[:2])["input_ids"]
    )
