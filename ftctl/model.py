"""Load, save and build BERT-family sequence classifiers (chinese-roberta-wwm-ext is a BERT).

A model directory is a plain Hugging Face directory (config.json with id2label/label2id,
model.safetensors, tokenizer files) plus ``vocab.txt`` (older transformers' slow BertTokenizer
needs it; transformers 5's save_pretrained no longer writes it) and, for ftctl outputs,
``manifest.json``.

The user's own model directory may come from an older stack: ``pytorch_model.bin`` instead of
safetensors, ``vocab.txt`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` instead of
``tokenizer.json``, fp16 weights, generic ``LABEL_i`` names. :func:`save_classifier` with
``like=`` that directory keeps its tokenizer files byte for byte and writes its weight format
and dtype; :func:`resolve_labels` refuses generic names unless a label map names them.
"""

from __future__ import annotations

import csv
import io
import json
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ftctl.errors import ConfigError, DataError, EnvironmentProblem, ModelError, Problem
from ftctl.fsutil import atomic_write_bytes, atomic_write_text, normalize_modes

SUPPORTED_TYPES = ("bert", "roberta")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODEL_FILES = ("config.json",)
# tokenizer files an input directory may carry; save_classifier(like=...) copies those it has
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)
WEIGHT_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
SAVE_FORMATS = ("auto", "safetensors", "bin", "both")
SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")
TRAIN_DTYPE = "float32"  # fine-tuning always runs in fp32: lr 5e-6 updates round away in fp16
GENERIC_LABEL = re.compile(r"LABEL_\d+")
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
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


def _dtype_kwargs(dtype: str | None) -> dict[str, Any]:
    """from_pretrained's dtype argument (``dtype`` since transformers 4.56, ``torch_dtype``
    before); None keeps transformers' default (5.x: the stored dtype; 4.x: float32)."""
    if dtype is None:
        return {}
    import torch
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: getattr(torch, dtype)}


def load_classifier(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    labels: Sequence[str] | None = None,
):
    """(model, tokenizer) from a local directory; the model in eval mode on ``device``.

    ``dtype`` (e.g. ``"float32"``) casts the weights whatever their stored dtype; ``labels``
    (id order, from :func:`resolve_labels`) replace the config's id2label/label2id.
    """
    from transformers import AutoModelForSequenceClassification

    check_supported(model_dir)
    n_labels = len(read_labels(model_dir))
    if labels is not None and len(labels) != n_labels:
        raise ModelError(f"{model_dir}: {len(labels)} label names for {n_labels} outputs")
    tokenizer = load_tokenizer(model_dir)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), local_files_only=True, **_dtype_kwargs(dtype)
        )
    except Exception as exc:
        raise ModelError(
            f"{model_dir}: cannot load the model weights: {exc}", hint=_DAMAGED
        ) from exc
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {lab: i for i, lab in enumerate(labels)}
    model.to(device).eval()
    return model, tokenizer


def write_vocab_txt(tokenizer, out_dir: Path) -> None:
    """Write vocab.txt (id order) beside tokenizer.json, for older slow BertTokenizers."""
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    atomic_write_text(out_dir / "vocab.txt", "".join(t + "\n" for t in tokens))


def save_classifier(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    like: str | Path | None = None,
    save_format: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Write ``model`` and its tokenizer into ``out_dir``; what was written (for the manifest).

    Without ``like``: model.safetensors + config.json, the tokenizer's own files and vocab.txt.
    With ``like`` (the input model directory): its tokenizer files copied byte for byte (no
    other tokenizer file but a vocab.txt it lacked), the weights in its format as well
    (``save_format`` "auto": model.safetensors, plus pytorch_model.bin when the input had one;
    or "safetensors", "bin", "both") and in its stored dtype (``dtype`` "auto"; or
    float32/float16/bfloat16).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = save_formats(save_format, like)
    target = stored_dtype(like) if dtype == "auto" and like is not None else dtype
    target = TRAIN_DTYPE if target == "auto" else target
    state = _state_dict_as(model, target)
    if "safetensors" in formats:
        model.save_pretrained(str(out_dir), state_dict=state)
    else:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(out_dir))
    _write_config_dtype(out_dir / "config.json", target)
    if "bin" in formats:
        _write_bin(state, out_dir / WEIGHT_FILES["bin"])
    copied = _copy_tokenizer_files(Path(like), out_dir) if like is not None else []
    if not copied:
        tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "vocab.txt").exists():  # what an older slow BertTokenizer reads
        write_vocab_txt(tokenizer, out_dir)
    normalize_modes(out_dir)  # safetensors writes 0600
    return {
        "files": [WEIGHT_FILES[f] for f in formats],
        "format": save_format,
        "dtype": target,
        "input_dtype": stored_dtype(like) if like is not None else None,
        "input_files": weight_formats(like) if like is not None else [],
        "train_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer_files_copied": copied,
    }


