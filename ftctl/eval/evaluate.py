"""The comprehensive test (seed: ``comprehensive_test.py 500 12345``), one run end to end.

Flow: read the test pool -> draw N cases, stratified across intents, deterministic for a seed
(:mod:`.cases`) -> predict with the candidate (and the baseline, on the very same cases) ->
metrics (:mod:`.metrics`) -> the gate (:mod:`.gate`). The result is one JSON-ready dict
(schema in docs/eval.md); :mod:`ftctl.eval.report` renders it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftctl import __version__
from ftctl.clock import utc_iso
from ftctl.config import EvalConfig
from ftctl.eval.cases import (
    Case,
    Draw,
    check_label_spaces,
    check_pairs,
    draw_cases,
    load_test_cases,
)
from ftctl.eval.gate import compare, gate, pair_verdicts
from ftctl.eval.leakage import leakage, report_leakage
from ftctl.eval.metrics import flips, model_metrics, ratio
from ftctl.model.inference import predict, resolve_device
from ftctl.progress import NULL, Reporter

SCHEMA_VERSION = 2


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


@dataclass(frozen=True)
class _Scored:
    """One model's answers on the drawn cases and its part of the report."""

    preds: list[str]
    scores: list[float]
    result: dict[str, Any]


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
    model_dir = Path(model_dir)
    base_dir = Path(baseline_dir) if baseline_dir is not None else None
    labels, pairs = _label_space(model_dir, base_dir, settings)
    device = resolve_device(settings.device)
    draw = _draw(settings, labels, model_dir, reporter)
    leaks = leakage(draw.cases, model_dir)
    report_leakage(leaks, strict, reporter)

    def score(path: Path, what: str) -> _Scored:
        return _score(path, what, draw.cases, labels, pairs, settings, device, reporter)

    candidate = score(model_dir, "candidate")
    baseline = score(base_dir, "baseline") if base_dir is not None else None
    verdict, comparison = _judge(draw.cases, candidate, baseline, pairs, settings)
    cases = _case_rows(draw.cases, candidate, baseline)
    return {
        "schema_version": SCHEMA_VERSION,
        "ftctl_version": __version__,
        "created_utc": utc_iso(),
        "settings": _settings(settings, device, pairs),
        "test_data": _test_data(settings, draw),
        "draw": _drawn(draw),
        "leakage": leaks,
        "candidate": candidate.result,
        "baseline": baseline.result if baseline is not None else None,
        "comparison": comparison,
        "gate": verdict,
        "flips": flips(cases) if baseline is not None else None,
        "cases": cases,
    }


# --------------------------------------------------------------------------- its steps


def _label_space(
    model_dir: Path, base_dir: Path | None, settings: EvalConfig
) -> tuple[list[str], list[tuple[str, str]]]:
    """The candidate's labels (the baseline's must match) and the confused pairs among them."""
    from ftctl.model.files import read_labels

    labels = read_labels(model_dir)
    base_labels = read_labels(base_dir) if base_dir is not None else None
    if base_dir is not None and base_labels is not None:
        check_label_spaces(labels, base_labels, model_dir, base_dir)
    return labels, check_pairs(settings.pairs, labels, model_dir)


def _draw(settings: EvalConfig, labels: list[str], model_dir: Path, reporter: Reporter) -> Draw:
    """Read the test pool and draw the cases (seeded, stratified); say what was drawn."""
    examples = load_test_cases(Path(settings.test_data), labels, model_dir)
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
    return draw


def _score(
    path: Path,
    what: str,
    cases: Sequence[Case],
    labels: list[str],
    pairs: list[tuple[str, str]],
    settings: EvalConfig,
    device: str,
    reporter: Reporter,
) -> _Scored:
    """Run one model on the cases: its answers, metrics against the truth, speed."""
    from ftctl.model.files import read_labels

    preds, scores, secs = _run_model(path, cases, settings, device, what, reporter)
    result = {"path": str(path), "weights_sha256": _weights_sha(path)}
    result["labels"] = read_labels(path)
    result |= model_metrics([c.label for c in cases], preds, labels, pairs)
    result["seconds"] = secs
    result["cases_per_second"] = ratio(len(preds), secs)
    return _Scored(preds, scores, result)


def _judge(
    cases: Sequence[Case],
    candidate: _Scored,
    baseline: _Scored | None,
    pairs: list[tuple[str, str]],
    settings: EvalConfig,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The gate's verdict and the side-by-side comparison (SKIPPED, None without a baseline)."""
    if baseline is None:
        return {
            "verdict": "SKIPPED",
            "reasons": ["no --baseline given: nothing to compare against, no gate"],
            "not_significant": [],
            "rule": None,
            "checks": [],
        }, None
    comparison = compare(baseline.result, candidate.result)
    verdict = gate(
        cases,
        baseline.preds,
        candidate.preds,
        pairs,
        max_drop=settings.max_drop,
        alpha=settings.alpha,
    )
    pair_verdicts(comparison, verdict["checks"])
    return verdict, comparison


def _case_rows(
    cases: Sequence[Case], candidate: _Scored, baseline: _Scored | None
) -> list[dict[str, Any]]:
    """One row per drawn case: its truth and each model's answer and score."""
    rows = []
    for i, c in enumerate(cases):
        row: dict[str, Any] = {"id": c.id, "text": c.text, "label": c.label}
        row |= {"candidate": candidate.preds[i], "candidate_score": round(candidate.scores[i], 4)}
        if baseline is not None:
            row |= {"baseline": baseline.preds[i], "baseline_score": round(baseline.scores[i], 4)}
        rows.append(row)
    return rows


def _settings(settings: EvalConfig, device: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "samples": settings.samples,
        "seed": settings.seed,
        "max_drop": settings.max_drop,
        "alpha": settings.alpha,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "device": device,
        "pairs": [list(p) for p in pairs],
    }


def _test_data(settings: EvalConfig, draw: Draw) -> dict[str, Any]:
    from ftctl.fsutil import sha256_file

    return {
        "path": str(settings.test_data),
        "sha256": sha256_file(settings.test_data),
        "pool_size": draw.pool_size,
        "pool_per_intent": draw.pool_per_intent,
    }


def _drawn(draw: Draw) -> dict[str, Any]:
    return {
        "requested": draw.requested,
        "drawn": len(draw.cases),
        "whole_pool": draw.whole_pool,
        "per_intent": draw.per_intent,
        "case_ids": [c.id for c in draw.cases],
    }
