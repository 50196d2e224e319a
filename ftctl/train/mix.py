"""The training mix (anti-forgetting): the new data, old data replayed beside it, and a
stratified validation split, every choice a function of the seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ftctl.data.examples import Example
from ftctl.errors import DataError


@dataclass(frozen=True)
class Mix:
    """The training mix: new + replayed old data, split into train and validation."""

    train: list[Example]
    val: list[Example]
    n_new: int
    n_old_available: int
    n_replay: int
    replay_by_label: dict[str, int]

    def counts(self) -> dict[str, Any]:
        return {
            "new": self.n_new,
            "old_available": self.n_old_available,
            "replay": self.n_replay,
            "replay_by_label": self.replay_by_label,
            "train": len(self.train),
            "val": len(self.val),
        }


def replay_count(n_new: int, ratio: float, available: int) -> int:
    """Old examples to mix in so they make up ``ratio`` of the mix, capped at what exists."""
    if ratio <= 0 or available <= 0:
        return 0
    return min(available, round(n_new * ratio / (1 - ratio)))


def _by_label(examples: Sequence[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.label, []).append(ex)
    return groups


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over groups proportionally to ``sizes``, at least one each when ``n`` allows
    (largest remainder; ties by name, so deterministic)."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    floor = 1 if n >= len(sizes) else 0
    share = {k: floor + (n - floor * len(sizes)) * v / total for k, v in sizes.items()}
    alloc = {k: min(sizes[k], int(s)) for k, s in share.items()}
    order = sorted(sizes, key=lambda k: (-(share[k] - int(share[k])), k))
    while sum(alloc.values()) < n:
        for k in order:
            if sum(alloc.values()) < n and alloc[k] < sizes[k]:
                alloc[k] += 1
    return alloc


def stratified_sample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn so every label is present (when ``n`` >= labels), proportionally."""
    groups = _by_label(examples)
    alloc = _allocate({k: len(v) for k, v in groups.items()}, n)
    rng = random.Random(seed)
    out: list[Example] = []
    for label in sorted(groups):
        out += rng.sample(groups[label], alloc[label])
    return out


def stratified_split(
    examples: Sequence[Example], val_ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): each label with >= 2 examples puts ~val_ratio of them (at least one) in val."""
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for _label, group in sorted(_by_label(examples).items()):
        group = list(group)
        rng.shuffle(group)
        k = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * val_ratio)))
        val += group[:k]
        train += group[k:]
    rng.shuffle(train)
    return train, val


def mix_data(
    new: Sequence[Example],
    old: Sequence[Example],
    *,
    replay_ratio: float,
    val_ratio: float,
    seed: int,
) -> Mix:
    """New data + a stratified replay draw of old data, split stratified into train/val."""
    n_replay = replay_count(len(new), replay_ratio, len(old))
    replay = stratified_sample(old, n_replay, seed) if n_replay else []
    train, val = stratified_split([*new, *replay], val_ratio, seed + 1)
    if not val:  # no label has 2 examples: no validation loss, no early stopping, NaN metrics
        raise DataError(
            f"too little data: {len(new) + len(replay)} example(s) and no intent with at least "
            "2, so there is nothing to validate on",
            hint="give every intent several examples (`ftctl data generate` makes 120 each)",
        )
    return Mix(
        train=train,
        val=val,
        n_new=len(new),
        n_old_available=len(old),
        n_replay=len(replay),
        replay_by_label=dict(sorted(Counter(ex.label for ex in replay).items())),
    )