def save_formats(save_format: str, like: str | Path | None) -> list[str]:
    """The weight formats to write: ``auto`` is safetensors + the input's own format."""
    if save_format not in SAVE_FORMATS:
        raise ConfigError(
            f"--save-format {save_format}: unknown", hint=f"use one of {', '.join(SAVE_FORMATS)}"
        )
    if save_format == "both":
        return ["safetensors", "bin"]
    if save_format != "auto":
        return [save_format]
    has_bin = like is not None and "bin" in weight_formats(like)
    return ["safetensors", "bin"] if has_bin else ["safetensors"]


def weight_formats(model_dir: str | Path) -> list[str]:
    """The weight formats a directory holds (``safetensors``, ``bin``; sharded ones count)."""
    model_dir = Path(model_dir)
    return [
        fmt
        for fmt, name in WEIGHT_FILES.items()
        if (model_dir / name).is_file() or (model_dir / f"{name}.index.json").is_file()
    ]


def stored_dtype(model_dir: str | Path) -> str:
    """The dtype the weights are stored in (float32, float16, bfloat16): the floating dtype
    holding most elements of the weights file; config.json's dtype when there is no file."""
    model_dir = Path(model_dir)
    counts: dict[str, int] = {}
    for _name, dt, numel in _weight_entries(model_dir):
        if dt is not None:
            counts[dt] = counts.get(dt, 0) + numel
    if counts:
        return max(sorted(counts), key=lambda d: counts[d])
    cfg = read_config(model_dir)
    found = str(cfg.get("dtype") or cfg.get("torch_dtype") or TRAIN_DTYPE)
    return found if found in SAVE_DTYPES else TRAIN_DTYPE


def _weight_entries(model_dir: Path) -> Iterable[tuple[str, str | None, int]]:
    """(name, floating dtype or None, elements) of every tensor of the first weights file."""
    st = model_dir / WEIGHT_FILES["safetensors"]
    if st.is_file():
        with st.open("rb") as fh:  # the header: u64 length + JSON {name: {dtype, shape, ...}}
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                numel = 1
                for d in info["shape"]:
                    numel *= d
                yield name, _SAFETENSORS_DTYPES.get(info["dtype"]), numel
        return
    binf = model_dir / WEIGHT_FILES["bin"]
    if binf.is_file():
        for name, t in _load_bin(binf).items():
            dt = str(t.dtype).removeprefix("torch.") if t.is_floating_point() else None
            yield name, dt, t.numel()


