"""``ftctl base``: train a small char-level Chinese BERT classifier from scratch.

chinese-roberta-wwm-ext cannot be downloaded here, so the demo and the tests start from this
stand-in: the same class (BertForSequenceClassification), the same files, 12 layers (so
``--freeze-layers 8`` means what it means in production), a small hidden size and a vocab of
every CJK ideograph + ASCII + punctuation (~21k, like the real model's 21128).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftctl.clock import utc_iso
from ftctl.config import TrainConfig
from ftctl.data.examples import load_examples
from ftctl.errors import ConfigError, Problem
from ftctl.fsutil import sha256_file
from ftctl.manifest import git_commit, package_versions
from ftctl.model.inference import resolve_device
from ftctl.progress import NULL, Reporter
from ftctl.train.features import encode
from ftctl.train.fit import Setup, fit
from ftctl.train.mix import mix_data
from ftctl.train.numerics import numerics
from ftctl.train.output import TrainResult, hyperparameters, write_final

LAYERS = 12
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# --------------------------------------------------------------------------- building the model


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
    import tempfile

    import transformers
    from transformers import BertTokenizerFast

    options = {"do_lower_case": False, "tokenize_chinese_chars": True, "strip_accents": False}
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 trap: vocab_file= is silently ignored; pass the dict itself.
        return BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, **options)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4 reads a vocab.txt file
        path = Path(tmp) / "vocab.txt"
        path.write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(path), **options)


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


# --------------------------------------------------------------------------- training it


@dataclass(frozen=True)
class BaseConfig:
    """Options of ``ftctl base`` (defaults reach ~full accuracy on the demo data in < 2 min)."""

    data: Path | None = None  # training data (.jsonl / .csv)
    output_path: Path | None = None  # OUTPUT/final/ is written here
    epochs: int = 6  # from scratch needs more epochs than a fine-tune (demo data: ~99% at 4)
    lr: float = 2e-3  # tiny deep nets from scratch need a high LR (with warmup)
    batch_size: int = 32
    hidden_size: int = 64  # heads = hidden_size // 32
    seed: int = 42
    device: str = "auto"
    max_length: int = 64
    val_ratio: float = 0.1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01

    def problems(self) -> list[Problem]:
        out = []
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                out.append(Problem("must be >= 1", field=f"base.{name}"))
        if not self.lr > 0:
            out.append(Problem("must be > 0", field="base.lr"))
        if self.hidden_size < 32 or self.hidden_size % 32:
            out.append(Problem("must be a multiple of 32", field="base.hidden_size"))
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(Problem("must be auto, cpu or cuda", field="base.device"))
        if not 0 < self.val_ratio < 1:
            out.append(Problem("must be in (0, 1)", field="base.val_ratio"))
        return out


def build_base(
    cfg: BaseConfig, *, reporter: Reporter = NULL, stop: Callable[[], bool] | None = None
) -> TrainResult:
    """Train the stand-in base classifier on ``cfg.data``; write ``cfg.output_path``/final/.
    ``stop``: as for :func:`ftctl.train.finetune.train`."""
    started = time.perf_counter()
    reporter.stage("checking inputs")
    if cfg.data is None or cfg.output_path is None:
        raise ConfigError("--data and --output-path are required")
    examples = load_examples(cfg.data, what="training data")
    labels = sorted({ex.label for ex in examples})  # same ids however the file is ordered
    device = resolve_device(cfg.device)
    vocab = cjk_vocab(ex.text for ex in examples)
    tokenizer = build_char_tokenizer(vocab)
    model = build_classifier(
        labels,
        len(vocab),
        hidden_size=cfg.hidden_size,
        num_layers=LAYERS,
        num_heads=max(1, cfg.hidden_size // 32),
        intermediate_size=cfg.hidden_size * 4,
        max_position=512,
        seed=cfg.seed,
    ).to(device)
    mix = mix_data(examples, [], replay_ratio=0.0, val_ratio=cfg.val_ratio, seed=cfg.seed)
    reporter.info(
        f"base: {len(labels)} labels, vocab {len(vocab)}, {LAYERS} layers x {cfg.hidden_size}, "
        f"{len(mix.train)} train / {len(mix.val)} val, device {device}"
    )
    label2id = {lab: i for i, lab in enumerate(labels)}
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        patience=0,
        freeze_layers=0,
        replay_ratio=0.0,
        val_ratio=cfg.val_ratio,
        max_length=cfg.max_length,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        device=device,
        precision="fp32",
    )
    out_dir = Path(cfg.output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with numerics(device) as det:
        reporter.stage("training")
        train_feats = encode(tokenizer, mix.train, label2id, cfg.max_length)
        val_feats = encode(tokenizer, mix.val, label2id, cfg.max_length)
        setup = Setup(device, out_dir, checkpoints=False, reporter=reporter, stop=stop)
        result = fit(model, train_feats, val_feats, tcfg, n_frozen=0, setup=setup)

    reporter.stage("writing the model")
    model.to("cpu").eval()
    payload = {
        "kind": "base",
        "created_at": utc_iso(),
        "base_model": None,
        "data": {"train": {"path": str(cfg.data), "sha256": sha256_file(cfg.data)}},
        "hyperparameters": {
            **hyperparameters(tcfg),
            "hidden_size": cfg.hidden_size,
            "layers": LAYERS,
            "vocab_size": len(vocab),
        },
        "seed": cfg.seed,
        "labels": labels,
        "label_counts": {
            "train": dict(sorted(Counter(ex.label for ex in mix.train).items())),
            "val": dict(sorted(Counter(ex.label for ex in mix.val).items())),
        },
        "replay": mix.counts(),
        "frozen": {"layers": 0, "of": LAYERS, "embeddings": False, "params": 0},
        "metrics": result.history,
        "best": result.best,
        "device": device,
        "determinism": det,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "image_id": None,
    }
    final, manifest = write_final(out_dir, model, tokenizer, payload)
    return TrainResult.of(
        result,
        mix,
        final_dir=final,
        manifest=manifest,
        frozen_layers=0,
        added_labels=[],
        device=device,
        elapsed_s=time.perf_counter() - started,
    )
