"""Training-data generation: a templates file (YAML) -> a balanced list of labelled examples.

The seed kept its samples in a Python dict (``TRAINING_SAMPLES``); here they live in a YAML file
users edit::

    slots:                      # values a phrasing's {name} placeholders are filled with
      line: [一号线, 二号线]
      period: [今天, 本周]
    defaults:                   # decorations every intent gets (each list is drawn from)
      prefixes: ["", "请", "麻烦"]
      fillers: ["", "嗯，"]
      suffixes: ["", "，谢谢"]
      punctuation: ["", "？"]
    intents:
      PROCESSING_BATCH_LIST:    # a plain list of phrasings ...
        - 查看{line}在产批次
      CLOCK_IN:                 # ... or a mapping that overrides decorations for this intent
        phrasings: [帮我打卡]
        suffixes: ["", "吧"]

A variant is ``filler + prefix + phrasing (slots filled) + suffix + punctuation``. Every
phrasing is used once plain, then round-robin with random decorations, until each intent has
``per_intent`` distinct texts (distinct by :func:`ftctl.data.textkey.text_key`: ``麻烦了？`` and
``麻烦了?`` are one text). Output is deterministic for a seed. Pure: no printing, no typer.

Generate writes only files it wrote before: beside its outputs it records what it wrote
(``STEM.generated.json``: each file's sha256), and it refuses to replace a file that holds rows
it did not write (an edited or appended file, someone else's data) unless ``force``. It never
writes the reviewed data (``[data] reviewed``).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftctl.config import DataConfig
from ftctl.data.examples import (
    DEFAULT_MAX_CHARS,
    Example,
    file_format,
    read_examples,
    to_csv,
    to_jsonl,
)
from ftctl.data.textkey import TextKey, text_key, text_keys
from ftctl.errors import ConfigError, DataError, FtctlError, Problem
from ftctl.fsutil import atomic_write_text, sha256_bytes, sha256_file
from ftctl.progress import NULL, Reporter

DECORATIONS = ("prefixes", "fillers", "suffixes", "punctuation")
_SLOT = re.compile(r"\{([^{}]*)\}")
_ATTEMPTS_PER_SAMPLE = 60


@dataclass(frozen=True)
class IntentTemplates:
    """The phrasings of one intent and the decorations drawn for its variants."""

    label: str
    phrasings: tuple[str, ...]
    decorations: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Templates:
    """A parsed templates file."""

    path: str
    slots: dict[str, tuple[str, ...]]
    intents: tuple[IntentTemplates, ...]

    @property
    def labels(self) -> list[str]:
        return [it.label for it in self.intents]


# --------------------------------------------------------------------------- loading


def _err(path: str, message: str, where: str | None = None) -> DataError:
    loc = f"{path} [{where}]" if where else path
    return DataError(
        f"{loc}: {message}",
        hint=f"fix the templates file {path} (see docs/data.md for its format)",
        problems=[Problem(message, file=path, field=where)],
    )


def _str_list(value, path: str, where: str, *, allow_empty_items: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _err(path, "must be a non-empty list of strings", where)
    out = []
    for i, item in enumerate(value):
        if item is None and allow_empty_items:
            item = ""
        if isinstance(item, int | float) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise _err(path, f"item {i} must be a string, got {item!r}", where)
        if not item.strip() and not allow_empty_items:
            raise _err(path, f"item {i} is empty", where)
        out.append(item if allow_empty_items else item.strip())
    return tuple(out)


def _decorations(raw: dict, path: str, where: str) -> dict[str, tuple[str, ...]]:
    return {
        key: _str_list(raw[key], path, f"{where}.{key}", allow_empty_items=True)
        for key in DECORATIONS
        if key in raw
    }


def _slot_names(phrasing: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(phrasing) if name is not None]


def _check_phrasing(phrasing: str, slots: dict, path: str, where: str) -> None:
    try:
        names = _slot_names(phrasing)
    except ValueError as exc:
        raise _err(path, f"phrasing '{phrasing}': bad braces ({exc})", where) from None
    for name in names:
        if name not in slots:
            known = ", ".join(sorted(slots)) or "none defined"
            raise _err(
                path,
                f"phrasing '{phrasing}' uses unknown slot {{{name}}} (slots: {known})",
                where,
            )


def parse_templates(raw: object, path: str = "<templates>") -> Templates:
    """Validate the YAML document ``raw`` (already parsed) into :class:`Templates`."""
    if not isinstance(raw, dict):
        raise _err(path, "the file must be a mapping with an 'intents' table")
    unknown = sorted(set(raw) - {"slots", "defaults", "intents"})
    if unknown:
        raise _err(path, f"unknown top-level key(s): {', '.join(map(str, unknown))}")
    slots_raw = raw.get("slots") or {}
    if not isinstance(slots_raw, dict):
        raise _err(path, "must be a mapping of slot name -> list of values", "slots")
    slots = {
        str(k): _str_list(v, path, f"slots.{k}", allow_empty_items=False)
        for k, v in slots_raw.items()
    }
    defaults_raw = raw.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        raise _err(path, f"must be a mapping with {', '.join(DECORATIONS)}", "defaults")
    bad = sorted(set(defaults_raw) - set(DECORATIONS))
    if bad:
        raise _err(path, f"unknown key(s) {', '.join(bad)} (known: {', '.join(DECORATIONS)})")
    defaults = _decorations(defaults_raw, path, "defaults")
    intents_raw = raw.get("intents")
    if not isinstance(intents_raw, dict) or not intents_raw:
        raise _err(path, "must be a non-empty mapping of intent code -> phrasings", "intents")
    intents = []
    for label, body in intents_raw.items():
        where = f"intents.{label}"
        if body is None:
            raise _err(path, f"intent {label} has no phrasings", where)
        if isinstance(body, dict):
            bad = sorted(set(body) - {"phrasings", *DECORATIONS})
            if bad:
                raise _err(path, f"intent {label}: unknown key(s) {', '.join(bad)}", where)
            if not body.get("phrasings"):
                raise _err(path, f"intent {label} has no phrasings", where)
            phrasings = _str_list(body["phrasings"], path, where, allow_empty_items=False)
            decos = {**defaults, **_decorations(body, path, where)}
        else:
            if isinstance(body, list) and not body:
                raise _err(path, f"intent {label} has no phrasings", where)
            phrasings = _str_list(body, path, where, allow_empty_items=False)
            decos = dict(defaults)
        for i, p in enumerate(phrasings):
            _check_phrasing(p, slots, path, f"{where}[{i}]")
        seen: dict[str, int] = {}
        for i, p in enumerate(phrasings):
            if p in seen:
                raise _err(
                    path,
                    f"intent {label}: phrasing '{p}' is listed twice (items {seen[p]} and {i})",
                    f"{where}[{i}]",
                )
            seen[p] = i
        intents.append(IntentTemplates(str(label), phrasings, decos))
    return Templates(path, slots, tuple(intents))


def load_templates(path: str | Path) -> Templates:
    """Read and validate a templates YAML file; every problem is a DataError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(
            f"{path}: templates file not found", hint="check --templates or [data] templates"
        ) from None
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not UTF-8", hint=f"convert it: iconv -f GB18030 -t UTF-8 '{path}'"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        loc = f"{path}:{line}" if line else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise DataError(
            f"{loc}: not valid YAML: {problem}",
            hint="fix the YAML syntax (quote phrasings that start with { or contain ': ')",
            problems=[Problem(f"not valid YAML: {problem}", file=str(path), line=line)],
        ) from None
    return parse_templates(raw, str(path))


