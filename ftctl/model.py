"""Load, save and build BERT-family sequence classifiers (chinese-roberta-wwm-ext is a BERT).

A model directory is a plain Hugging Face directory (config.json with id2label/label2id,
model.safetensors, tokenizer files) plus ``vocab.txt`` (older transformers' slow BertTokenizer
needs it; transformers 5's save_pretrained no longer writes it) and, for ftctl outputs,
``manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ftctl.errors import ModelError

SUPPORTED_TYPES = ("bert", "roberta")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODEL_FILES = ("config.json",)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory, with clear errors."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(
            f"{model_dir}: model directory not found",
            hint="pass the directory that holds config.json and model.safetensors",
        )
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ModelError(
            f"{model_dir}: no config.json: not a Hugging Face model directory",
            hint="point at the final/ directory written by save_pretrained (or `ftctl base`)",
        )
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{cfg}: not valid JSON: {exc}") from None


def read_labels(model_dir: str | Path) -> list[str]:
    """The label space (id order) from config.json's id2label, without loading weights."""
    cfg = read_config(model_dir)
    id2label = cfg.get("id2label")
    if not id2label:
        raise ModelError(f"{model_dir}/config.json has no id2label: not a classifier")
    try:
        pairs = sorted((int(k), v) for k, v in id2label.items())
    except ValueError:
        raise ModelError(f"{model_dir}/config.json: id2label keys must be integers") from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ModelError(f"{model_dir}/config.json: id2label ids are not 0..{len(pairs) - 1}")
    return [v for _, v in pairs]


def check_supported(model_dir: str | Path) -> dict[str, Any]:
    cfg = read_config(model_dir)
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_TYPES:
        raise ModelError(
            f"{model_dir}: model_type '{mtype}' is not supported",
            hint="ftctl fine-tunes BERT-family classifiers (bert, roberta), "
            "e.g. chinese-roberta-wwm-ext",
        )
    return cfg


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file()):
        raise ModelError(
            f"{model_dir}: no tokenizer files (tokenizer.json or vocab.txt)",
            hint="save the tokenizer beside the model (tokenizer.save_pretrained)",
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelError(f"{model_dir}: cannot load the tokenizer: {exc}") from exc


def load_classifier(model_dir: str | Path, *, device: str = "cpu"):
    """(model, tokenizer) from a local directory; the model in eval mode on ``device``."""
    from transformers import AutoModelForSequenceClassification

    check_supported(model_dir)
    read_labels(model_dir)
    tokenizer = load_tokenizer(model_dir)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), local_files_only=True
        )
    except Exception as exc:
        raise ModelError(f"{model_dir}: cannot load the model weights: {exc}") from exc
    model.to(device).eval()
    return model, tokenizer


def write_vocab_txt(tokenizer, out_dir: Path) -> None:
    """Write vocab.txt (id order) beside tokenizer.json, for older slow BertTokenizers."""
    from ftctl.fsutil import atomic_write_text

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    atomic_write_text(out_dir / "vocab.txt", "".join(t + "\n" for t in tokens))


def save_classifier(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) + tokenizer + vocab.txt into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "vocab.txt").exists():
        write_vocab_txt(tokenizer, out_dir)
    return out_dir


# --------------------------------------------------------------------------- building


def cjk_vocab(extra_text: Iterable[str] = ()) -> list[str]:
    """A char-level Chinese vocab: specials, ASCII, CJK punctuation, all CJK unified ideographs
    (U+4E00..U+9FFF) and any other character in ``extra_text``. Deterministic order."""
    chars: list[str] = [chr(c) for c in range(0x21, 0x7F)]
    # WordPiece continuations so ASCII words and numbers ("A12", "2024") are not [UNK]
    chars += [f"##{chr(c)}" for c in range(0x30, 0x7B) if chr(c).isalnum()]
    chars += list("，。！？、；：“”‘’（）【】《》…—～·「」『』")
    chars += [chr(c) for c in range(0x4E00, 0xA000)]
    known = set(chars)
    extra = sorted({ch for t in extra_text for ch in t if not ch.isspace() and ch not in known})
    return [*SPECIAL_TOKENS, *chars, *extra]


def build_char_tokenizer(vocab: Sequence[str]):
    """A fast BERT tokenizer over ``vocab`` (char-level for Chinese; no lower-casing)."""
    from transformers import BertTokenizerFast

    # transformers 5 trap: vocab_file= is silently ignored; pass the dict itself.
    return BertTokenizerFast(
        vocab={tok: i for i, tok in enumerate(vocab)},
        do_lower_case=False,
        tokenize_chinese_chars=True,
        strip_accents=False,
    )


def build_classifier(
    labels: Sequence[str],
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 12,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position: int = 128,
    seed: int = 0,
):
    """A randomly initialised BertForSequenceClassification with the given label space."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)
