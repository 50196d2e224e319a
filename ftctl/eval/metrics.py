"""What a model's answers on the drawn cases come to: accuracy, per-intent recall and F1, the
confusion matrix, the confused pairs' cross errors (scikit-learn), and the flipped cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOP_CONFUSIONS = 3  # per intent, in the report


# --------------------------------------------------------------------------- metrics


def confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """Rows: true label, columns: predicted label, both in ``labels`` order (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    if not y_true:
        return [[0] * len(labels) for _ in labels]
    return sk_confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()


def ratio(a: float, b: float) -> float:
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
    macro_f1 = ratio(sum(v["f1"] for v in per_intent.values()), len(per_intent))
    return {
        "n": n,
        "correct": correct,
        "accuracy": ratio(correct, n),
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