# --------------------------------------------------------------------------- generation


def _fill(phrasing: str, slots: dict[str, tuple[str, ...]], rng: random.Random) -> str:
    return _SLOT.sub(lambda m: rng.choice(slots[m.group(1)]), phrasing)


def _decorate(body: str, decos: dict[str, tuple[str, ...]], rng: random.Random) -> str:
    def pick(key: str) -> str:
        values = decos.get(key)
        return rng.choice(values) if values else ""

    filler, prefix = pick("fillers"), pick("prefixes")
    suffix, punct = pick("suffixes"), pick("punctuation")
    return f"{filler}{prefix}{body}{suffix}{punct}".strip()


@dataclass(frozen=True)
class _Origin:
    label: str
    index: int
    phrasing: str

    def __str__(self) -> str:
        return f"intents.{self.label}[{self.index}] '{self.phrasing}'"


def _intent_texts(it: IntentTemplates, slots: dict, n: int, seed: int) -> list[tuple[str, _Origin]]:
    """Up to ``n`` distinct texts for one intent: each phrasing plain first, then decorated."""
    rng = random.Random(f"{seed}/{it.label}")
    order = list(range(len(it.phrasings)))
    rng.shuffle(order)
    out: list[tuple[str, _Origin]] = []
    seen: set[TextKey] = set()
    max_attempts = n * _ATTEMPTS_PER_SAMPLE + len(order)
    for attempt in range(max_attempts):
        if len(out) >= n:
            break
        i = order[attempt % len(order)]
        body = _fill(it.phrasings[i], slots, rng)
        text = body.strip() if attempt < len(order) else _decorate(body, it.decorations, rng)
        key = text_key(text)
        if text and key not in seen:
            seen.add(key)
            out.append((text, _Origin(it.label, i, it.phrasings[i])))
    return out


