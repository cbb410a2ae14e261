"""CK+ (extended Cohn-Kanade) as distributed::

    cohn-kanade-images/S005/001/S005_001_00000011.png
    Emotion/S005/001/S005_001_00000011_emotion.txt      one float, e.g. "   3.0000000e+00"
    Landmarks/S005/001/S005_001_00000011_landmarks.txt  68 lines "x y"

Emotion codes (Lucey et al. 2010): 0 neutral, 1 anger, 2 contempt, 3 disgust, 4 fear, 5 happy,
6 sadness, 7 surprise. The emotion file sits beside the sequence's last (peak) frame; 327 of the 593
sequences have one. We keep the last 3 frames of each labelled sequence (981 images, paper Table I).
Sequences without an Emotion file are unlabelled, not errors: they are counted in ``skipped``.
"""

from __future__ import annotations

from pathlib import Path

from fers_dist.data.layouts.base import (
    Collector,
    ReadResult,
    check_root,
    frame_number,
    list_images,
    parse_landmarks,
    pick_last,
    sorted_dirs,
)

NAME = "ckplus"
CLASS_NAMES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
# Paper Table I; per-class sequence counts of the 327 labelled sequences from Lucey et al. (2010).
TABLE1 = {
    "sequences": 327, "images": 981,
    "per_class": {"anger": 45, "contempt": 18, "disgust": 59, "fear": 25, "happy": 69, "sadness": 28,
                  "surprise": 83},
}
IMAGES_DIR, EMOTION_DIR, LANDMARKS_DIR = "cohn-kanade-images", "Emotion", "Landmarks"


def parse_emotion(path: Path) -> int:
    """The CK+ code in an emotion file (ValueError naming the problem if it is not one of 1..7)."""
    text = path.read_text(errors="replace").strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"cannot parse emotion label {text[:40]!r} (expected one float like 3.0000000e+00)")
    if value != int(value):
        raise ValueError(f"emotion label {value} is not a whole number")
    code = int(value)
    if code == 0:
        raise ValueError("emotion label 0 (neutral) is not one of the 7 classes")
    if not 1 <= code <= len(CLASS_NAMES):
        raise ValueError(f"emotion label {code} is outside 1..{len(CLASS_NAMES)}")
    return code


def read(root: str | Path, frames_per_sequence: int = 3) -> ReadResult:
    root = check_root(root, IMAGES_DIR, "cohn-kanade-images/S###/###/*.png and Emotion/")
    col = Collector(root, NAME)
    for subj_dir in sorted_dirs(root / IMAGES_DIR):
        for seq_dir in sorted_dirs(subj_dir):
            _read_sequence(col, root, subj_dir.name, seq_dir, frames_per_sequence)
    return col.result(CLASS_NAMES, TABLE1)


def _read_sequence(col: Collector, root: Path, subject: str, seq_dir: Path, n: int) -> None:
    frames = list_images(seq_dir)
    if not frames:
        col.skipped["sequences without images"] += 1
        return
    emo_dir = root / EMOTION_DIR / subject / seq_dir.name
    emo_files = sorted(emo_dir.glob("*_emotion.txt")) if emo_dir.is_dir() else []
    if not emo_files:
        col.skipped["unlabelled sequences (no Emotion file)"] += 1
        return
    emo = emo_files[-1]
    col.note_input(emo)
    try:
        code = parse_emotion(emo)
    except ValueError as e:
        col.reject(emo, f"{col.rel(emo)}: {e}")
        return
    lm_dir = root / LANDMARKS_DIR / subject / seq_dir.name
    for img in pick_last(frames, n):
        col.add(
            img, subject=subject, sequence=f"{subject}_{seq_dir.name}", frame=frame_number(img.name),
            label=code - 1, label_name=CLASS_NAMES[code - 1], landmarks=_landmarks(col, lm_dir, img),
        )


def _landmarks(col: Collector, lm_dir: Path, img: Path):
    path = lm_dir / f"{img.stem}_landmarks.txt"
    if not path.is_file():
        col.skipped["frames without a Landmarks file"] += 1
        return None
    col.note_input(path)
    try:
        return parse_landmarks(path)
    except ValueError as e:
        col.reject(path, f"{col.rel(path)}: malformed landmarks ({e}); the frame is kept without landmarks")
        return None
