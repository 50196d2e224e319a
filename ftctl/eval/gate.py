"""The forgetting gate (docs/eval.md, "The gate"): the candidate against the baseline.

A check fails only when the candidate is worse by more than ``max_drop`` points AND a one-sided
exact McNemar test on the paired per-case outcomes says the loss is not chance (p < ``alpha``).
Checks: every intent's recall, overall accuracy, and the cross errors of every configured
confused pair. The exact binomial (McNemar) p-values come from ``scipy.stats.binomtest``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftctl.errors import GateFailed
from ftctl.eval.cases import Case
from ftctl.eval.metrics import ratio
from ftctl.terms import seed_term

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
    good_before, good_after = ratio(sum(before_ok), n), ratio(sum(after_ok), n)
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
