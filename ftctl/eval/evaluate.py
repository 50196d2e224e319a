"""The comprehensive test (seed: ``comprehensive_test.py 500 12345``), one run end to end.

Flow: read the test pool -> draw N cases, stratified across intents, deterministic for a seed
(:mod:`.cases`) -> predict with the candidate (and the baseline, on the very same cases) ->
metrics (:mod:`.metrics`) -> the gate (:mod:`.gate`). The result is one JSON-ready dict
(schema in docs/eval.md); :mod:`ftctl.eval.report` renders it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftctl.clock import utc_iso
from ftctl.config import EvalConfig
from ftctl.eval.cases import Case, check_label_spaces, check_pairs, draw_cases, load_test_cases
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
        check_label_spaces(labels, base_labels, model_dir, base_dir)
    pairs = check_pairs(settings.pairs, labels, model_dir)
    device = resolve_device(settings.device)

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
    leaks = leakage(draw.cases, model_dir)
    report_leakage(leaks, strict, reporter)
    truth = [c.label for c in draw.cases]

    def result(path: Path, preds: list[str], secs: float) -> dict[str, Any]:
        out = {"path": str(path), "weights_sha256": _weights_sha(path)}
        out["labels"] = read_labels(path)
        out |= model_metrics(truth, preds, labels, pairs)
        out["seconds"] = secs
        out["cases_per_second"] = ratio(len(preds), secs)
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
        "created_utc": utc_iso(),
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
