"""Identity-independent, stratified, deterministic folds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fers_dist.data.folds import assign_folds, dominant_labels, train_test_subjects
from fers_dist.errors import DataError


def images(n_subjects: int = 37, seed: int = 0) -> tuple[list[str], list[int]]:
    """Per-image subject and label lists: uneven image counts, 7 classes."""
    rng = np.random.default_rng(seed)
    subjects, labels = [], []
    for s in range(n_subjects):
        for y in rng.choice(7, size=rng.integers(1, 5), replace=False):
            k = int(rng.integers(1, 4))
            subjects += [f"S{s:03d}"] * 3 * k
            labels += [int(y)] * 3 * k
    return subjects, labels


def test_no_subject_on_both_sides_of_any_fold():
    subjects, labels = images()
    folds = assign_folds(subjects, labels, n_folds=10)
    assert set(folds) == set(subjects)
    for f in range(10):
        train, test = train_test_subjects(folds, f)
        assert test and train and not (train & test)
        train_rows = [s for s in subjects if folds[s] != f]
        test_rows = [s for s in subjects if folds[s] == f]
        assert not set(train_rows) & set(test_rows)
        assert len(train_rows) + len(test_rows) == len(subjects)


def test_deterministic_and_seed_or_dataset_changes_the_deal():
    subjects, labels = images()
    a = assign_folds(subjects, labels, 10, "ckplus", 0)
    shuffled = np.random.default_rng(5).permutation(len(subjects))
    b = assign_folds([subjects[i] for i in shuffled], [labels[i] for i in shuffled], 10, "ckplus", 0)
    assert a == b  # order of the images does not matter
    assert assign_folds(subjects, labels, 10, "ckplus", 1) != a
    assert assign_folds(subjects, labels, 10, "oulu", 0) != a


def test_every_fold_non_empty_and_balanced():
    for n_subjects, n_folds in ((37, 10), (10, 10), (23, 5), (101, 10)):
        subjects, labels = images(n_subjects)
        sizes = Counter(assign_folds(subjects, labels, n_folds).values())
        assert set(sizes) == set(range(n_folds))
        assert max(sizes.values()) - min(sizes.values()) <= 1


def test_stratified_by_dominant_label():
    # 40 subjects: 20 mostly "happy" (3), 20 mostly "anger" (0): each of 4 folds gets 5 of each
    subjects = [f"S{i:02d}" for i in range(40) for _ in range(4)]
    labels = [(3 if i < 20 else 0) if k < 3 else 5 for i in range(40) for k in range(4)]
    folds = assign_folds(subjects, labels, n_folds=4)
    dom = dominant_labels(subjects, labels)
    for f in range(4):
        assert Counter(dom[s] for s, g in folds.items() if g == f) == {3: 5, 0: 5}


def test_ties_go_to_the_smaller_label_and_single_image_subjects_work():
    assert dominant_labels(["a", "a", "b"], [4, 2, 6]) == {"a": 2, "b": 6}
    subjects, labels = images(12)
    subjects, labels = subjects + ["LONE"], labels + [2]
    folds = assign_folds(subjects, labels, n_folds=10)
    assert "LONE" in folds and 0 <= folds["LONE"] < 10


def test_too_few_subjects_and_bad_inputs_are_clear_errors():
    with pytest.raises(DataError, match="3 subjects cannot fill 10"):
        assign_folds(["a", "b", "c", "c"], [0, 1, 2, 2], n_folds=10)
    with pytest.raises(DataError, match="at least 2 folds"):
        assign_folds(["a", "b"], [0, 1], n_folds=1)
    with pytest.raises(DataError, match="2 subjects but 1 labels"):
        assign_folds(["a", "b"], [0], n_folds=2)
