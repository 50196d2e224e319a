"""A classifier's label space: which intent each output is.

A model from an older stack may name its outputs ``LABEL_0``, ``LABEL_1``... (transformers'
default): :func:`resolve_labels` refuses those unless a label map (``--label-map``: JSON or CSV
``id,intent``) names them.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from ftctl.errors import DataError, ModelError, Problem
from ftctl.model.files import read_labels

GENERIC_LABEL = re.compile(r"LABEL_\d+")


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
