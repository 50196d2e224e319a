"""ftctl.train.layers: structure, freezing, head growing, the split (cached-prefix) forward."""

from __future__ import annotations

import pytest
import torch

from ftctl.errors import ConfigError, ModelError
from ftctl.model.files import load_classifier, save_classifier
from ftctl.train import layers as M
from tests.helpers import INTENTS


@pytest.fixture()
def loaded(tiny_model_dir):
    return load_classifier(tiny_model_dir)


def test_layer_count_and_frozen_names(loaded):
    model, _ = loaded
    assert M.layer_count(model) == 12
    names = M.frozen_param_names(model, 8)
    assert any(".embeddings." in n for n in names)
    assert any(".layer.7." in n for n in names)
    assert not any(".layer.8." in n or n.startswith("classifier") for n in names)
    assert M.frozen_param_names(model, 0) == []


def test_freeze_sets_requires_grad_and_eval_mode(loaded):
    model, _ = loaded
    model.train()
    frozen = set(M.freeze(model, 8))
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in frozen)
    base = M.base_module(model)
    assert not base.embeddings.training and not base.encoder.layer[7].training
    assert base.encoder.layer[8].training and model.classifier.training


def test_freeze_more_layers_than_the_model_has_is_an_error(loaded):
    model, _ = loaded
    with pytest.raises(ConfigError, match="only 12 encoder layers"):
        M.freeze(model, 13)


def test_non_bert_model_has_no_base_module():
    with pytest.raises(ModelError, match="not a BERT-family"):
        M.base_module(torch.nn.Linear(2, 2))


def test_split_forward_equals_the_full_model(loaded):
    model, tok = loaded
    enc = tok(["帮我打卡", "查看在产批次今天的情况"], padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**enc).logits
        hidden = M.prefix_forward(model, enc["input_ids"], 8, enc["attention_mask"])
        split = M.head_forward(model, hidden, enc["attention_mask"], 8)
        # the cached way: the short text's prefix computed alone (no padding), then padded
        alone = M.prefix_forward(model, tok(["帮我打卡"], return_tensors="pt")["input_ids"], 8)
        padded = torch.zeros_like(hidden[:1])
        padded[0, : alone.shape[1]] = alone[0]
        cached = M.head_forward(model, torch.cat([padded, hidden[1:]]), enc["attention_mask"], 8)
    assert torch.allclose(full, split, atol=1e-5)
    assert torch.allclose(full, cached, atol=1e-5)


def test_grow_head_updates_label_maps(loaded):
    model, _ = loaded
    w = model.classifier.weight.detach().clone()
    assert M.grow_head(model, ["NEW_A"]) == ["NEW_A"]
    assert model.config.num_labels == len(INTENTS) + 1
    assert model.classifier.weight.shape == (len(INTENTS) + 1, w.shape[1])
    assert model.classifier.weight[: len(INTENTS)].equal(w)
    assert M.grow_head(model, ["NEW_A", INTENTS[0]]) == []  # nothing new: unchanged


def test_saved_directory_keeps_vocab_txt(loaded, tmp_path):
    model, tok = loaded
    out = tmp_path / "m"
    saved = save_classifier(model, tok, out)
    assert (out / "vocab.txt").is_file() and (out / "tokenizer.json").is_file()
    assert saved["files"] == ["model.safetensors"] and saved["dtype"] == "float32"
    again, _ = load_classifier(out)
    assert again.config.id2label[0] == INTENTS[0]


def test_cls_only_last_layer_equals_the_full_model(loaded):
    model, tok = loaded
    enc = tok(["帮我打卡", "查看在产批次今天的情况"], padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**enc).logits
        for start in (0, 8, 11):
            hidden = M.prefix_forward(model, enc["input_ids"], start, enc["attention_mask"])
            got = M.head_forward(model, hidden, enc["attention_mask"], start, cls_only=True)
            assert torch.allclose(full, got, atol=1e-5)


def test_split_forward_works_for_roberta_too():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=1,
    )
    model = RobertaForSequenceClassification(config).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        hidden = M.prefix_forward(model, ids, 2, mask)
        got = M.head_forward(model, hidden, mask, 2, cls_only=True)
    assert M.layer_count(model) == 4
    assert torch.allclose(full, got, atol=1e-5)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"config.json": b"{"}, "not valid JSON"),
        ({"model.safetensors": b"garbage"}, "cannot load the model weights"),
        ({"config.json": b'{"model_type": "bert", "id2label": {"a": "X"}}'}, "must be integers"),
    ],
)
def test_damaged_model_directory_errors_carry_a_hint(tiny_model_dir, tmp_path, damage, message):
    import shutil

    model_dir = tmp_path / "final"
    shutil.copytree(tiny_model_dir, model_dir)
    for name, data in damage.items():
        (model_dir / name).write_bytes(data)
    with pytest.raises(ModelError, match=message) as info:
        load_classifier(model_dir)
    assert info.value.hint and "damaged" in info.value.hint