def generate(
    templates: Templates,
    *,
    per_intent: int,
    seed: int,
    with_ids: bool = False,
    max_chars: int = DEFAULT_MAX_CHARS,
    reporter: Reporter = NULL,
) -> list[Example]:
    """Expand ``templates`` into ``per_intent`` distinct examples per intent, shuffled.

    Raises :class:`DataError` if an intent cannot yield ``per_intent`` distinct texts, if a text
    is longer than ``max_chars``, or if one text comes out of two intents (naming both entries).
    """
    if per_intent < 1:
        raise DataError("per_intent must be >= 1", hint="pass --per-intent N with N >= 1")
    owner: dict[TextKey, tuple[str, _Origin]] = {}
    rows: list[Example] = []
    with reporter.task("generating", total=len(templates.intents), unit="intents") as advance:
        for it in templates.intents:
            texts = _intent_texts(it, templates.slots, per_intent, seed)
            if len(texts) < per_intent:
                raise DataError(
                    f"{templates.path}: intent {it.label} yields only {len(texts)} distinct "
                    f"texts, fewer than --per-intent {per_intent}",
                    hint=f"add phrasings, slot values or decorations for {it.label}, "
                    "or lower --per-intent",
                )
            for k, (text, origin) in enumerate(texts, start=1):
                if len(text) > max_chars:
                    raise DataError(
                        f"{templates.path}: {origin} gives '{text}', {len(text)} characters "
                        f"(over --max-chars {max_chars})",
                        hint="shorten the phrasing, its slot values or decorations",
                    )
                key = text_key(text)
                other_text, other = owner.get(key, (text, None))
                if other is not None and other.label != it.label:
                    same = f" (as '{other_text}')" if other_text != text else ""
                    raise DataError(
                        f"{templates.path}: the text '{text}' comes out of two intents: "
                        f"{other}{same} and {origin}",
                        hint="a text may have only one label: reword one of the two phrasings",
                        problems=[
                            Problem(
                                f"'{text}' also generated by {other}",
                                templates.path,
                                field=f"intents.{origin.label}[{origin.index}]",
                            ),
                        ],
                    )
                owner[key] = (text, origin)
                ex_id = f"{it.label}-{k:03d}" if with_ids else None
                rows.append(Example(text, it.label, ex_id))
            advance(1)
    random.Random(seed).shuffle(rows)
    return rows


def counts(examples: Sequence[Example]) -> dict[str, int]:
    """Examples per label, in first-seen label order."""
    out: dict[str, int] = {}
    for ex in examples:
        out[ex.label] = out.get(ex.label, 0) + 1
    return out


@dataclass(frozen=True)
class Generated:
    """What :func:`write_generated` made: the templates, the examples and the files."""

    templates: Templates
    examples: list[Example]
    paths: list[Path]


RECORD_SUFFIX = ".generated.json"  # OUT_DIR/STEM.generated.json: what generate wrote


def record_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}{RECORD_SUFFIX}"


