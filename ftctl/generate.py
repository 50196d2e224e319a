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
``per_intent`` distinct texts. Output is deterministic for a seed. Pure: no printing, no typer.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftctl.config import DataConfig
from ftctl.data import DEFAULT_MAX_CHARS, Example, write_examples
from ftctl.errors import ConfigError, DataError, Problem
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
    seen: set[str] = set()
    max_attempts = n * _ATTEMPTS_PER_SAMPLE + len(order)
    for attempt in range(max_attempts):
        if len(out) >= n:
            break
        i = order[attempt % len(order)]
        body = _fill(it.phrasings[i], slots, rng)
        text = body.strip() if attempt < len(order) else _decorate(body, it.decorations, rng)
        if text and text not in seen:
            seen.add(text)
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
    owner: dict[str, _Origin] = {}
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
                other = owner.get(text)
                if other is not None and other.label != it.label:
                    raise DataError(
                        f"{templates.path}: the text '{text}' comes out of two intents: "
                        f"{other} and {origin}",
                        hint="a text may have only one label: reword one of the two phrasings",
                        problems=[
                            Problem(
                                f"'{text}' also generated by {other}",
                                templates.path,
                                field=f"intents.{origin.label}[{origin.index}]",
                            ),
                        ],
                    )
                owner[text] = origin
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


def write_generated(
    cfg: DataConfig, *, with_ids: bool = False, reporter: Reporter = NULL
) -> Generated:
    """Templates file -> examples -> OUT_DIR/NAME.jsonl and/or .csv (atomically), per ``cfg``."""
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ConfigError(
            f"--name '{cfg.name}' must be a plain file stem", hint="e.g. --name train_v2"
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
    exts = {"jsonl": [".jsonl"], "csv": [".csv"], "both": [".jsonl", ".csv"]}[cfg.format]
    paths = [
        write_examples(Path(cfg.out_dir) / f"{cfg.name}{ext}", examples, with_ids=with_ids)
        for ext in exts
    ]
    return Generated(templates, examples, paths)
