"""Training and test data: read, validate and write JSONL/CSV (the seed's two formats).

JSONL: ``{"text": ..., "label": ...}`` per line (optional ``"id"``).
CSV:   header ``user_input,intent_code`` (optional ``id`` column).
Both UTF-8, with or without BOM. Readers report every problem with file:line, never only the
first, and never a traceback. Duplicates and conflicts within a file are found with
:func:`ftctl.data.textkey.text_key`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftctl.data.textkey import TextKey, text_keys
from ftctl.errors import DataError, Problem
from ftctl.fsutil import atomic_write_text, rewrite_bytes

CSV_TEXT, CSV_LABEL = "user_input", "intent_code"
FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
DEFAULT_MAX_CHARS = 128


@dataclass(frozen=True)
class Example:
    """One labelled utterance and where it came from."""

    text: str
    label: str
    id: str | None = None
    file: str | None = None
    line: int | None = None

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.file else ""


@dataclass(frozen=True)
class ReadResult:
    """Rows that parsed, plus every problem (errors and warnings) found on the way."""

    examples: list[Example]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format '{path.suffix}'",
            hint="use a .jsonl (JSON Lines) or .csv (user_input,intent_code) file",
        )
    return fmt


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", hint="check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        guess = ""
        try:
            raw.decode("gb18030")
            guess = " It decodes as GBK/GB18030 (what Excel on Chinese Windows saves)."
        except UnicodeDecodeError:
            pass
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}).{guess}",
            hint=(
                f"convert it: iconv -f GB18030 -t UTF-8 '{path}' > fixed{path.suffix} "
                "(or in Excel: Save As > CSV UTF-8)"
            ),
            problems=[Problem("file is not UTF-8" + guess, file=str(path), line=line)],
        ) from None


def _row_problems(
    text, label, file: str, line: int, max_chars: int, allowed: frozenset[str] | None
) -> list[Problem]:
    out = []
    if text is None:
        out.append(Problem("missing text", file=file, line=line, field="text"))
    elif not isinstance(text, str):
        out.append(Problem(f"text must be a string, got {text!r}", file, line, "text"))
    elif not text.strip():
        out.append(Problem("empty or whitespace-only text", file=file, line=line, field="text"))
    elif len(text) > max_chars:
        out.append(
            Problem(
                f"text is {len(text)} characters, over --max-chars {max_chars}", file, line, "text"
            )
        )
    if label is None:
        out.append(Problem("missing label", file=file, line=line, field="label"))
    elif not isinstance(label, str) or not label.strip():
        out.append(Problem(f"label must be a non-empty string, got {label!r}", file, line, "label"))
    elif allowed is not None and label not in allowed:
        out.append(
            Problem(
                f"label '{label}' is not one of the model's {len(allowed)} labels",
                file,
                line,
                "label",
            )
        )
    return out


def _parse_jsonl(text: str, file: str) -> Iterable[tuple[int, object, object, object, list]]:
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield (
                lineno,
                None,
                None,
                None,
                [Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", file, lineno)],
            )
            continue
        if not isinstance(obj, dict):
            yield (
                lineno,
                None,
                None,
                None,
                [Problem(f"expected a JSON object, got {type(obj).__name__}", file, lineno)],
            )
            continue
        yield lineno, obj.get("text"), obj.get("label"), obj.get("id"), []


def _parse_csv(text: str, file: str) -> Iterable[tuple[int, object, object, object, list]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield 1, None, None, None, [Problem(f"invalid CSV: {exc}", file, 1)]
        return
    header = [h.strip() for h in header]
    missing = [c for c in (CSV_TEXT, CSV_LABEL) if c not in header]
    if missing:
        yield (
            1,
            None,
            None,
            None,
            [
                Problem(
                    f"CSV header must have {CSV_TEXT},{CSV_LABEL}; missing {', '.join(missing)} "
                    f"(found: {','.join(header)})",
                    file,
                    1,
                    "header",
                )
            ],
        )
        return
    ti, li = header.index(CSV_TEXT), header.index(CSV_LABEL)
    ii = header.index("id") if "id" in header else None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield (
                reader.line_num,
                None,
                None,
                None,
                [Problem(f"invalid CSV row: {exc}", file, reader.line_num)],
            )
            return
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            yield (
                lineno,
                None,
                None,
                None,
                [
                    Problem(
                        f"invalid CSV row: {len(row)} fields, header has {len(header)} "
                        "(quote texts that contain commas)",
                        file,
                        lineno,
                    )
                ],
            )
            continue
        yield lineno, row[ti], row[li], row[ii] if ii is not None else None, []


def read_examples(
    path: str | Path,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    allowed_labels: Iterable[str] | None = None,
    tokenizer=None,
) -> ReadResult:
    """Read a JSONL or CSV file (by extension) and collect every problem.

    Never raises for bad rows; raises :class:`DataError` only when the file as a whole cannot
    be read (missing, not UTF-8, unknown extension). Texts are stripped of surrounding spaces.
    Checks: invalid rows, missing/empty text, too long text, missing or unknown label, the same
    text (:func:`text_key`, with ``tokenizer`` when given) with two labels (error), duplicates
    (warning).
    """
    path = Path(path)
    fmt = file_format(path)
    content = _decode(path)
    file = str(path)
    allowed = frozenset(allowed_labels) if allowed_labels is not None else None
    parse = _parse_jsonl if fmt == "jsonl" else _parse_csv
    rows: list[Example] = []
    problems: list[Problem] = []
    for lineno, text, label, ex_id, parse_problems in parse(content, file):
        if parse_problems:
            problems.extend(parse_problems)
            continue
        row_problems = _row_problems(text, label, file, lineno, max_chars, allowed)
        problems.extend(row_problems)
        if not row_problems:
            ex_id = None if ex_id is None else str(ex_id)
            rows.append(Example(text.strip(), label.strip(), ex_id, file, lineno))
    examples, same = _dedupe(rows, tokenizer)
    problems.extend(same)
    problems.sort(key=lambda p: p.line or 0)
    return ReadResult(examples, problems)


def _dedupe(rows: Sequence[Example], tokenizer) -> tuple[list[Example], list[Problem]]:
    """(the first row of each text, a problem for every later one: a conflict when the label
    differs, else a duplicate)."""
    seen: dict[TextKey, Example] = {}
    examples: list[Example] = []
    problems: list[Problem] = []
    for ex, key in zip(rows, text_keys([r.text for r in rows], tokenizer), strict=True):
        first = seen.get(key)
        if first is None:
            seen[key] = ex
            examples.append(ex)
        elif first.label != ex.label:
            problems.append(
                Problem(
                    f"conflict: same text labelled '{first.label}' on line {first.line} "
                    f"('{first.text}') and '{ex.label}' here",
                    ex.file,
                    ex.line,
                    "label",
                )
            )
        else:
            problems.append(
                Problem(f"duplicate of line {first.line}", ex.file, ex.line, "text", "warning")
            )
    return examples, problems


def load_examples(
    path: str | Path,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    allowed_labels: Iterable[str] | None = None,
    what: str = "data",
    tokenizer=None,
) -> list[Example]:
    """Read a file for training or eval: any error raises one DataError listing all of them.

    Warnings (duplicates) are dropped silently: duplicates are already removed from the result.
    An empty result is an error too.
    """
    result = read_examples(
        path, max_chars=max_chars, allowed_labels=allowed_labels, tokenizer=tokenizer
    )
    errors = result.errors
    if errors:
        shown = "\n".join(f"  {p}" for p in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(
            f"{path}: {len(errors)} error(s) in the {what} file:\n{shown}{more}",
            hint=f"run `ftctl data validate {path}` for the full list, fix them and retry",
            problems=errors,
        )
    if not result.examples:
        raise DataError(f"{path}: the {what} file has no examples", hint="add some rows")
    return result.examples


# --------------------------------------------------------------------------- writing


def to_jsonl(examples: Sequence[Example], *, with_ids: bool = False) -> str:
    lines = []
    for ex in examples:
        obj = {"id": ex.id} if with_ids and ex.id is not None else {}
        obj |= {"text": ex.text, "label": ex.label}
        lines.append(json.dumps(obj, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def to_csv(examples: Sequence[Example], *, with_ids: bool = False) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", CSV_TEXT, CSV_LABEL] if with_ids else [CSV_TEXT, CSV_LABEL])
    for ex in examples:
        w.writerow([ex.id, ex.text, ex.label] if with_ids else [ex.text, ex.label])
    return buf.getvalue()


def write_examples(
    path: str | Path, examples: Sequence[Example], *, with_ids: bool = False
) -> Path:
    """Write JSONL or CSV by extension, UTF-8 (not ASCII-escaped), atomically."""
    path = Path(path)
    fmt = file_format(path)
    text = (
        to_jsonl(examples, with_ids=with_ids)
        if fmt == "jsonl"
        else to_csv(examples, with_ids=with_ids)
    )
    return atomic_write_text(path, text)


def _csv_header(head: str, path: Path) -> list[str]:
    try:
        header = next(csv.reader(io.StringIO(head, newline="")), [])
    except csv.Error as exc:
        raise DataError(f"{path}:1: invalid CSV header: {exc}") from None
    header = [h.strip() for h in header]
    missing = [c for c in (CSV_TEXT, CSV_LABEL) if c not in header]
    if missing:
        raise DataError(
            f"{path}:1: cannot append: the CSV header has no {', '.join(missing)} "
            f"(found: {','.join(header)})",
            hint=f"give the file a header with {CSV_TEXT} and {CSV_LABEL}, or append to another "
            "file",
        )
    return header


def _appended_rows(old: str, fmt: str, examples: Sequence[Example], path: Path, nl: str) -> str:
    """The new rows in the file's own shape: a CSV's columns in its header's order (``id``
    filled, other columns empty); JSONL with ids when its first row has one."""
    if fmt == "jsonl":
        first = next((ln for ln in old.split("\n") if ln.strip()), "")
        try:
            with_ids = '"id"' in first and "id" in json.loads(first)
        except (ValueError, TypeError):
            with_ids = False
        return to_jsonl(examples, with_ids=with_ids).replace("\n", nl)
    if not old.strip():
        return to_csv(examples).replace("\n", nl)
    header = _csv_header(old.split("\n", 1)[0], path)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator=nl)
    for ex in examples:
        cells = {CSV_TEXT: ex.text, CSV_LABEL: ex.label, "id": ex.id or ""}
        w.writerow([cells.get(col, "") for col in header])
    return buf.getvalue()


def append_examples(path: str | Path, examples: Sequence[Example]) -> Path:
    """Append rows to a JSONL or CSV data file, following the file: a CSV's header (whatever
    its column order, with or without ``id``), its line ending, a JSONL file's ids. One atomic
    write (the bytes already there are kept as they are) that keeps the file's mode and
    symlink. Several processes: hold :func:`ftctl.fsutil.file_lock` around the read, the
    checks and this call."""
    path = Path(path)
    fmt = file_format(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        old = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not UTF-8: cannot append to it",
            hint=f"convert it first: iconv -f GB18030 -t UTF-8 '{path}'",
        ) from None
    nl = "\r\n" if old.split("\n", 1)[0].endswith("\r") else "\n"
    if raw and not raw.endswith(b"\n"):
        raw += nl.encode()
    body = _appended_rows(old, fmt, examples, path, nl)
    return rewrite_bytes(path, raw + body.encode("utf-8"))
