"""Across data files: the texts two files share (relabels, repeats) and which row wins.

On the same text the newer data wins: new data over old (:func:`reconcile`), a later new-data
file over an earlier one (:func:`combine`), the reviewed data last of all (:func:`with_reviewed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ftctl.data.examples import Example
from ftctl.data.textkey import text_keys
from ftctl.errors import Problem

# --------------------------------------------------------------------------- across files


@dataclass(frozen=True)
class Overlap:
    """A text found in two files: ``kept`` (the earlier/new file's row) and ``dropped``."""

    kept: Example
    dropped: Example

    @property
    def relabelled(self) -> bool:
        return self.kept.label != self.dropped.label

    def to_dict(self) -> dict:
        return {
            "text": self.kept.text,
            "label": self.kept.label,
            "old_label": self.dropped.label,
            "new": self.kept.source,
            "old": self.dropped.source,
        }

    def __str__(self) -> str:
        if self.relabelled:
            return f"'{self.kept.text}' {self.dropped.label} -> {self.kept.label}"
        return f"'{self.kept.text}' ({self.kept.label})"


@dataclass(frozen=True)
class Reconciliation:
    """What :func:`reconcile` did: old rows relabelled by the new data, and old rows that
    repeat a new one (same text, same label); both left the replay pool. Or what
    :func:`combine` did (``between="new"``): rows of an earlier --new-data file whose text a
    later file has."""

    relabelled: list[Overlap]
    duplicates: list[Overlap]
    between: str = "old"  # old: new data vs the replay pool | new: --new-data files

    def to_dict(self) -> dict:
        return {
            "relabelled": len(self.relabelled),
            "duplicates": len(self.duplicates),
            "relabelled_rows": [o.to_dict() for o in self.relabelled],
            "duplicate_rows": [o.to_dict() for o in self.duplicates],
        }

    def messages(self, first: int = 5) -> list[str]:
        """One line per kind that happened, naming the first few."""
        if self.between == "new":
            kinds = (
                (self.relabelled, "relabelled by a later --new-data file ({files}): its label "
                 "wins"),
                (self.duplicates, "repeated in a later --new-data file ({files}) with the same "
                 "label: one copy kept"),
            )  # fmt: skip
        else:
            kinds = (
                (self.relabelled, "relabelled by the new data (the new label wins)"),
                (self.duplicates, "repeated in the new data with the same label (one copy kept)"),
            )
        out = []
        for rows, what in kinds:
            if rows:
                files = ", ".join(sorted({f"{o.dropped.file} < {o.kept.file}" for o in rows}))
                shown = "; ".join(str(o) for o in rows[:first])
                more = (
                    f"; ... {len(rows) - first} more in the manifest" if len(rows) > first else ""
                )
                whose = "old row(s)" if self.between == "old" else "row(s)"
                out.append(
                    f"{len(rows)} {whose} {what.format(files=files)}"
                    + (", left the replay pool" if self.between == "old" else "")
                    + f": {shown}{more}"
                )
        return out


def overlaps(
    earlier: Sequence[Example], later: Sequence[Example], tokenizer=None
) -> tuple[list[Example], list[Overlap]]:
    """(the rows of ``later`` whose text (:func:`text_key`) is not in ``earlier``, the
    overlaps)."""
    keys = text_keys([ex.text for ex in earlier], tokenizer)
    first = dict(zip(reversed(keys), reversed(earlier), strict=True))
    kept: list[Example] = []
    found: list[Overlap] = []
    for ex, key in zip(later, text_keys([ex.text for ex in later], tokenizer), strict=True):
        hit = first.get(key)
        if hit is None:
            kept.append(ex)
        else:
            found.append(Overlap(hit, ex))
    return kept, found


def reconcile(
    new: Sequence[Example], old: Sequence[Example], tokenizer=None
) -> tuple[list[Example], list[Example], Reconciliation]:
    """(new, old, what changed): an old row whose text is also in the new data leaves the old
    data: with another label the new label wins (a relabel), with the same label one copy is
    enough (it can then never be in both train and validation)."""
    kept, found = overlaps(new, old, tokenizer)
    rec = Reconciliation(
        relabelled=[o for o in found if o.relabelled],
        duplicates=[o for o in found if not o.relabelled],
    )
    return list(new), kept, rec


def combine(
    files: Sequence[Sequence[Example]], tokenizer=None
) -> tuple[list[Example], Reconciliation]:
    """Several new-data files as one: on the same text (:func:`text_key`) the later file's row
    wins (``ftctl train --new-data GENERATED --new-data REVIEWED``: the reviewed label)."""
    winners: list[Example] = []
    found: list[Overlap] = []
    for examples in reversed(files):
        rest, over = overlaps(winners, examples, tokenizer)
        found += over
        winners = rest + winners
    rec = Reconciliation(
        relabelled=[o for o in found if o.relabelled],
        duplicates=[o for o in found if not o.relabelled],
        between="new",
    )
    return winners, rec


def with_reviewed(files: Sequence[Path], reviewed: Path) -> tuple[Path, ...]:
    """The --new-data files with the reviewed data last (so its labels win), when it exists;
    ``files`` as they are when there are none (train then says --new-data is required)."""
    if not files or not Path(reviewed).is_file():
        return tuple(files)
    same = Path(reviewed).resolve()
    return (*(f for f in files if Path(f).resolve() != same), Path(reviewed))


def cross_file_problems(files: Sequence[Sequence[Example]], tokenizer=None) -> list[Problem]:
    """Warnings for texts in more than one file, on the later file's row, in the terms of
    ``ftctl train --new-data FIRST --old-data LATER``."""
    problems: list[Problem] = []
    seen: list[Example] = []
    for examples in files:
        kept, found = overlaps(seen, examples, tokenizer)
        for o in found:
            d, k = o.dropped, o.kept
            if o.relabelled:
                msg = (
                    f"relabelled: '{d.label}' here, '{k.label}' in {k.source}; train with "
                    f"--new-data {k.file} keeps '{k.label}' and drops this row from the replay "
                    "pool"
                )
            else:
                msg = f"duplicate of {k.source} (another file); train keeps one copy"
            problems.append(
                Problem(msg, d.file, d.line, "label" if o.relabelled else "text", "warning")
            )
        seen += kept
    return problems
