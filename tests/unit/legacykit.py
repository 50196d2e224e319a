"""A model directory as the user's own script wrote it with an older transformers, and data
for it (tests/unit/test_userdata.py).

Older stacks save ``pytorch_model.bin`` (``torch.save`` of the state dict), the slow
BertTokenizer's ``vocab.txt`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` (no
``tokenizer.json``), a ``training_args.bin`` beside them, often fp16 weights and sometimes the
generic ``LABEL_i`` names.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.helpers import INTENTS
from tests.unit.evalkit import KEYWORDS, SHAPES

FILL = "请帮我查看一下现在的情况吧麻烦你们这个那个"
# what transformers 4.x wrote for a BertTokenizer (save_pretrained)
TOKENIZER_CONFIG = {
    "cls_token": "[CLS]",
    "do_basic_tokenize": True,
    "do_lower_case": True,
    "mask_token": "[MASK]",
    "model_max_length": 512,
    "never_split": None,
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "strip_accents": None,
    "tokenize_chinese_chars": True,
    "tokenizer_class": "BertTokenizer",
    "unk_token": "[UNK]",
}
SPECIAL_TOKENS_MAP = {
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "unk_token": "[UNK]",
}
LEGACY_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def rows(n_per: int, seed: int, labels=INTENTS) -> list[tuple[str, str]]:
    """``n_per`` distinct short texts per label: filler + the label's keyword + filler."""
    rng = random.Random(seed)
    cue = dict(zip(INTENTS, KEYWORDS, strict=True))
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lab in labels:
        k = 0
        while k < n_per:
            text = (
                "".join(rng.choice(FILL) for _ in range(rng.randint(0, 3)))
                + cue[lab]
                + "".join(rng.choice(FILL) for _ in range(rng.randint(0, 4)))
            )
            if text not in seen:
                seen.add(text)
                out.append((text, lab))
                k += 1
    rng.shuffle(out)
    return out


def vocab() -> list[str]:
    """A small char vocab (fast to load) covering every text these tests use."""
    from ftctl.train.base import SPECIAL_TOKENS

    chars = set(FILL + "".join(KEYWORDS) + "".join(SHAPES) + "补卡漏打上班今天帮我") - {"{", "}"}
    ascii_ = [chr(c) for c in range(0x21, 0x7F)]
    return [*SPECIAL_TOKENS, *ascii_, *sorted(chars - set(ascii_))]


def make_legacy_model(
    out_dir: Path,
    labels=INTENTS,
    *,
    dtype: str = "float16",
    generic: bool = False,
    hidden: int = 32,
    layers: int = 12,
    seed: int = 0,
    model=None,
) -> Path:
    """Write ``out_dir`` the old way; ``model`` (a trained one) or a random BERT classifier."""
    import torch

    from ftctl.train.base import build_classifier

    out_dir.mkdir(parents=True)
    words = vocab()
    if model is None:
        model = build_classifier(
            list(labels), len(words), hidden_size=hidden, num_layers=layers, num_heads=2,
            intermediate_size=hidden * 2, max_position=128, seed=seed,
        )  # fmt: skip
    model = model.to(getattr(torch, dtype))
    torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    config = model.config.to_dict()
    config.pop("dtype", None)
    names = [f"LABEL_{i}" for i in range(len(labels))] if generic else list(labels)
    config |= {
        "architectures": ["BertForSequenceClassification"],
        "torch_dtype": dtype,
        "transformers_version": "4.30.2",
        "id2label": {str(i): lab for i, lab in enumerate(names)},
        "label2id": {lab: i for i, lab in enumerate(names)},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in words), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP) + "\n")
    torch.save({"learning_rate": 2e-5, "num_train_epochs": 3}, out_dir / "training_args.bin")
    return out_dir


def slow_bert_tokenizer(vocab_file: Path):
    """The slow WordPiece BertTokenizer an older stack builds from vocab.txt alone
    (transformers 5 keeps it as BertTokenizerLegacy; 4.x calls it BertTokenizer)."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:  # transformers 4
        from transformers import BertTokenizer as Slow
    return Slow(vocab_file=str(vocab_file), do_lower_case=True)
