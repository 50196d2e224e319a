"""Step 1 of a fine-tune: every input checked before anything is loaded or written.

The model directory (without its weights), the data files (new, old, reviewed; on the same text
the newer row wins), the labels (``--label-map``, ``--add-labels``), the layers and the token
length; each problem an FtctlError with a hint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftctl.config import TrainConfig
from ftctl.data.examples import Example, load_examples
from ftctl.data.reconcile import Reconciliation, combine, reconcile
from ftctl.errors import ConfigError, DataError, Problem
from ftctl.model.files import check_supported, load_tokenizer
from ftctl.model.labels import resolve_labels
from ftctl.terms import seed_term
from ftctl.train.features import informative


@dataclass
class Inputs:
    """Every input, checked: what ``prepare_inputs`` gives the later steps."""

    model_path: Path
    new_paths: tuple[Path, ...]
    out_dir: Path
    tokenizer: Any
    new: list[Example]
    old: list[Example]
    unknown: dict[str, Example]  # labels the base model lacks (grown with --add-labels)
    n_layers: int
    labels: list[str]  # the base model's, named by --label-map when they are LABEL_i
    overlap: Reconciliation  # texts in both new and old data (relabels, repeats) taken out of old
    merged: Reconciliation  # texts in two new-data files: the later file's row kept


def _require(value: Path | None, flag: str) -> Path:
    if value is None:
        raise ConfigError(
            f"{flag} is required", hint=f"pass {flag} PATH or set it in ftctl.toml [train]"
        )
    return Path(value)


def _require_files(values: Sequence[Path], flag: str) -> tuple[Path, ...]:
    if not values:
        _require(None, flag)
    return tuple(Path(v) for v in values)


def _unknown_label_error(missing: dict[str, Example], n_known: int) -> DataError:
    problems = [
        Problem(f"label '{lab}' is not one of the base model's {n_known} labels", ex.file, ex.line)
        for lab, ex in missing.items()
    ]
    return DataError(
        "labels the base model does not know:\n" + "\n".join(f"  {p}" for p in problems),
        hint="fix the labels, or pass --add-labels to grow the classifier head "
        "(the old labels' rows are kept exactly)",
        problems=problems,
    )


def prepare_inputs(cfg: TrainConfig, warn: Callable[[str], None]) -> Inputs:
    """Check the model directory (without loading its weights), the data and the labels;
    nothing is written. Every problem is an FtctlError with a hint."""
    model_path = _require(cfg.model_path, "--model-path")
    new_paths = _require_files(cfg.new_data, "--new-data")
    out_dir = Path(cfg.output_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-path {out_dir}: exists and is not a directory")
    config = check_supported(model_path)
    if (out_dir / "final").resolve() == model_path.resolve():
        raise ConfigError(
            f"--output-path {out_dir} would replace the base model {model_path} itself",
            hint="write the fine-tuned model elsewhere, e.g. --output-path models/incremental",
        )
    labels = resolve_labels(model_path, cfg.label_map)
    tokenizer = load_tokenizer(model_path)  # "the same text" is what this model sees
    new, merged = combine(
        [load_examples(p, what="new data", tokenizer=tokenizer) for p in new_paths], tokenizer
    )  # on the same text the later file wins: the reviewed data over the generated
    old: list[Example] = []
    if cfg.old_data is not None:
        old = load_examples(cfg.old_data, what="old data", tokenizer=tokenizer)
    new, old, overlap = reconcile(new, old, tokenizer)  # the new label wins; one copy of repeats
    unknown: dict[str, Example] = {}
    for ex in [*new, *old]:
        if ex.label not in labels and ex.label not in unknown:
            unknown[ex.label] = ex
    if unknown and not cfg.add_labels:
        raise _unknown_label_error(unknown, len(labels))
    n_layers = int(config.get("num_hidden_layers", 0))
    if cfg.freeze_layers > n_layers:
        raise ConfigError(
            f"--freeze-layers {cfg.freeze_layers}: {model_path} has only {n_layers} layers",
            hint=f"use --freeze-layers between 0 and {n_layers}",
        )
    max_pos = int(config.get("max_position_embeddings", 512))
    if cfg.max_length > max_pos:
        raise ConfigError(
            f"--max-length {cfg.max_length}: the model takes at most {max_pos} tokens",
            hint=f"use --max-length {max_pos} or less",
        )
    new, dropped = informative(tokenizer, new)
    old, dropped_old = informative(tokenizer, old)
    if dropped or dropped_old:
        first = (dropped or dropped_old)[0]
        warn(
            f"{len(dropped) + len(dropped_old)} text(s) are all [UNK] for this tokenizer and "
            f"were dropped (first: {first.source} '{first.text}')"
        )
    if not new:
        raise DataError(
            f"{', '.join(map(str, new_paths))}: no usable examples after filtering (every text "
            "is all [UNK])",
            hint="the texts must use characters in the model's vocab.txt",
        )
    if not old:
        warn(
            "no --old-data: training on the new data alone; forgetting protection is reduced "
            f"(the seed's {seed_term('keep old data')}: pass --old-data with the original "
            "training data to mix in replay)"
        )
    return Inputs(
        model_path, new_paths, out_dir, tokenizer, new, old, unknown, n_layers, labels, overlap,
        merged,
    )  # fmt: skip
