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

from ftctl.errors import ConfigError, EnvironmentProblem, ModelError

SUPPORTED_TYPES = ("bert", "roberta")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODEL_FILES = ("config.json",)
_DAMAGED = (
    "the model directory is damaged or incomplete: copy it again (or re-run `ftctl train` / "
    "`ftctl base`); its manifest.json lists the sha256 of every file"
)


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
        raise ModelError(f"{cfg}: not valid JSON: {exc}", hint=_DAMAGED) from None


def read_labels(model_dir: str | Path) -> list[str]:
    """The label space (id order) from config.json's id2label, without loading weights."""
    cfg = read_config(model_dir)
    id2label = cfg.get("id2label")
    if not id2label:
        raise ModelError(
            f"{model_dir}/config.json has no id2label: not a classifier",
            hint="pass a sequence-classification model (config.json with id2label/label2id)",
        )
    try:
        pairs = sorted((int(k), v) for k, v in id2label.items())
    except ValueError:
        raise ModelError(
            f"{model_dir}/config.json: id2label keys must be integers", hint=_DAMAGED
        ) from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ModelError(
            f"{model_dir}/config.json: id2label ids are not 0..{len(pairs) - 1}", hint=_DAMAGED
        )
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
        raise ModelError(f"{model_dir}: cannot load the tokenizer: {exc}", hint=_DAMAGED) from exc


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
        raise ModelError(
            f"{model_dir}: cannot load the model weights: {exc}", hint=_DAMAGED
        ) from exc
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


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem(
            "--device cuda, but torch sees no CUDA GPU",
            hint="use --device cpu (or auto), or run inside the training image with --gpus",
        )
    return device


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


# --------------------------------------------------------------------------- structure


def base_module(model):
    """The encoder stack of a BERT-family classifier (``model.bert`` / ``model.roberta``)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        raise ModelError(
            f"{type(model).__name__} is not a BERT-family classifier (no embeddings/encoder)",
            hint="ftctl fine-tunes BERT-family classifiers (bert, roberta)",
        )
    return base


def layer_count(model) -> int:
    """Number of transformer layers in the encoder."""
    return len(base_module(model).encoder.layer)


def frozen_modules(model, n_layers: int) -> list:
    """The modules ``freeze`` freezes: embeddings + the first ``n_layers`` layers (none for 0)."""
    if n_layers <= 0:
        return []
    base = base_module(model)
    return [base.embeddings, *base.encoder.layer[:n_layers]]


def frozen_param_names(model, n_layers: int) -> list[str]:
    """state_dict names of every parameter that ``freeze`` freezes, in model order."""
    ids = {id(p) for m in frozen_modules(model, n_layers) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def freeze(model, n_layers: int) -> list[str]:
    """Freeze the embeddings and the first ``n_layers`` encoder layers (``0`` freezes nothing).

    The frozen modules are put in eval mode (no dropout), so their output for a text is fixed and
    can be cached. Returns the frozen parameter names. ``n_layers`` above the model's layer
    count is an error.
    """
    total = layer_count(model)
    if n_layers > total:
        raise ConfigError(
            f"--freeze-layers {n_layers}: the model has only {total} encoder layers",
            hint=f"use --freeze-layers between 0 and {total} (the seed's 8 is for 12-layer models)",
        )
    if n_layers < 0:
        raise ConfigError(f"--freeze-layers {n_layers}: must be >= 0")
    for module in frozen_modules(model, n_layers):
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen_param_names(model, n_layers)


def set_train_mode(model, n_frozen: int) -> None:
    """model.train() but keep the frozen prefix in eval mode (dropout off there)."""
    model.train()
    for module in frozen_modules(model, n_frozen):
        module.eval()


def grow_head(model, labels: Sequence[str]) -> list[str]:
    """Append ``labels`` the classifier lacks as new output rows; old rows are kept exactly.

    Updates config id2label/label2id/num_labels. Returns the labels added (in order).
    """
    import torch

    old = [model.config.id2label[i] for i in range(model.config.num_labels)]
    new = [lab for lab in dict.fromkeys(labels) if lab not in old]
    if not new:
        return []
    head = _final_linear(model)
    n_old, n_all = head.out_features, head.out_features + len(new)
    grown = torch.nn.Linear(head.in_features, n_all, bias=head.bias is not None)
    grown.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        std = getattr(model.config, "initializer_range", 0.02)
        torch.nn.init.normal_(grown.weight, std=std)
        grown.weight[:n_old] = head.weight
        if head.bias is not None:
            grown.bias.zero_()
            grown.bias[:n_old] = head.bias
    _set_final_linear(model, grown)
    every = [*old, *new]
    model.config.num_labels = n_all
    model.config.id2label = dict(enumerate(every))
    model.config.label2id = {lab: i for i, lab in enumerate(every)}
    if hasattr(model, "num_labels"):
        model.num_labels = n_all
    return new


def _final_linear(model):
    head = model.classifier
    return head.out_proj if hasattr(head, "out_proj") else head  # roberta: a small MLP head


def _set_final_linear(model, linear) -> None:
    if hasattr(model.classifier, "out_proj"):
        model.classifier.out_proj = linear
    else:
        model.classifier = linear


# --------------------------------------------------------------------------- split forward


def additive_mask(attention_mask, dtype):
    """[B, L] 0/1 mask -> [B, 1, 1, L] additive float mask (eager and sdpa attention accept it)."""
    import torch

    ext = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def run_layers(model, hidden, attention_mask, start: int, stop: int | None = None):
    """Run encoder layers ``[start:stop]`` on ``hidden`` ([B, L, H]); mask [B, L] or None."""
    layers = base_module(model).encoder.layer
    ext = None if attention_mask is None else additive_mask(attention_mask, hidden.dtype)
    for layer in layers[start:stop]:
        out = layer(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
    return hidden


def prefix_forward(model, input_ids, n_layers: int, attention_mask=None):
    """Embeddings + the first ``n_layers`` layers: the frozen part's output ([B, L, H])."""
    base = base_module(model)
    hidden = base.embeddings(input_ids=input_ids)
    return run_layers(model, hidden, attention_mask, 0, n_layers)


