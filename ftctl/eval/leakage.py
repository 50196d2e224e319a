"""Test cases the candidate was trained on: found through its manifest's data files, "the
same text" as the model sees it; a warning, or with ``--strict`` an error before any model runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftctl.data.examples import Example, read_examples
from ftctl.data.textkey import text_keys
from ftctl.errors import DataError, FtctlError
from ftctl.eval.cases import Case
from ftctl.progress import Reporter

LEAK_EXAMPLES = 5  # leaked cases named in the warning (all of them in report.json)


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


def report_leakage(leaks: dict[str, Any], strict: bool, reporter: Reporter) -> None:
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
