"""MMI Facial Expression Database as downloaded from its web interface::

    Sessions/<n>/S001-002.avi          the recording (frames decoded with OpenCV), or
    Sessions/<n>/*.jpg|*.png           the recording as image frames
    Sessions/<n>/S001-002.xml          session metadata with <Metatag Name="Emotion" Value="k"/>

The subject is the file-name prefix before the first '-' (``S001``). MMI sequences are
onset-apex-offset (neutral, peak, neutral), so the paper takes the 3 MIDDLE frames of each of its 208
frontal sequences from 31 subjects (624 images). Profile-view sessions must be left out of the root
by the user (the metadata carries no view flag we rely on). Optional ``Landmarks68/`` sidecar files
(see ``layouts.base``; ``<video stem>_<frame:05d>.txt`` for video frames) feed the landmarks aligner.

Emotion codes. MMI's FACS-derived emotion metatag, as used here (``EMOTION_CODES``)::

    1 anger, 2 disgust, 3 fear, 4 happiness, 5 sadness, 6 surprise

Source/verification: NOT verified. The only MMI text the search tool found that names the six
emotions is Valstar & Pantic (2010), "Induced disgust, happiness and surprise: an addition to the MMI
Facial Expression Database", which lists them as Anger, Disgust, Fear, Happiness, Sadness, Surprise;
the codes above number them in that order. MMI's own metadata description is behind its licence and
no copy of it was found, so the numbers themselves could not be checked against it.
If your copy differs, pass
``emotion_map={code: class_name}`` (``fers prepare --mmi-emotion-map 1=anger,2=disgust,...``).
Other codes (e.g. 0 or 7 for "other"/neutral) are rejected with a reason.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from fers_dist.data.layouts.base import (
    IMAGE_EXTS,
    Collector,
    ReadResult,
    check_root,
    frame_number,
    list_images,
    pick_middle,
    sorted_dirs,
)
from fers_dist.errors import DataError

NAME = "mmi"
CLASS_NAMES = ("anger", "disgust", "fear", "happy", "sadness", "surprise")
EMOTION_CODES = {1: "anger", 2: "disgust", 3: "fear", 4: "happy", 5: "sadness", 6: "surprise"}
TABLE1 = {"sequences": 208, "images": 624, "per_class": None}
SESSIONS_DIR = "Sessions"
VIDEO_EXTS = (".avi", ".mp4", ".mov", ".mkv", ".wmv")


def parse_emotion_map(text: str) -> dict[int, str]:
    """``"1=anger,2=disgust"`` -> ``{1: "anger", 2: "disgust"}`` (DataError naming the bad item)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        code, _, name = item.partition("=")
        if not code.strip().lstrip("-").isdigit() or name.strip() not in CLASS_NAMES:
            raise DataError(f"mmi emotion map: bad item {item!r} (want CODE=CLASS, CLASS one of "
                            f"{', '.join(CLASS_NAMES)})")
        out[int(code)] = name.strip()
    return out


def emotion_code(xml_path: Path) -> int:
    """The Emotion metatag value of a session XML (ValueError naming the problem)."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise ValueError(f"malformed XML ({e})") from None
    for el in tree.iter():
        if el.tag.rsplit("}", 1)[-1].lower() == "metatag" and el.get("Name", "").lower() == "emotion":
            value = el.get("Value", "").strip()
            try:
                return int(float(value))
            except ValueError:
                raise ValueError(f"Emotion metatag value {value!r} is not a number") from None
    raise ValueError('no <Metatag Name="Emotion" Value="k"/> in the session metadata')


def video_frame_count(path: Path) -> int:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return -1
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n <= 0:  # some containers do not store it: count by grabbing
            n = 0
            while cap.grab():
                n += 1
        return n
    finally:
        cap.release()


def read(root: str | Path, emotion_map: dict[int, str] | None = None) -> ReadResult:
    codes = dict(emotion_map or EMOTION_CODES)
    root = check_root(root, SESSIONS_DIR, "Sessions/<n>/ with a video or frames and a .xml")
    col = Collector(root, NAME)
    for sess in sorted_dirs(root / SESSIONS_DIR):
        _read_session(col, sess, codes)
    return col.result(CLASS_NAMES, TABLE1)


def _read_session(col: Collector, sess: Path, codes: dict[int, str]) -> None:
    xmls = sorted(sess.glob("*.xml"))
    if not xmls:
        col.skipped["sessions without .xml metadata"] += 1
        return
    label_name, problem = None, None
    for xml in xmls:
        col.note_input(xml)
        try:
            code = emotion_code(xml)
        except ValueError as e:
            problem = problem or (xml, str(e))
            continue
        if code not in codes:
            problem = (xml, f"emotion code {code} is not one of the mapped codes {sorted(codes)}")
            continue
        label_name, problem = codes[code], None
        break
    if label_name is None:
        col.reject(problem[0], f"{col.rel(problem[0])}: {problem[1]}")
        return
    label = CLASS_NAMES.index(label_name)
    subject = xmls[0].stem.split("-")[0]
    meta = {"subject": subject, "sequence": f"{sess.name}", "label": label, "label_name": label_name}
    videos = sorted(p for p in sess.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    frames = list_images(sess)
    if frames:
        for i in pick_middle(len(frames)):
            col.add(frames[i], frame=frame_number(frames[i].name), **meta)
    elif videos:
        video = videos[0]
        if video.stat().st_size == 0:
            col.reject(video, "empty file (0 bytes)")
            return
        n = video_frame_count(video)
        if n <= 0:
            col.reject(video, "cannot open the video or it has no frames (OpenCV)")
            return
        for k in pick_middle(n):
            col.add(video, frame=k, video_frame=k, **meta)
    else:
        col.skipped[f"sessions without a video or frames ({', '.join(IMAGE_EXTS + VIDEO_EXTS)})"] += 1
