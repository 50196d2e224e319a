"""Test helpers shared by unit and integration tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

from pathlib import Path

from ftctl.data import Example, write_examples
from ftctl.demo import DEMO_INTENTS

# The 20 intents of the demo domain (shared/INTENTS.md), in catalog order.
INTENTS = DEMO_INTENTS


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Write (text, label) rows as a JSONL data file."""
    return write_examples(path, [Example(t, lab) for t, lab in rows])


def make_tiny_model(
    out_dir: Path, labels=INTENTS, *, hidden: int = 32, layers: int = 12, seed: int = 0
) -> Path:
    """A tiny random-weight char-level BertForSequenceClassification saved as a HF directory."""
    from ftctl.model import build_char_tokenizer, build_classifier, cjk_vocab, save_classifier

    vocab = cjk_vocab()
    tok = build_char_tokenizer(vocab)
    model = build_classifier(
        list(labels),
        len(vocab),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=2,
        intermediate_size=hidden * 2,
        seed=seed,
    )
    save_classifier(model, tok, out_dir)
    return out_dir