def _load_bin(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the pre-1.6 (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _state_dict_as(model, dtype: str) -> dict[str, Any]:
    import torch

    target = getattr(torch, dtype)
    return {
        k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu())
        .contiguous()
        .clone()
        for k, v in model.state_dict().items()
    }


def _write_bin(state: dict[str, Any], path: Path) -> None:
    """pytorch_model.bin as every transformers version reads it: torch.save of the state dict."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _write_config_dtype(path: Path, dtype: str) -> None:
    """config.json names the saved dtype under both keys (``dtype``: transformers 5,
    ``torch_dtype``: older versions)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    atomic_write_text(path, json.dumps(cfg, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the input's tokenizer files byte for byte (mode as the umask allows)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes())
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- labels


def is_generic(label: str) -> bool:
    """``LABEL_3``: the name transformers gives an output nobody named."""
    return GENERIC_LABEL.fullmatch(label) is not None


def resolve_labels(model_dir: str | Path, label_map: str | Path | None = None) -> list[str]:
    """The label space (id order) to train with: config.json's id2label, or ``label_map``'s
    names. Generic names (``LABEL_0``...) without a label map are refused: training would
    append every real intent as a new class (or reject every row)."""
    labels = read_labels(model_dir)
    if label_map is not None:
        mapped = read_label_map(label_map)
        if len(mapped) != len(labels):
            raise DataError(
                f"--label-map {label_map}: names {len(mapped)} ids, but {model_dir} has "
                f"{len(labels)} outputs",
                hint=f"name every id 0..{len(labels) - 1} exactly once",
            )
        return mapped
    generic = [lab for lab in labels if is_generic(lab)]
    if generic:
        shown = ", ".join(generic[:4]) + (", ..." if len(generic) > 4 else "")
        raise ModelError(
            f"{model_dir}/config.json: {len(generic)} of its {len(labels)} labels are generic "
            f"({shown}): it does not say which intent each output is",
            hint='pass --label-map FILE naming them: JSON {"0": "CLOCK_IN", ...} or CSV '
            "with the columns id,intent (the intent list your service used for this model)",
        )
    return labels


def read_label_map(path: str | Path) -> list[str]:
    """A label map (id -> intent) from JSON (``{"0": "A", ...}``, keys may be ``LABEL_0``, or a
    list) or CSV (``id,intent`` rows, header optional); the names in id order. Every problem is
    reported with file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"--label-map {path}: file not found", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--label-map {path}: cannot read: {exc}") from None
    pairs, problems = (
        _label_map_csv(text, str(path))
        if path.suffix.lower() == ".csv"
        else _label_map_json(text, str(path))
    )
    by_id: dict[int, tuple[str, int | None]] = {}
    names: dict[str, int] = {}
    ids: set[int] = set()
    for key, name, line in pairs:
        m = re.fullmatch(r"(?:LABEL_)?(\d+)", key.strip())
        if m is None:
            problems.append(Problem(f"id '{key}' is not a number (or LABEL_<n>)", str(path), line))
            continue
        i, name = int(m.group(1)), name.strip()
        ids.add(i)
        if not name:
            problems.append(Problem(f"id {i}: empty intent name", str(path), line))
        elif i in by_id:
            problems.append(Problem(f"id {i} named twice", str(path), line))
        elif name in names:
            problems.append(
                Problem(f"intent '{name}' given to ids {names[name]} and {i}", str(path), line)
            )
        else:
            by_id[i], names[name] = (name, line), i
    missing = [i for i in range(max(ids) + 1) if i not in ids] if ids else []
    if missing:
        problems.append(Problem(f"ids are not 0..{max(ids)}: missing {missing}", str(path)))
    if not by_id and not problems:
        problems.append(Problem("no labels in the file", str(path)))
    if problems:
        raise DataError(
            f"--label-map {path}: {len(problems)} problem(s):\n"
            + "\n".join(f"  {p}" for p in problems[:20]),
            hint='JSON {"0": "CLOCK_IN", "1": "ATTENDANCE_TODAY"} or CSV id,intent; one name '
            "per output id",
            problems=problems,
        )
    return [by_id[i][0] for i in range(len(by_id))]


def _label_map_json(text: str, file: str) -> tuple[list[tuple[str, str, int | None]], list]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [Problem(f"invalid JSON: {exc.msg}", file, exc.lineno)]
    if isinstance(obj, list):
        obj = {str(i): v for i, v in enumerate(obj)}
    if not isinstance(obj, dict):
        return [], [Problem("expected a JSON object {id: intent} or a list", file)]
    pairs, problems = [], []
    for k, v in obj.items():
        if isinstance(v, str):
            pairs.append((str(k), v, None))
        else:
            problems.append(Problem(f"id {k}: intent must be a string, got {v!r}", file))
    return pairs, problems


def _label_map_csv(text: str, file: str) -> tuple[list[tuple[str, str, int | None]], list]:
    pairs, problems = [], []
    rows = list(csv.reader(io.StringIO(text, newline="")))
    for lineno, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if lineno == 1 and not re.fullmatch(r"(?:LABEL_)?\d+", row[0].strip()):
            continue  # a header (id,intent)
        if len(row) != 2:
            problems.append(Problem(f"expected 2 fields (id,intent), got {len(row)}", file, lineno))
            continue
        pairs.append((row[0], row[1], lineno))
    return pairs, problems


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
