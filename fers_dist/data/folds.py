"""Identity-independent, label-stratified folds, deterministic from (dataset, seed).

Each subject goes to exactly one fold, so no subject is ever on both the train and the test side.
Subjects are sorted, grouped by their dominant label (most images; ties go to the smaller label),
each group is shuffled with a seed derived from (dataset, seed), and subjects are dealt round-robin
across folds, the deal continuing from group to group so fold sizes stay within one subject.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np

from fers_dist.errors import DataError


def fold_seed(dataset: str, seed: int) -> int:
    """A 64-bit seed from (dataset, seed): the same pair always deals the same folds."""
    return int.from_bytes(hashlib.sha256(f"fers-folds:{dataset}:{seed}".encode()).digest()[:8], "little")


def dominant_labels(subjects: list[str], labels: list[int]) -> dict[str, int]:
    if len(subjects) != len(labels):
        raise DataError(f"folds: {len(subjects)} subjects but {len(labels)} labels (one per image expected)")
    counts: dict[str, Counter] = defaultdict(Counter)
    for s, y in zip(subjects, labels):
        counts[str(s)][int(y)] += 1
    return {s: min(c, key=lambda y: (-c[y], y)) for s, c in counts.items()}


def assign_folds(subjects: list[str], labels: list[int], n_folds: int = 10, dataset: str = "ckplus",
                 seed: int = 0) -> dict[str, int]:
    """Map every subject to a fold in ``0..n_folds-1``; ``subjects``/``labels`` are per image."""
    if n_folds < 2:
        raise DataError(f"n_folds: need at least 2 folds, got {n_folds}")
    dominant = dominant_labels(subjects, labels)
    if len(dominant) < n_folds:
        raise DataError(f"folds: {len(dominant)} subjects cannot fill {n_folds} identity-independent "
                        f"folds (need at least one subject per fold; lower --n-folds)")
    groups: dict[int, list[str]] = defaultdict(list)
    for s in sorted(dominant):
        groups[dominant[s]].append(s)
    rng = np.random.default_rng(fold_seed(dataset, seed))
    out, deal = {}, 0
    for label in sorted(groups):
        members = groups[label]
        for i in rng.permutation(len(members)):
            out[members[i]] = deal % n_folds
            deal += 1
    return out


def train_test_subjects(folds: dict[str, int], fold: int) -> tuple[set[str], set[str]]:
    """(train subjects, test subjects) of one fold."""
    test = {s for s, f in folds.items() if f == fold}
    return set(folds) - test, test
