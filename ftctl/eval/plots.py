"""The report's two plots: the confusion matrix, and per-intent recall before and after.

matplotlib's object API (no pyplot, no global state) and a CJK font found through
``matplotlib.font_manager`` (Debian: fonts-noto-cjk), so Chinese titles render; without one the
plots fall back to English-only text (:func:`ftctl.eval.report.write_report` warns).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Serif CJK SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
)


def find_cjk_font() -> str | None:
    """The name of an installed font with Chinese glyphs, or None."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in names:
            return name
    return next((n for n in sorted(names) if "CJK" in n), None)


def _rc(font: str | None) -> dict[str, Any]:
    family = [font, "DejaVu Sans"] if font else ["DejaVu Sans"]
    return {"font.family": "sans-serif", "font.sans-serif": family, "axes.unicode_minus": False}


def _title(zh: str, en: str, font: str | None) -> str:
    return f"{zh}  {en}" if font else en


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


# --------------------------------------------------------------------------- plots


def _used_labels(result: dict[str, Any]) -> list[int]:
    m = result["confusion"]["matrix"]
    return [i for i in range(len(m)) if sum(m[i]) or sum(row[i] for row in m)]


def _matrix_panel(ax, result: dict[str, Any], keep: Sequence[int], title: str) -> None:
    labels = result["confusion"]["labels"]
    m = result["confusion"]["matrix"]
    sub = [[m[i][j] for j in keep] for i in keep]
    norm = [[v / (sum(row) or 1) for v in row] for row in sub]
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = [labels[i] for i in keep]
    ax.set_xticks(range(len(keep)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(keep)), names, fontsize=7)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("true", fontsize=9)
    ax.set_title(title, fontsize=10)
    for r, row in enumerate(sub):
        for c, v in enumerate(row):
            if v:
                color = "white" if norm[r][c] > 0.6 else ("black" if r == c else "firebrick")
                ax.text(c, r, str(v), ha="center", va="center", fontsize=6, color=color)


def confusion_png(report: dict[str, Any], font: str | None) -> bytes:
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    models = [("candidate", "候选模型")]
    if report.get("baseline"):
        models.insert(0, ("baseline", "基线模型"))
    keep = sorted(set().union(*(_used_labels(report[k]) for k, _ in models)))
    size = max(5.0, 0.38 * len(keep) + 2.5)
    with rc_context(_rc(font)):
        fig = Figure(figsize=(size * len(models), size), layout="constrained")
        axes = fig.subplots(1, len(models), squeeze=False)[0]
        for ax, (key, zh) in zip(axes, models, strict=True):
            acc = report[key]["accuracy"] * 100
            _matrix_panel(
                ax, report[key], keep, _title(f"混淆矩阵 {zh}", f"{key} {acc:.1f}%", font)
            )
        return _png(fig)


def before_after_png(report: dict[str, Any], font: str | None) -> bytes:
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    cand = report["candidate"]["per_intent"]
    base = (report.get("baseline") or {}).get("per_intent")
    failed = {c["name"] for c in report["gate"]["checks"] if c["kind"] == "intent" and c["failed"]}
    labels = sorted(cand)[::-1]
    ys = range(len(labels))
    with rc_context(_rc(font)):
        fig = Figure(figsize=(8, 0.32 * len(labels) + 1.6), layout="constrained")
        ax = fig.subplots()
        h = 0.4 if base else 0.7
        after = [cand[lab]["recall"] * 100 for lab in labels]
        colors = ["firebrick" if lab in failed else "tab:blue" for lab in labels]
        if base:
            before = [base.get(lab, {"recall": 0})["recall"] * 100 for lab in labels]
            ax.barh(
                [y + h / 2 for y in ys],
                before,
                h,
                color="lightgray",
                label=_title("基线", "baseline", font),
            )
            ax.barh(
                [y - h / 2 for y in ys],
                after,
                h,
                color=colors,
                label=_title("候选", "candidate", font),
            )
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
            for y, b, a in zip(ys, before, after, strict=True):
                if abs(a - b) >= 0.05:
                    ax.text(max(a, b) + 1, y, f"{a - b:+.1f}", va="center", fontsize=7)
        else:
            ax.barh(list(ys), after, h, color=colors)
        ax.set_yticks(list(ys), labels, fontsize=8)
        for tick, lab in zip(ax.get_yticklabels(), labels, strict=True):
            if lab in failed:
                tick.set_color("firebrick")
                tick.set_fontweight("bold")
        ax.set_xlim(0, 112)
        ax.set_xlabel("recall (%)", fontsize=9)
        ax.axvline(100, color="gray", lw=0.5)
        title = _title("各意图召回率 前后对比", "per-intent recall, before vs after", font)
        ax.set_title(f"{title}   [{report['gate']['verdict']}]", fontsize=10)
        return _png(fig)
