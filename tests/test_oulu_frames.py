"""Oulu-CASIA keeps the last 3 frames (the peak) of each sequence: checked by WHICH frames, not how many.

The reader orders a sequence's frames by the number in their names, so ``10.jpeg`` comes after
``9.jpeg`` (a plain string sort would put it after ``1.jpeg``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fers_dist.data.layouts import oulu

BASE = ("OriginalImg", "VL", "Strong")


def write_sequence(root: Path, subject: str, expression: str, names: list[str]) -> Path:
    """Frames with unique contents (the reader drops byte-identical duplicates), written in a shuffled
    order so the directory's listing order tells nothing; the reader never decodes them."""
    folder = root.joinpath(*BASE, subject, expression)
    folder.mkdir(parents=True)
    for name in random.Random(f"{subject}/{expression}").sample(names, len(names)):
        (folder / name).write_bytes(f"{subject}/{expression}/{name}".encode())
    return folder


def kept(root: Path) -> dict[str, list[str]]:
    """sequence -> the file names the reader kept, in its order."""
    by_seq: dict[str, list[str]] = {}
    for r in oulu.read(root).records:
        by_seq.setdefault(r.sequence, []).append(Path(r.path).name)
    return by_seq


def test_the_last_three_frames_of_each_sequence_by_name(tmp_path):
    padded = [f"{k:03d}.jpeg" for k in range(12)]  # the distribution's naming: 000.jpeg, 001.jpeg, ...
    unpadded = [f"{k}.jpeg" for k in range(12)]  # 0.jpeg ... 11.jpeg: a string sort would end on 7, 8, 9
    write_sequence(tmp_path, "P001", "Anger", padded)
    write_sequence(tmp_path, "P001", "Happiness", padded[:10] + ["010.txt", "Thumbs.db"])
    write_sequence(tmp_path, "P002", "Surprise", unpadded)
    write_sequence(tmp_path, "P002", "Fear", ["8.jpeg", "9.jpeg"])  # too short: every frame is kept
    assert kept(tmp_path) == {
        "P001_Anger": ["009.jpeg", "010.jpeg", "011.jpeg"],
        "P001_Happiness": ["007.jpeg", "008.jpeg", "009.jpeg"],  # not images: 010.txt does not count
        "P002_Surprise": ["9.jpeg", "10.jpeg", "11.jpeg"],
        "P002_Fear": ["8.jpeg", "9.jpeg"],
    }


def test_records_carry_the_kept_frames_number_subject_and_label(tmp_path):
    folder = write_sequence(tmp_path, "P003", "Sadness", [f"{k:03d}.jpeg" for k in range(10)])
    res = oulu.read(tmp_path)
    assert not res.rejected
    assert [(r.frame, r.subject, r.label_name) for r in res.records] == [(k, "P003", "sadness") for k in (7, 8, 9)]
    for r in res.records:  # the record points at the file that holds that frame
        assert (tmp_path / r.path).read_bytes() == f"P003/Sadness/{r.frame:03d}.jpeg".encode()
        assert (tmp_path / r.path).parent == folder


@pytest.mark.parametrize("n", [1, 3, 4])
def test_frames_per_sequence_counts_back_from_the_last_frame(tmp_path, n):
    write_sequence(tmp_path, "P004", "Disgust", [f"{k:03d}.jpeg" for k in range(10)])
    res = oulu.read(tmp_path, frames_per_sequence=n)
    assert [r.frame for r in res.records] == list(range(10 - n, 10))