def _read_record(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    return files if isinstance(files, dict) else {}


def written_by_generate(path: Path) -> bool:
    """Whether a ``*.generated.json`` record beside ``path`` lists it (generate may replace
    it: nothing else should write there)."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    return any(path.name in _read_record(rec) for rec in path.parent.glob(f"*{RECORD_SUFFIX}"))


def foreign_rows(path: Path, recorded: dict, examples: Sequence[Example]) -> list[Example] | None:
    """The rows of ``path`` that replacing it with ``examples`` would lose and that generate did
    not write: [] when the file is what generate recorded writing, or when every row of it
    (same text, same label) is in ``examples``; None when the file cannot be read as data."""
    if not path.exists():
        return []
    entry = recorded.get(path.name)
    if isinstance(entry, dict) and entry.get("sha256") == sha256_file(path):
        return []
    try:
        rows = read_examples(path, max_chars=10**6).examples
    except FtctlError:
        return None
    new = {(k, ex.label) for k, ex in zip(text_keys([e.text for e in examples]), examples,
                                         strict=True)}  # fmt: skip
    keys = text_keys([ex.text for ex in rows])
    return [ex for ex, k in zip(rows, keys, strict=True) if (k, ex.label) not in new]


def _refuse(path: Path, lost: list[Example] | None) -> DataError:
    if lost is None:
        what = "is not a data file generate can read"
    else:
        shown = "; ".join(f"line {ex.line}: '{ex.text}' {ex.label}" for ex in lost[:3])
        more = f"; ... {len(lost) - 3} more" if len(lost) > 3 else ""
        what = f"holds {len(lost)} row(s) data generate did not write ({shown}{more})"
    return DataError(
        f"{path} {what}; replacing it would lose them, so nothing was written",
        hint="move those rows to the reviewed data ([data] reviewed, which generate never "
        "writes: `ftctl data import-review`), write elsewhere with --out-dir/--name, or pass "
        "--force to replace the file anyway",
    )


def write_generated(
    cfg: DataConfig, *, with_ids: bool = False, force: bool = False, reporter: Reporter = NULL
) -> Generated:
    """Templates file -> examples -> OUT_DIR/NAME.jsonl and/or .csv (atomically), per ``cfg``,
    and OUT_DIR/NAME.generated.json recording them. Refuses (DataError, nothing written) to
    replace a file holding rows generate did not write unless ``force``, and (ConfigError)
    to write the reviewed data."""
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ConfigError(
            f"--name '{cfg.name}' must be a plain file stem", hint="e.g. --name train_v2"
        )
    exts = {"jsonl": [".jsonl"], "csv": [".csv"], "both": [".jsonl", ".csv"]}[cfg.format]
    paths = [Path(cfg.out_dir) / f"{cfg.name}{ext}" for ext in exts]
    for path in paths:
        if path.resolve() == Path(cfg.reviewed).resolve():
            raise ConfigError(
                f"{path} is the reviewed data ([data] reviewed): generate never writes it",
                hint="choose another --out-dir or --name",
            )
    templates = load_templates(cfg.templates)
    examples = generate(
        templates,
        per_intent=cfg.per_intent,
        seed=cfg.seed,
        with_ids=with_ids,
        max_chars=cfg.max_chars,
        reporter=reporter,
    )
    record = record_path(cfg.out_dir, cfg.name)
    recorded = _read_record(record)
    if not force:
        for path in paths:
            lost = foreign_rows(path, recorded, examples)
            if lost != []:
                raise _refuse(path, lost)
    written = {}
    for path in paths:
        fmt = file_format(path)
        body = (to_jsonl if fmt == "jsonl" else to_csv)(examples, with_ids=with_ids)
        atomic_write_text(path, body)
        written[path.name] = {"sha256": sha256_bytes(body.encode("utf-8")), "rows": len(examples)}
    atomic_write_text(record, _record_text(cfg, templates, {**recorded, **written}))
    return Generated(templates, examples, paths)


def _record_text(cfg: DataConfig, templates: Templates, files: dict) -> str:
    doc = {
        "written_by": "ftctl data generate",
        "note": "the files below are generate's own; it refuses to replace a file that changed",
        "templates": {"path": str(templates.path), "sha256": sha256_file(templates.path)},
        "per_intent": cfg.per_intent,
        "seed": cfg.seed,
        "files": files,
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