def cls_only_supported(model) -> bool:
    """The last layer can be run for the [CLS] position alone (absolute positions, encoder)."""
    cfg = model.config
    return (
        getattr(cfg, "position_embedding_type", "absolute") == "absolute"
        and not getattr(cfg, "is_decoder", False)
        and cfg._attn_implementation in ("eager", "sdpa")
    )


def cls_layer_forward(layer, hidden, attention_mask):
    """A BERT layer's output at position 0 only ([B, 1, H]): what the pooler/head read.

    Keys and values still come from every position; the query, the attention output and the
    feed-forward run for one token instead of L (~5/6 of the layer's work saved). Same math as
    the full layer's row 0."""
    import torch.nn.functional as F

    att = layer.attention.self
    b, length, _ = hidden.shape
    nh, hd = att.num_attention_heads, att.attention_head_size
    cls = hidden[:, :1]
    q = att.query(cls).view(b, 1, nh, hd).transpose(1, 2)
    k = att.key(hidden).view(b, length, nh, hd).transpose(1, 2)
    v = att.value(hidden).view(b, length, nh, hd).transpose(1, 2)
    mask = None if attention_mask is None else additive_mask(attention_mask, hidden.dtype)
    ctx = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=att.dropout.p if layer.training else 0.0
    )
    ctx = ctx.transpose(1, 2).reshape(b, 1, nh * hd)
    attended = layer.attention.output(ctx, cls)  # dense, dropout, LayerNorm(x + cls)
    return layer.output(layer.intermediate(attended), attended)


def head_forward(model, hidden, attention_mask, start: int, cls_only: bool = False):
    """Layers ``[start:]`` + pooler + classifier on a prefix output: the logits ([B, labels]).

    ``cls_only`` runs the last layer for the [CLS] position alone (see cls_layer_forward)."""
    n = layer_count(model)
    if cls_only and start < n and cls_only_supported(model):
        hidden = run_layers(model, hidden, attention_mask, start, n - 1)
        hidden = cls_layer_forward(base_module(model).encoder.layer[n - 1], hidden, attention_mask)
    else:
        hidden = run_layers(model, hidden, attention_mask, start)
    if model.config.model_type == "roberta":
        return model.classifier(hidden)
    base = base_module(model)
    pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))
