"""The comprehensive test (seed: ``comprehensive_test.py 500 12345``) and the forgetting gate.

Flow: read the test pool -> draw N cases, stratified across intents, deterministic for a seed
-> predict with the candidate (and the baseline, on the very same cases) -> metrics -> the gate.
The result is one JSON-ready dict (schema in docs/eval.md); :mod:`ftctl.report` renders it.

The gate (docs/eval.md, "The gate"): a check fails only when the candidate is worse by more than
``max_drop`` points AND a one-sided exact McNemar test on the paired per-case outcomes says the
loss is not chance (p < ``alpha``). Checks: every intent's recall, overall accuracy, and the
cross errors of every configured confused pair. Metrics and the confusion matrix come from
scikit-learn, the exact binomial (McNemar) p-values from ``scipy.stats.binomtest``.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ftctl.config import EvalConfig
from ftctl.data.examples import DEFAULT_MAX_CHARS, Example, load_examples, read_examples
from ftctl.data.textkey import text_keys
from ftctl.errors import ConfigError, DataError, EvalError, FtctlError, GateFailed, Problem
from ftctl.model.inference import resolve_device
from ftctl.progress import NULL, Reporter
from ftctl.terms import seed_term

SCHEMA_VERSION = 2
TOP_CONFUSIONS = 3  # per intent, in the report
LEAK_EXAMPLES = 5  # leaked cases named in the warning (all of them in report.json)


# --------------------------------------------------------------------------- inference


def predict(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
    device: str | None = None,
    *,
    advance: Callable[[int], None] | None = None,
) -> tuple[list[str], list[float]]:
    """Labels and their softmax probabilities for ``texts``, in input order.

    Batched, length-sorted (little padding per batch), under ``torch.inference_mode()``.
    ``device`` None keeps the model where it is. ``advance(n)`` is called after each batch.
    """
    import torch

    if device is not None:
        model.to(device)
    target = next(model.parameters()).device
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    labels: list[str] = [""] * len(texts)
    scores: list[float] = [0.0] * len(texts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(target) for k, v in enc.items()}
            probs = model(**enc).logits.float().softmax(-1)
            best, arg = probs.max(-1)
            for i, a, s in zip(idx, arg.tolist(), best.tolist(), strict=True):
                labels[i], scores[i] = id2label[a], s
            if advance is not None:
                advance(len(idx))
    return labels, scores


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


# --------------------------------------------------------------------------- metrics


def confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """Rows: true label, columns: predicted label, both in ``labels`` order (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    if not y_true:
        return [[0] * len(labels) for _ in labels]
    return sk_confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def model_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    pairs: Sequence[tuple[str, str]],
) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the intents present in the test cases), per-intent
    precision/recall/F1/support (scikit-learn's, ``zero_division=0``), the confusion matrix,
    top confusions and the pairs' errors."""
    from sklearn.metrics import precision_recall_fscore_support

    m = confusion_matrix(y_true, y_pred, labels)
    n = len(y_true)
    correct = sum(m[i][i] for i in range(len(labels)))
    truth = set(y_true)
    present = [lab for lab in labels if lab in truth]
    per_intent: dict[str, dict[str, float | int]] = {}
    top: dict[str, list[dict[str, Any]]] = {}
    if present:
        p, r, f, sup = precision_recall_fscore_support(
            y_true, y_pred, labels=present, zero_division=0
        )
        for k, lab in enumerate(present):
            per_intent[lab] = {
                "precision": float(p[k]),
                "recall": float(r[k]),
                "f1": float(f[k]),
                "support": int(sup[k]),
            }
    for i, lab in enumerate(labels):
        if lab not in per_intent:
            continue
        wrong = sorted(
            ((m[i][j], labels[j]) for j in range(len(labels)) if j != i and m[i][j]),
            key=lambda cl: (-cl[0], cl[1]),
        )
        top[lab] = [{"predicted": p, "count": c} for c, p in wrong[:TOP_CONFUSIONS]]
    macro_f1 = _ratio(sum(v["f1"] for v in per_intent.values()), len(per_intent))
    return {
        "n": n,
        "correct": correct,
        "accuracy": _ratio(correct, n),
        "macro_f1": macro_f1,
        "per_intent": per_intent,
        "confusion": {"labels": list(labels), "matrix": m},
        "top_confusions": top,
        "pairs": [pair_errors(y_true, y_pred, a, b) for a, b in pairs],
    }


def pair_errors(y_true: Sequence[str], y_pred: Sequence[str], a: str, b: str) -> dict[str, Any]:
    """Errors in each direction of a confused pair: A predicted as B, B predicted as A."""
    a_as_b = sum(t == a and p == b for t, p in zip(y_true, y_pred, strict=True))
    b_as_a = sum(t == b and p == a for t, p in zip(y_true, y_pred, strict=True))
    return {
        "a": a,
        "b": b,
        "a_as_b": a_as_b,
        "b_as_a": b_as_a,
        "cross_errors": a_as_b + b_as_a,
        "a_support": sum(t == a for t in y_true),
        "b_support": sum(t == b for t in y_true),
    }


# --------------------------------------------------------------------------- the gate


def mcnemar_p(losses: int, gains: int) -> float:
    """One-sided exact McNemar test: P(X >= losses) for X ~ Binomial(losses + gains, 1/2)
    (``scipy.stats.binomtest(..., alternative="greater")``).

    ``losses``: cases the baseline got right and the candidate wrong; ``gains``: the reverse.
    Small p means the candidate loses more cases than chance explains. Swap the arguments for
    the other direction (does it gain more than chance explains?).
    """
    from scipy.stats import binomtest

    if losses == 0:
        return 1.0
    return float(binomtest(losses, losses + gains, 0.5, alternative="greater").pvalue)


def _verdict(change: str, significant: bool, failed: bool) -> str:
    if failed:
        return "FAIL (worse, significant)"
    if change == "unchanged":
        return "unchanged"
    if change == "worse" and significant:
        return "worse (significant, within max_drop)"
    return f"{change} ({'significant' if significant else 'not significant'})"


def gate_check(
    kind: str,
    name: str,
    metric: str,
    before_ok: Sequence[bool],
    after_ok: Sequence[bool],
    *,
    max_drop: float,
    alpha: float,
) -> dict[str, Any]:
    """One paired check. ``*_ok`` says per case whether the outcome was good (correct, or not
    a cross error). Fails when the good share drops by more than ``max_drop`` points AND the
    exact one-sided McNemar p-value is below ``alpha``."""
    n = len(before_ok)
    losses = sum(b and not a for b, a in zip(before_ok, after_ok, strict=True))
    gains = sum(a and not b for b, a in zip(before_ok, after_ok, strict=True))
    good_before, good_after = _ratio(sum(before_ok), n), _ratio(sum(after_ok), n)
    bad = metric == "cross_error_rate"  # reported as the error share; worse = higher
    before, after = (1 - good_before, 1 - good_after) if bad else (good_before, good_after)
    worse_by = (good_before - good_after) * 100
    p, p_gain = mcnemar_p(losses, gains), mcnemar_p(gains, losses)
    change = "worse" if losses > gains else "improved" if gains > losses else "unchanged"
    significant = (p if change == "worse" else p_gain) < alpha and change != "unchanged"
    failed = worse_by > max_drop and p < alpha
    return {
        "kind": kind,
        "name": name,
        "metric": metric,
        "n": n,
        "before": before * 100,
        "after": after * 100,
        "worse_by_points": worse_by,
        "losses": losses,
        "gains": gains,
        "p_value": p,
        "p_value_gain": p_gain,
        "change": change,
        "significant": significant,
        "verdict": _verdict(change, significant, failed),
        "failed": failed,
        "over_max_drop": worse_by > max_drop,
    }


def _describe(c: dict[str, Any], alpha: float) -> str:
    what = {"intent": f"intent {c['name']}", "overall": "overall", "pair": f"pair {c['name']}"}
    sign = "+" if c["metric"] == "cross_error_rate" else "-"
    return (
        f"{what[c['kind']]}: {c['metric']} {c['before']:.1f}% -> {c['after']:.1f}% "
        f"({sign}{abs(c['worse_by_points']):.1f} points over {c['n']} cases; "
        f"{c['losses']} lost, {c['gains']} gained; McNemar p={c['p_value']:.3g} "
        f"{'<' if c['p_value'] < alpha else '>='} {alpha})"
    )


def gate(
    cases: Sequence[Case],
    before: Sequence[str],
    after: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    *,
    max_drop: float,
    alpha: float,
) -> dict[str, Any]:
    """The verdict: every intent's recall, overall accuracy, each pair's cross errors."""
    truth = [c.label for c in cases]
    ok_b = [t == p for t, p in zip(truth, before, strict=True)]
    ok_a = [t == p for t, p in zip(truth, after, strict=True)]
    kw = {"max_drop": max_drop, "alpha": alpha}
    checks = [gate_check("overall", "all", "accuracy", ok_b, ok_a, **kw)]
    for lab in sorted(set(truth)):
        idx = [i for i, t in enumerate(truth) if t == lab]
        checks.append(
            gate_check(
                "intent", lab, "recall", [ok_b[i] for i in idx], [ok_a[i] for i in idx], **kw
            )
        )
    for a, b in pairs:
        idx = [i for i, t in enumerate(truth) if t in (a, b)]
        if not idx:
            continue

        def clean(pred: Sequence[str], idx=idx, a=a, b=b) -> list[bool]:
            return [{truth[i], pred[i]} != {a, b} for i in idx]

        checks.append(
            gate_check("pair", f"{a}<->{b}", "cross_error_rate", clean(before), clean(after), **kw)
        )
    failed = [c for c in checks if c["failed"]]
    near = [c for c in checks if c["over_max_drop"] and not c["failed"]]
    if failed:
        reasons = [_describe(c, alpha) for c in failed]
    else:
        n_int = sum(c["kind"] == "intent" for c in checks)
        n_pair = sum(c["kind"] == "pair" for c in checks)
        reasons = [
            f"no significant regression: overall accuracy, {n_int} intents and {n_pair} "
            f"confused pairs are within {max_drop} points or not significant at {alpha}"
        ]
    return {
        "verdict": "FAIL" if failed else "PASS",
        "reasons": reasons,
        "not_significant": [_describe(c, alpha) for c in near],
        "rule": (
            f"a check fails when the candidate is worse by more than {max_drop} points AND the "
            f"one-sided exact McNemar test on paired per-case outcomes gives p < {alpha}"
        ),
        "checks": checks,
    }


# --------------------------------------------------------------------------- the whole run


def _weights_sha(model_dir: Path) -> str | None:
    from ftctl.fsutil import sha256_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return sha256_file(model_dir / name)
    return None


def _run_model(
    model_dir: Path,
    cases: Sequence[Case],
    settings: EvalConfig,
    device: str,
    what: str,
    reporter: Reporter,
) -> tuple[list[str], list[float], float]:
    from ftctl.model.files import TRAIN_DTYPE, load_classifier

    reporter.stage(f"{what}: {model_dir}")
    # fp16/bf16 weights run in fp32 on a CPU (half-precision matmuls are far slower there)
    dtype = TRAIN_DTYPE if device == "cpu" else None
    model, tokenizer = load_classifier(model_dir, device=device, dtype=dtype)
    start = time.perf_counter()
    with reporter.task(f"predict ({what})", total=len(cases), unit="cases") as advance:
        labels, scores = predict(
            model,
            tokenizer,
            [c.text for c in cases],
            settings.batch_size,
            settings.max_length,
            advance=advance,
        )
    return labels, scores, time.perf_counter() - start


def _load_test_cases(path: Path, labels: Sequence[str], model_dir: Path) -> list[Example]:
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


def _check_label_spaces(cand: list[str], base: list[str], model: Path, baseline: Path) -> None:
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


# --------------------------------------------------------------------------- leakage


def leakage(cases: Sequence[Case], model_dir: Path) -> dict[str, Any]:
    """Test cases whose text is in the training data recorded in ``model_dir``'s manifest
    (``data``: new, new_2..., old, train), "the same text" as the model sees it
    (:func:`ftctl.data.textkey.text_key` with its tokenizer); each file's status: checked, changed
    (sha256 differs from the manifest's; still checked), missing or unreadable."""
    from ftctl.fsutil import sha256_file
    from ftctl.manifest import MANIFEST, read_manifest
    from ftctl.model.files import load_tokenizer

    out: dict[str, Any] = {"checked": False, "sources": [], "n": 0, "of": len(cases), "cases": []}
    if not (model_dir / MANIFEST).is_file():
        out["reason"] = f"no {MANIFEST}: the candidate's training data is not recorded"
        return out
    tokenizer = load_tokenizer(model_dir)
    index: dict[Any, Example] = {}
    for role, rec in (read_manifest(model_dir).get("data") or {}).items():
        if not isinstance(rec, dict) or not rec.get("path"):
            continue
        path = Path(rec["path"])
        src = {"role": role, "path": str(path), "status": "checked"}
        out["sources"].append(src)
        if not path.is_file():
            src["status"] = "missing"
            continue
        if rec.get("sha256") and sha256_file(path) != rec["sha256"]:
            src["status"] = "changed"
        try:
            examples = read_examples(path).examples
        except FtctlError:
            src["status"] = "unreadable"
            continue
        for key, ex in zip(text_keys([ex.text for ex in examples], tokenizer), examples,
                           strict=True):  # fmt: skip
            index.setdefault(key, ex)
    out["checked"] = any(s["status"] in ("checked", "changed") for s in out["sources"])
    for c, key in zip(cases, text_keys([c.text for c in cases], tokenizer), strict=True):
        hit = index.get(key)
        if hit is not None:
            out["cases"].append(
                {"id": c.id, "text": c.text, "label": c.label, "train": hit.source,
                 "train_label": hit.label}
            )  # fmt: skip
    out["n"] = len(out["cases"])
    return out


def _report_leakage(leaks: dict[str, Any], strict: bool, reporter: Reporter) -> None:
    for src in leaks["sources"]:
        if src["status"] in ("missing", "unreadable"):
            reporter.warn(
                f"leakage check: {src['path']} ({src['role']} data in the candidate's manifest) "
                f"is {src['status']} here; test cases were not compared with it"
            )
        elif src["status"] == "changed":
            reporter.warn(
                f"leakage check: {src['path']} changed since training (sha256 differs from the "
                "candidate's manifest); compared with its current content"
            )
    if not leaks["n"]:
        return
    files = Counter(c["train"].rsplit(":", 1)[0] for c in leaks["cases"])
    shown = "; ".join(
        f"'{c['text']}' ({c['label']}, {c['train']})" for c in leaks["cases"][:LEAK_EXAMPLES]
    )
    message = (
        f"{leaks['n']} of the {leaks['of']} test cases also appear in the candidate's training "
        f"data ({', '.join(f'{f}: {n}' for f, n in sorted(files.items()))}), e.g. {shown}; "
        "the scores on them measure memory, not generalisation"
    )
    if strict:
        raise DataError(
            message,
            hint="remove those texts from the test pool (or from the training data) and re-run; "
            "report.json lists every one under leakage.cases",
        )
    reporter.warn(message)


# --------------------------------------------------------------------------- flips + verdicts


def flips(cases: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The cases whose outcome changed: ``lost`` (right before, wrong now), ``gained``."""
    keys = ("id", "text", "label", "baseline", "baseline_score", "candidate", "candidate_score")
    lost = [c for c in cases if c["baseline"] == c["label"] != c["candidate"]]
    gained = [c for c in cases if c["candidate"] == c["label"] != c["baseline"]]
    return {
        "lost": [{k: c[k] for k in keys} for c in lost],
        "gained": [{k: c[k] for k in keys} for c in gained],
    }


def pair_verdicts(comparison: dict[str, Any], checks: Sequence[dict[str, Any]]) -> None:
    """Add to every comparison pair its check's outcome: improved / unchanged / worse, whether
    significant, the cases fixed and broken and both p-values ("untested" without cases)."""
    by_name = {c["name"]: c for c in checks if c["kind"] == "pair"}
    for p in comparison["pairs"]:
        c = by_name.get(f"{p['a']}<->{p['b']}")
        if c is None:
            p |= {
                "change": "untested",
                "significant": False,
                "fixed": 0,
                "broken": 0,
                "p_value": None,
                "p_value_gain": None,
                "verdict": "not tested: no drawn case is labelled with either intent",
            }
            continue
        p |= {
            "change": c["change"],
            "significant": c["significant"],
            "fixed": c["gains"],
            "broken": c["losses"],
            "p_value": c["p_value"],
            "p_value_gain": c["p_value_gain"],
            "verdict": c["verdict"],
        }


def run_eval(
    model_dir: str | Path,
    settings: EvalConfig,
    *,
    baseline_dir: str | Path | None = None,
    strict: bool = False,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` (and ``baseline_dir`` on the same cases); the report dict.

    Test cases found in the candidate's training data (its manifest's data files) are a
    warning, or with ``strict`` a DataError before any model runs."""
    from ftctl import __version__
    from ftctl.fsutil import sha256_file
    from ftctl.model.files import read_labels

    model_dir = Path(model_dir)
    base_dir = Path(baseline_dir) if baseline_dir is not None else None
    labels = read_labels(model_dir)
    base_labels = read_labels(base_dir) if base_dir is not None else None
    if base_dir is not None and base_labels is not None:
        _check_label_spaces(labels, base_labels, model_dir, base_dir)
    pairs = check_pairs(settings.pairs, labels, model_dir)
    device = resolve_device(settings.device)

    examples = _load_test_cases(Path(settings.test_data), labels, model_dir)
    draw = draw_cases(examples, settings.samples, settings.seed)
    if draw.whole_pool:
        reporter.warn(
            f"--samples {settings.samples} >= the pool of {draw.pool_size} test cases in "
            f"{settings.test_data}: using the whole pool"
        )
    reporter.info(
        f"{len(draw.cases)} cases over {len(draw.per_intent)} intents "
        f"(seed {settings.seed}, pool {draw.pool_size})"
    )
    leaks = leakage(draw.cases, model_dir)
    _report_leakage(leaks, strict, reporter)
    truth = [c.label for c in draw.cases]

    def result(path: Path, preds: list[str], secs: float) -> dict[str, Any]:
        out = {"path": str(path), "weights_sha256": _weights_sha(path)}
        out["labels"] = read_labels(path)
        out |= model_metrics(truth, preds, labels, pairs)
        out["seconds"] = secs
        out["cases_per_second"] = _ratio(len(preds), secs)
        return out

    cand_pred, cand_score, cand_secs = _run_model(
        model_dir, draw.cases, settings, device, "candidate", reporter
    )
    candidate = result(model_dir, cand_pred, cand_secs)
    baseline = comparison = None
    base_pred: list[str] | None = None
    base_score: list[float] | None = None
    verdict: dict[str, Any] = {
        "verdict": "SKIPPED",
        "reasons": ["no --baseline given: nothing to compare against, no gate"],
        "not_significant": [],
        "rule": None,
        "checks": [],
    }
    if base_dir is not None:
        base_pred, base_score, base_secs = _run_model(
            base_dir, draw.cases, settings, device, "baseline", reporter
        )
        baseline = result(base_dir, base_pred, base_secs)
        comparison = compare(baseline, candidate)
        verdict = gate(
            draw.cases,
            base_pred,
            cand_pred,
            pairs,
            max_drop=settings.max_drop,
            alpha=settings.alpha,
        )
        pair_verdicts(comparison, verdict["checks"])

    cases = []
    for i, c in enumerate(draw.cases):
        row: dict[str, Any] = {"id": c.id, "text": c.text, "label": c.label}
        row |= {"candidate": cand_pred[i], "candidate_score": round(cand_score[i], 4)}
        if base_pred is not None and base_score is not None:
            row |= {"baseline": base_pred[i], "baseline_score": round(base_score[i], 4)}
        cases.append(row)

    return {
        "schema_version": SCHEMA_VERSION,
        "ftctl_version": __version__,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {
            "samples": settings.samples,
            "seed": settings.seed,
            "max_drop": settings.max_drop,
            "alpha": settings.alpha,
            "batch_size": settings.batch_size,
            "max_length": settings.max_length,
            "device": device,
            "pairs": [list(p) for p in pairs],
        },
        "test_data": {
            "path": str(settings.test_data),
            "sha256": sha256_file(settings.test_data),
            "pool_size": draw.pool_size,
            "pool_per_intent": draw.pool_per_intent,
        },
        "draw": {
            "requested": draw.requested,
            "drawn": len(draw.cases),
            "whole_pool": draw.whole_pool,
            "per_intent": draw.per_intent,
            "case_ids": [c.id for c in draw.cases],
        },
        "leakage": leaks,
        "candidate": candidate,
        "baseline": baseline,
        "comparison": comparison,
        "gate": verdict,
        "flips": flips(cases) if base_pred is not None else None,
        "cases": cases,
    }


def compare(baseline: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Before (baseline) and after (candidate): overall, per intent, per pair."""

    def delta(key: str) -> dict[str, float]:
        b, a = baseline[key], candidate[key]
        return {"before": b, "after": a, "delta_points": (a - b) * 100}

    per_intent = {}
    for lab, after in candidate["per_intent"].items():
        before = baseline["per_intent"].get(lab, {"recall": 0.0, "f1": 0.0})
        per_intent[lab] = {
            "recall_before": before["recall"],
            "recall_after": after["recall"],
            "delta_points": (after["recall"] - before["recall"]) * 100,
            "f1_before": before["f1"],
            "f1_after": after["f1"],
        }
    pairs = [
        {
            "a": pb["a"],
            "b": pb["b"],
            "before": {k: pb[k] for k in ("a_as_b", "b_as_a", "cross_errors")},
            "after": {k: pa[k] for k in ("a_as_b", "b_as_a", "cross_errors")},
        }
        for pb, pa in zip(baseline["pairs"], candidate["pairs"], strict=True)
    ]
    return {
        "accuracy": delta("accuracy"),
        "macro_f1": delta("macro_f1"),
        "per_intent": per_intent,
        "pairs": pairs,
    }


def check_gate(report: dict[str, Any], report_dir: Path | str | None = None) -> None:
    """Raise :class:`GateFailed` (exit 4) when ``report``'s gate failed; eval, pipeline and
    demo all stop here."""
    gate = report["gate"]
    if gate["verdict"] != "FAIL":
        return
    reasons = gate["reasons"]
    where = f"see {report_dir}/report.md for what got worse; " if report_dir else ""
    raise GateFailed(
        f"gate FAILED: the candidate regresses against the baseline in {len(reasons)} "
        "check(s):\n" + "\n".join(f"  {r}" for r in reasons),
        hint=f"do not deploy it; {where}the seed's FAQ on {seed_term('other intents dropped')}: "
        "raise --replay-ratio (0.7-0.8) or lower --epochs/--lr, and retrain",
    )
