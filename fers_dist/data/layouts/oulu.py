"""Oulu-CASIA as distributed::

    OriginalImg/<VL|NI>/<Strong|Weak|Dark>/P001/<Expression>/000.jpeg

VL is visible light, NI near-infrared; Strong, Weak and Dark are the lighting conditions. The paper
uses VL/Strong (the default here): 80 subjects x 6 expressions, the last 3 frames of each sequence,
1440 images. Expression folders: Anger, Disgust, Fear, Happiness, Sadness, Surprise (matched without
regard to case; an unknown folder is counted in ``skipped``). No landmarks ship with it; optional
``Landmarks68/`` sidecar files (see ``layouts.base``) feed the landmarks aligner.
"""

from __future__ import annotations

from pathlib import Path

from fers_dist.data.layouts.base import (
    Collector,
    ReadResult,
    check_root,
    frame_number,
    list_images,
    pick_last,
    sorted_dirs,
)
from fers_dist.errors import DataError

NAME = "oulu"
CLASS_NAMES = ("anger", "disgust", "fear", "happy", "sadness", "surprise")
FOLDERS = {"anger": 0, "disgust": 1, "fear": 2, "happiness": 3, "happy": 3, "sadness": 4, "surprise": 5}
TABLE1 = {"sequences": 480, "images": 1440, "per_class": {n: 80 for n in CLASS_NAMES}}
MODALITIES, LIGHTINGS = ("VL", "NI"), ("Strong", "Weak", "Dark")
IMAGES_DIR = "OriginalImg"


def read(root: str | Path, modality: str = "VL", lighting: str = "Strong",
         frames_per_sequence: int = 3) -> ReadResult:
    if modality not in MODALITIES:
        raise DataError(f"oulu modality: {modality!r} is not one of {', '.join(MODALITIES)}")
    if lighting not in LIGHTINGS:
        raise DataError(f"oulu lighting: {lighting!r} is not one of {', '.join(LIGHTINGS)}")
    root = check_root(root, IMAGES_DIR, "OriginalImg/VL/Strong/P###/<Expression>/###.jpeg")
    base = root / IMAGES_DIR / modality / lighting
    if not base.is_dir():
        have = [f"{m.name}/{c.name}" for m in sorted_dirs(root / IMAGES_DIR) for c in sorted_dirs(m)]
        raise DataError(f"no {IMAGES_DIR}/{modality}/{lighting}/ under {root} "
                        f"(found: {', '.join(have) or 'nothing'})")
    col = Collector(root, NAME)
    for subj_dir in sorted_dirs(base):
        for expr_dir in sorted_dirs(subj_dir):
            label = FOLDERS.get(expr_dir.name.lower())
            if label is None:
                col.skipped[f"unknown expression folders ({expr_dir.name})"] += 1
                continue
            frames = list_images(expr_dir)
            if not frames:
                col.skipped["sequences without images"] += 1
                continue
            for img in pick_last(frames, frames_per_sequence):
                col.add(img, subject=subj_dir.name, sequence=f"{subj_dir.name}_{expr_dir.name}",
                        frame=frame_number(img.name), label=label, label_name=CLASS_NAMES[label])
    return col.result(CLASS_NAMES, TABLE1)
