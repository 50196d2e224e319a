"""The test cases: the pool read and checked against the model's labels, and the seeded,
stratified draw both models see (the seed's ``comprehensive_test.py 500 12345``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ftctl.data.examples import DEFAULT_MAX_CHARS, Example, load_examples
from ftctl.errors import ConfigError, DataError, EvalError, Problem

# --------------------------------------------------------------------------- the draw


@dataclass(frozen=True)
class Case:
    """One drawn test case."""

    id: str
    text: str
    label: str


@dataclass(frozen=True)
class Draw:
    cases: list[Case]
    requested: int
    pool_size: int
    whole_pool: bool
    pool_per_intent: dict[str, int]

    @property
    def per_intent(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for c in self.cases:
            out[c.label] += 1
        return dict(sorted(out.items()))


def case_id(ex: Example) -> str:
    """The row's "id", or ``line-<n>`` when the file has none."""
    return ex.id if ex.id is not None else f"line-{ex.line}"


def draw_cases(examples: Sequence[Example], n: int, seed: int) -> Draw:
    """Draw ``n`` cases stratified across intents, deterministic for ``seed``.

    Intents take turns (in a seeded order), each giving its next seeded-random case, so every
    intent gets ``n // intents`` cases (or all it has) and the rest go to the others. If ``n``
    is at least the pool size, the whole pool is used. Cases keep the file's order.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.label].append(i)
    pool_per_intent = {lab: len(ix) for lab, ix in sorted(groups.items())}
    whole = n >= len(examples)
    if whole:
        chosen = list(range(len(examples)))
    else:
        rng = random.Random(seed)
        labels = sorted(groups)
        queues = {lab: rng.sample(groups[lab], len(groups[lab])) for lab in labels}
        rng.shuffle(labels)
        chosen, k = [], 0
        while len(chosen) < n:
            for lab in labels:
                if len(chosen) < n and k < len(queues[lab]):
                    chosen.append(queues[lab][k])
            k += 1
        chosen.sort()
    cases = [Case(case_id(examples[i]), examples[i].text, examples[i].label) for i in chosen]
    return Draw(cases, n, len(examples), whole, pool_per_intent)


def check_unique_ids(examples: Sequence[Example], path: Path) -> None:
    seen: dict[str, Example] = {}
    problems = []
    for ex in examples:
        cid = case_id(ex)
        if cid in seen:
            problems.append(
                Problem(f"id '{cid}' already used on line {seen[cid].line}", str(path), ex.line)
            )
        seen.setdefault(cid, ex)
    if problems:
        raise DataError(
            f"{path}: {len(problems)} duplicate case id(s):\n"
            + "\n".join(f"  {p}" for p in problems[:20]),
            hint='give every test case a unique "id" (the report records the drawn ids)',
            problems=problems,
        )


def load_test_cases(path: Path, labels: Sequence[str], model_dir: Path) -> list[Example]:
    try:
        examples = load_examples(
            path, max_chars=DEFAULT_MAX_CHARS, allowed_labels=labels, what="test"
        )
    except DataError as exc:
        if any(p.field == "label" for p in exc.problems):
            exc.hint = (
                f"every test label must be one of the model's labels ({model_dir}/config.json "
                f"id2label: {', '.join(labels)}); fix the rows named above or evaluate a model "
                "trained with those labels"
            )
        raise
    check_unique_ids(examples, path)
    return examples


def check_label_spaces(cand: list[str], base: list[str], model: Path, baseline: Path) -> None:
    missing = [lab for lab in base if lab not in cand]
    if missing:
        raise EvalError(
            f"the candidate {model} lacks {len(missing)} of the baseline's labels: "
            f"{', '.join(missing)}",
            hint="the candidate must keep every baseline label (it may add new ones); "
            "train it from the baseline (ftctl train --model-path BASELINE)",
        )


def check_pairs(
    pairs: Sequence[tuple[str, str]], labels: Sequence[str], model_dir: Path
) -> list[tuple[str, str]]:
    """The configured pairs, or a ConfigError (exit 2) naming every label the model lacks: a
    gate that silently checks no pair would pass what it was asked to check."""
    unknown = sorted({x for pair in pairs for x in pair if x not in labels})
    if unknown:
        bad = [f"{a}<->{b}" for a, b in pairs if a in unknown or b in unknown]
        raise ConfigError(
            f"confused pairs name label(s) that {model_dir} does not have: {', '.join(unknown)} "
            f"(pairs {', '.join(bad)})",
            hint="set [eval] pairs in ftctl.toml to pairs of the model's own labels, e.g. "
            'pairs = [["CLOCK_IN", "ATTENDANCE_TODAY"]], or pairs = [] to check none',
        )
    return [(a, b) for a, b in pairs]
