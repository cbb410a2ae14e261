"""BU-4DFE 2D texture frames, used only for optional pre-training::

    F001/Angry/000.jpg     (or .png; subjects F### female, M### male)

Assumed layout: one folder per subject, one per expression (Angry, Disgust, Fear, Happy, Sad,
Surprise), numbered frames inside. BU-4DFE itself ships 3D meshes with a texture image per frame;
the 2D layout above is what the public tooling we found refers to (MobileFace's evaluation code maps
``F002_Angry_000_3d.jpg`` to ``F002/Angry/000.jpg``, and landmark readers walk
``BU4DFE_BND_V1.1/F001/Angry/000.bnd``). The root may hold other folders (viewers, .bnd landmark
releases): only ``[FM]###`` subject folders are read. All frames are used (about 60,600 for 101
subjects). No 2D landmarks ship with it: use the fan, dlib or center aligner, or put 68-point
landmarks in ``Landmarks68/`` sidecar files (see ``layouts.base``) for the landmarks aligner.
"""

from __future__ import annotations

import re
from pathlib import Path

from fers_dist.data.layouts.base import Collector, ReadResult, check_root, frame_number, list_images, sorted_dirs

NAME = "bu4dfe"
CLASS_NAMES = ("anger", "disgust", "fear", "happy", "sadness", "surprise")
FOLDERS = {"angry": 0, "anger": 0, "disgust": 1, "fear": 2, "happy": 3, "happiness": 3, "sad": 4,
           "sadness": 4, "surprise": 5}
TABLE1 = {"sequences": 606, "images": 60600, "per_class": {n: 101 for n in CLASS_NAMES}}
SUBJECT = re.compile(r"^[FM]\d{3}$")


def _is_root(p: Path) -> bool:
    return any(SUBJECT.match(d.name) for d in sorted_dirs(p))


def read(root: str | Path) -> ReadResult:
    root = check_root(root, "F###", "subject folders F###/M### with Angry/, Happy/, ... inside",
                      found=_is_root)
    col = Collector(root, NAME)
    for subj_dir in (d for d in sorted_dirs(root) if SUBJECT.match(d.name)):
        for expr_dir in sorted_dirs(subj_dir):
            label = FOLDERS.get(expr_dir.name.lower())
            if label is None:
                col.skipped[f"unknown expression folders ({expr_dir.name})"] += 1
                continue
            frames = list_images(expr_dir)
            if not frames:
                col.skipped["sequences without images"] += 1
            for img in frames:
                col.add(img, subject=subj_dir.name, sequence=f"{subj_dir.name}_{expr_dir.name}",
                        frame=frame_number(img.name), label=label, label_name=CLASS_NAMES[label])
    return col.result(CLASS_NAMES, TABLE1)
