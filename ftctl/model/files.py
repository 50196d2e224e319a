"""Load and save BERT-family sequence classifiers (chinese-roberta-wwm-ext is a BERT).

A model directory is a plain Hugging Face directory (config.json with id2label/label2id,
model.safetensors, tokenizer files) plus ``vocab.txt`` (older transformers' slow BertTokenizer
needs it; transformers 5's save_pretrained no longer writes it) and, for ftctl outputs,
``manifest.json``.

The user's own model directory may come from an older stack: ``pytorch_model.bin`` instead of
safetensors, ``vocab.txt`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` instead of
``tokenizer.json``, fp16 weights, generic ``LABEL_i`` names. :func:`save_classifier` with
``like=`` that directory keeps its tokenizer files byte for byte and writes its weight format
and dtype; :func:`~ftctl.model.labels.resolve_labels` refuses generic names unless a label map
names them.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ftctl.errors import ConfigError, ModelError
from ftctl.fsutil import atomic_write_bytes, atomic_write_text, normalize_modes

SUPPORTED_TYPES = ("bert", "roberta")
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
    (id order, from :func:`~ftctl.model.labels.resolve_labels`) replace the config's
    id2label/label2id.
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
