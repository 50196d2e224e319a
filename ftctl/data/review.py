"""``ftctl data import-review``: a filled-in review file becomes training data.

The review file is what ``ftctl harvest`` wrote, after a human filled in the ``label`` column
(in Excel or WPS: saved as "CSV UTF-8", or plain "CSV", which Chinese Windows writes in
GB18030; both are read). Rows with an empty label were not reviewed and are left out. Every
filled row is checked, and every problem is reported with its row number (as the spreadsheet
shows it: the header is row 1):

- the text is empty or too long;
- the label is not a known label (with the closest known one as a hint);
- the text is already in the reviewed data (or ``--against`` files) with another label, or
  appears twice in the review with two labels ("the same text":
  :func:`ftctl.data.textkey.text_key`).

Only when no row has a problem are the reviewed rows appended to the reviewed data (``[data]
reviewed``, its own file: ``data generate`` never writes it; ``train`` reads it last, so a
reviewed label wins over a generated one), following the file's format and header, in one
atomic write that keeps the existing bytes, the file's mode and its symlink, under an
``fcntl`` lock (two imports at once lose nothing). Rows already there with the same label are
skipped, not added twice.
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ftctl.data.examples import Example, append_examples, file_format, read_examples
from ftctl.data.generate import written_by_generate
from ftctl.data.harvest import from_cell
from ftctl.data.textkey import TextKey, text_keys
from ftctl.errors import ConfigError, DataError, Problem
from ftctl.fsutil import file_lock


@dataclass(frozen=True)
class ReviewRow:
    row: int  # spreadsheet row number (header = 1)
    text: str
    label: str
    predicted: str


@dataclass
class ImportResult:
    review: Path
    target: Path
    encoding: str
    rows: int = 0  # data rows in the file
    reviewed: int = 0  # rows with a label
    added: list[Example] = field(default_factory=list)
    already: int = 0  # same text, same label already in the data: skipped
    repeated: int = 0  # the same text and label twice in the review: added once
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "ok": not self.problems,
            "review": str(self.review),
            "target": str(self.target),
            "encoding": self.encoding,
            "rows": self.rows,
            "reviewed": self.reviewed,
            "not_reviewed": self.rows - self.reviewed,
            "added": len(self.added),
            "already_in_data": self.already,
            "repeated": self.repeated,
            "problems": [p.to_dict() for p in self.problems],
        }


def _decode(path: Path) -> tuple[str, str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", hint="check the path") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise DataError(
        f"{path}: neither UTF-8 nor GB18030",
        hint="save it from Excel/WPS as 'CSV UTF-8 (comma delimited)'",
    )


def read_review(path: Path) -> tuple[list[ReviewRow], int, str]:
    """(rows with a label, rows in the file, encoding)."""
    content, encoding = _decode(path)
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DataError(
            f"{path}: empty file", hint="pass the review file ftctl harvest wrote"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: invalid CSV: {exc}") from None
    if "text" not in header or "label" not in header:
        raise DataError(
            f"{path}: the header must have 'text' and 'label' columns (found: {','.join(header)})",
            hint="pass the review file ftctl harvest wrote, with its header row kept; "
            "if Excel saved it with ';' between columns, save it again as CSV UTF-8",
        )
    ti, li = header.index("text"), header.index("label")
    pi = header.index("predicted") if "predicted" in header else None
    rows: list[ReviewRow] = []
    n = 0
    try:
        for n, cells in enumerate(reader, start=1):
            text, label, predicted = (
                cells[i].strip() if i is not None and i < len(cells) else "" for i in (ti, li, pi)
            )
            if label:
                rows.append(ReviewRow(n + 1, from_cell(text), label, predicted))
    except csv.Error as exc:
        raise DataError(f"{path}: row {n + 2}: invalid CSV: {exc}") from None
    return rows, n, encoding


def _existing(paths: Iterable[Path], max_chars: int, tokenizer=None) -> dict[TextKey, Example]:
    """text key -> the first example with it, over every file that exists."""
    seen: dict[TextKey, Example] = {}
    for path in paths:
        if not path.is_file():
            continue
        examples = read_examples(path, max_chars=max(max_chars, 10**6)).examples
        for key, ex in zip(text_keys([ex.text for ex in examples], tokenizer), examples,
                           strict=True):  # fmt: skip
            seen.setdefault(key, ex)
    return seen


def check_rows(
    rows: Sequence[ReviewRow],
    review: Path,
    labels: set[str],
    existing: dict[TextKey, Example],
    max_chars: int,
    tokenizer=None,
) -> tuple[list[Example], int, int, list[Problem]]:
    """(new examples, already in data, repeated in review, problems)."""
    file = str(review)
    problems: list[Problem] = []
    new: dict[TextKey, tuple[ReviewRow, Example]] = {}
    already = repeated = 0
    keys = text_keys([r.text for r in rows], tokenizer)
    for r, key in zip(rows, keys, strict=True):
        where = {"file": file, "line": r.row}
        if not r.text.strip():
            problems.append(Problem("empty text (the label is filled in)", field="text", **where))
            continue
        if len(r.text) > max_chars:
            problems.append(
                Problem(
                    f"text is {len(r.text)} characters, over {max_chars}", field="text", **where
                )
            )
            continue
        if r.label not in labels:
            close = difflib.get_close_matches(r.label.upper(), sorted(labels), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(Problem(f"unknown label '{r.label}'{hint}", field="label", **where))
            continue
        old = existing.get(key)
        if old is not None and old.label != r.label:
            problems.append(
                Problem(
                    f"'{r.text}' is labelled {r.label} here but {old.label} in {old.source}",
                    field="label",
                    **where,
                )
            )
            continue
        if old is not None:
            already += 1
            continue
        twin = new.get(key)
        if twin is not None and twin[1].label != r.label:
            problems.append(
                Problem(
                    f"'{r.text}' is labelled {r.label} here but {twin[1].label} in row "
                    f"{twin[0].row}",
                    field="label",
                    **where,
                )
            )
            continue
        if twin is not None:
            repeated += 1
            continue
        new[key] = (r, Example(r.text.strip(), r.label, f"{review.stem}:{r.row}"))
    return [ex for _, ex in new.values()], already, repeated, problems


def import_review(
    review: Path,
    target: Path,
    *,
    labels: Iterable[str] | None = None,
    against: Sequence[Path] = (),
    label_files: Sequence[Path] = (),
    max_chars: int = 128,
    tokenizer=None,
) -> ImportResult:
    """Check every reviewed row; append them to ``target`` (the reviewed data) only if none has
    a problem (DataError listing all of them otherwise). ``labels`` None: the labels of the
    target, ``against`` and ``label_files`` (the generated data, say) plus the review's
    ``predicted`` column (the model's labels). The target is read, checked and appended under
    one lock."""
    file_format(target)  # an unknown target format fails before anything is read
    if written_by_generate(target):
        raise ConfigError(
            f"{target}: `ftctl data generate` writes that file (and would replace it)",
            hint="import into the reviewed data ([data] reviewed, data/reviewed.jsonl, the "
            "default): train reads it after the generated data, so the reviewed labels win",
        )
    rows, total, encoding = read_review(review)
    result = ImportResult(review, target, encoding, rows=total, reviewed=len(rows))
    if not rows:
        raise DataError(
            f"{review}: no row has a label ({total} rows)",
            hint="fill in the 'label' column of the rows you reviewed, save, and run this again",
        )
    if labels is None:
        labels = {ex.label for ex in _existing(label_files, max_chars).values()}
        labels |= {r.predicted for r in rows if r.predicted}
        labels.add(None)  # ... and those of the target and ``against``, read under the lock
    try:
        with file_lock(target):
            _check_and_append(result, rows, set(labels), against, max_chars, tokenizer)
    except TimeoutError as exc:
        raise DataError(
            f"{target}: {exc}", hint="another import is stuck; see which process holds it"
        ) from None
    return result


def _check_and_append(result: ImportResult, rows, labels, against, max_chars, tokenizer) -> None:
    review, target = result.review, result.target
    existing = _existing([target, *against], max_chars, tokenizer)
    if None in labels:  # no list given: the labels the data uses are known labels
        labels = (labels - {None}) | {ex.label for ex in existing.values()}
    new, result.already, result.repeated, result.problems = check_rows(
        rows, review, set(labels), existing, max_chars, tokenizer
    )
    if result.problems:
        shown = "\n".join(f"  {p}" for p in result.problems[:30])
        more = len(result.problems) - 30
        raise DataError(
            f"{review}: {len(result.problems)} reviewed row(s) with problems; nothing "
            f"imported:\n{shown}" + (f"\n  ... and {more} more" if more > 0 else ""),
            hint="fix those rows in the review file (or clear their label to leave them out) "
            "and run this again",
            problems=result.problems,
        )
    if new:
        append_examples(target, new)
    result.added = new
