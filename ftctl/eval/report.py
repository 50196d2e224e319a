"""Render an eval report (the dict from :func:`ftctl.eval.evaluate.run_eval`): report.json,
report.md, confusion_matrix.png and per_intent_before_after.png (:mod:`.plots`), all written
atomically; and the gate's verdict beside the candidate model (``eval_report.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftctl.eval.plots import before_after_png, confusion_png, find_cjk_font
from ftctl.fsutil import atomic_write_bytes
from ftctl.progress import NULL, Reporter
from ftctl.terms import seed_term

REPORT_FILES = (
    "report.json",
    "report.md",
    "confusion_matrix.png",
    "per_intent_before_after.png",
)


# --------------------------------------------------------------------------- markdown


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _cell(text: Any) -> str:
    """A value safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _p(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


MD_FLIPS = 200  # flipped cases listed per direction in report.md (all of them in report.json)


def _checks_md(gate: dict[str, Any]) -> list[str]:
    """Every gate check: n, before/after, losses, gains, both one-sided p-values, verdict."""
    out = [
        "## Checks",
        "",
        "losses: right before, wrong now; gains: the reverse (for a pair: cross errors "
        "made / fixed). p (worse) and p (better): one-sided exact McNemar (binomial) p-values.",
        "",
        "| check | metric | n | before | after | Δ points | losses | gains | p (worse) "
        "| p (better) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in gate["checks"]:
        delta = -c["worse_by_points"]
        out.append(
            f"| {c['kind']} {_cell(c['name'])} | {c['metric']} | {c['n']} | {c['before']:.1f}% | "
            f"{c['after']:.1f}% | {delta:+.1f} | {c['losses']} | {c['gains']} | "
            f"{_p(c['p_value'])} | {_p(c['p_value_gain'])} | {c['verdict']} |"
        )
    return [*out, ""]


def _pairs_md(comp: dict[str, Any]) -> list[str]:
    """One verdict line per target pair."""
    out = [f"## {seed_term('target pairs')}", ""]
    if not comp["pairs"]:
        return [*out, "No confused pairs configured ([eval] pairs).", ""]
    for p in comp["pairs"]:
        b, a = p["before"]["cross_errors"], p["after"]["cross_errors"]
        detail = (
            ""
            if p["change"] == "untested"
            else f": cross errors {b} → {a} ({p['fixed']} fixed, {p['broken']} new; "
            f"p (worse) {_p(p['p_value'])}, p (better) {_p(p['p_value_gain'])})"
        )
        out.append(f"- **{p['a']} ↔ {p['b']}: {p['verdict']}**{detail}")
    return [*out, ""]


def _flips_md(flips: dict[str, Any]) -> list[str]:
    out = ["## Flipped cases", ""]
    for key, title in (
        ("lost", "Right before, wrong now"),
        ("gained", "Wrong before, right now"),
    ):
        rows = flips[key]
        out += [f"### {title} ({len(rows)})", ""]
        if not rows:
            out += ["None.", ""]
            continue
        out += [
            "| id | text | label | before (baseline) | score | after (candidate) | score |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in rows[:MD_FLIPS]:
            out.append(
                f"| {_cell(c['id'])} | {_cell(c['text'])} | {c['label']} | {c['baseline']} | "
                f"{c['baseline_score']:.3f} | {c['candidate']} | {c['candidate_score']:.3f} |"
            )
        if len(rows) > MD_FLIPS:
            out.append(f"\n... and {len(rows) - MD_FLIPS} more in report.json (flips.{key}).")
        out.append("")
    return out


def _leakage_md(leaks: dict[str, Any]) -> list[str]:
    out = ["## Test data in the training data", ""]
    if not leaks["checked"]:
        reason = leaks.get("reason") or "no training data file recorded in the manifest is here"
        return [*out, f"Not checked: {reason}.", ""]
    files = ", ".join(f"`{s['path']}` ({s['role']}, {s['status']})" for s in leaks["sources"])
    out.append(f"{leaks['n']} of {leaks['of']} test cases appear in {files}.")
    out.append("")
    if leaks["cases"]:
        out += ["| id | text | label | training row | its label |", "|---|---|---|---|---|"]
        for c in leaks["cases"][:MD_FLIPS]:
            out.append(
                f"| {_cell(c['id'])} | {_cell(c['text'])} | {c['label']} | {_cell(c['train'])} "
                f"| {c['train_label']} |"
            )
        out.append("")
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the verdict first, then what was compared, then the detail."""
    cand, base, comp, gate = (
        report["candidate"],
        report["baseline"],
        report["comparison"],
        report["gate"],
    )
    out = _verdict_md(gate)
    if comp:
        out += _pairs_md(comp)
    out += _setup_md(report)
    out += _overall_md(cand, base)
    out += _per_intent_md(cand, comp)
    out += _confused_pairs_md(cand, comp)
    if gate["checks"]:
        out += _checks_md(gate)
    if report.get("flips") is not None:
        out += _flips_md(report["flips"])
    out += _leakage_md(report["leakage"])
    out += _confusions_md(cand)
    return "\n".join(out)


def _verdict_md(gate: dict[str, Any]) -> list[str]:
    out = [
        "# ftctl eval report",
        "",
        f"**Verdict: {gate['verdict']}**",
        "",
        *[f"- {r}" for r in gate["reasons"]],
        "",
    ]
    if gate["not_significant"]:
        out += ["Drops over max_drop but not significant (not failing):", ""]
        out += [f"- {r}" for r in gate["not_significant"]] + [""]
    if gate["rule"]:
        out += [f"Rule: {gate['rule']}.", ""]
    return out


def _setup_md(report: dict[str, Any]) -> list[str]:
    cand, base = report["candidate"], report["baseline"]
    draw, s = report["draw"], report["settings"]
    return [
        f"- candidate: `{cand['path']}`",
        f"- baseline: `{base['path']}`" if base else "- baseline: none",
        f"- test data: `{report['test_data']['path']}` (pool {report['test_data']['pool_size']}, "
        f"drew {draw['drawn']} of {draw['requested']} requested with seed {s['seed']}"
        f"{', whole pool' if draw['whole_pool'] else ''})",
        f"- device {s['device']}, batch {s['batch_size']}, max_drop {s['max_drop']} points, "
        f"alpha {s['alpha']}",
        "",
    ]


def _overall_md(cand: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    out = ["## Overall", "", "| | accuracy | macro-F1 | cases/s |", "|---|---|---|---|"]
    for name, r in (("baseline", base), ("candidate", cand)):
        if r:
            out.append(
                f"| {name} | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | "
                f"{r['cases_per_second']:.0f} |"
            )
    return out


def _per_intent_md(cand: dict[str, Any], comp: dict[str, Any] | None) -> list[str]:
    out = ["", "## Per intent", ""]
    if comp:
        out += [
            "| intent | support | recall before | recall after | Δ points | precision | F1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for lab, d in comp["per_intent"].items():
            pi = cand["per_intent"][lab]
            out.append(
                f"| {lab} | {pi['support']} | {_pct(d['recall_before'])} | "
                f"{_pct(d['recall_after'])} | {d['delta_points']:+.1f} | "
                f"{_pct(pi['precision'])} | {_pct(pi['f1'])} |"
            )
        return out
    out += ["| intent | support | precision | recall | F1 |", "|---|---|---|---|---|"]
    for lab, pi in cand["per_intent"].items():
        out.append(
            f"| {lab} | {pi['support']} | {_pct(pi['precision'])} | {_pct(pi['recall'])} | "
            f"{_pct(pi['f1'])} |"
        )
    return out


def _confused_pairs_md(cand: dict[str, Any], comp: dict[str, Any] | None) -> list[str]:
    out = ["", f"## {seed_term('confused pairs')}", "", "| pair | A→B | B→A |", "|---|---|---|"]
    cpairs = comp["pairs"] if comp else None
    for i, p in enumerate(cand["pairs"]):
        if cpairs:
            b, a = cpairs[i]["before"], cpairs[i]["after"]
            cells = f"{b['a_as_b']} → {a['a_as_b']} | {b['b_as_a']} → {a['b_as_a']}"
        else:
            cells = f"{p['a_as_b']} | {p['b_as_a']}"
        out.append(f"| {p['a']} ↔ {p['b']} | {cells} |")
    return [*out, ""]


def _confusions_md(cand: dict[str, Any]) -> list[str]:
    out = ["## Top confusions (candidate)", ""]
    for lab, tops in cand["top_confusions"].items():
        if tops:
            out.append(f"- {lab}: " + ", ".join(f"{t['predicted']} ×{t['count']}" for t in tops))
    out += ["", "![confusion matrix](confusion_matrix.png)", ""]
    out += ["![per-intent recall](per_intent_before_after.png)", ""]
    return out


# --------------------------------------------------------------------------- writing


def write_report(
    report: dict[str, Any], report_dir: str | Path, *, reporter: Reporter = NULL
) -> list[Path]:
    """Write the four report files into ``report_dir`` (each atomically); their paths."""
    report_dir = Path(report_dir)
    font = find_cjk_font()
    if font is None:
        reporter.warn(
            "no CJK font found by matplotlib: plot titles fall back to English "
            "(install fonts-noto-cjk, then remove ~/.cache/matplotlib)"
        )
    files = {
        "report.json": json.dumps(report, ensure_ascii=False, indent=2).encode() + b"\n",
        "report.md": markdown(report).encode(),
        "confusion_matrix.png": confusion_png(report, font),
        "per_intent_before_after.png": before_after_png(report, font),
    }
    paths = []
    for name, data in files.items():
        paths.append(atomic_write_bytes(report_dir / name, data))
    return paths


def write_verdict(report: dict[str, Any], report_dir: str | Path, model_dir: str | Path) -> Path:
    """Record the gate's verdict in the candidate's directory (``eval_report.json``), bound to
    the model's content digest and to the sha256 of ``report_dir``/report.json: deploy ships it
    with the release (``ftctl releases`` shows it) and ``ftctl promote`` reads it back. Call it
    after :func:`write_report`, for a gated eval (with a baseline); a later one replaces it."""
    from ftctl.fsutil import sha256_file
    from ftctl.manifest import EVAL_REPORT, model_digest

    report_json = Path(report_dir) / "report.json"
    gate, cand, base = report["gate"], report["candidate"], report.get("baseline")
    doc = {
        "verdict": gate["verdict"],
        "accuracy": cand["accuracy"],
        "macro_f1": cand["macro_f1"],
        "gate": {
            "reasons": gate["reasons"],
            "report": str(report_json.resolve()),
            "report_sha256": sha256_file(report_json),
            "model_digest": model_digest(model_dir),
            "baseline": {"path": base["path"], "weights_sha256": base["weights_sha256"]}
            if base
            else None,
            "samples": report["draw"]["drawn"],
            "seed": report["settings"]["seed"],
            "created_utc": report["created_utc"],
        },
    }
    text = json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
    return atomic_write_bytes(Path(model_dir) / EVAL_REPORT, text.encode())
