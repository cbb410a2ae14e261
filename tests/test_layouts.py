"""Layout readers on synthetic faces written in the real layouts, and the real-layout quirks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fers_dist.data.layouts import DATASETS, ckplus, get_dataset, mmi, oulu
from fers_dist.data.layouts.base import sidecar_path
from fers_dist.data.synthetic import synthesize
from fers_dist.errors import DataError


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("raw")
    for layout, n in (("ckplus", 4), ("oulu", 2), ("mmi", 2), ("bu4dfe", 2)):
        synthesize(layout, base / layout, n, seed=1, size=96, progress=False)
    return {p.name: p for p in base.iterdir()}


def copy(raw: dict, layout: str, tmp_path: Path) -> Path:
    dst = tmp_path / layout
    shutil.copytree(raw[layout], dst)
    return dst


def first_labelled(root: Path) -> Path:
    """The Emotion file of the first labelled CK+ sequence."""
    return min((root / "Emotion").rglob("*_emotion.txt"))


def reasons(result) -> str:
    return " | ".join(f"{p}: {r}" for p, r in result.rejected)


def test_registry_classes_and_table1():
    assert len(DATASETS["ckplus"].class_names) == 7 and "contempt" in DATASETS["ckplus"].class_names
    for name in ("oulu", "mmi", "bu4dfe"):
        assert DATASETS[name].class_names == ("anger", "disgust", "fear", "happy", "sadness", "surprise")
    assert (DATASETS["ckplus"].table1["sequences"], DATASETS["ckplus"].table1["images"]) == (327, 981)
    assert (DATASETS["oulu"].table1["sequences"], DATASETS["oulu"].table1["images"]) == (480, 1440)
    assert (DATASETS["mmi"].table1["sequences"], DATASETS["mmi"].table1["images"]) == (208, 624)
    with pytest.raises(DataError, match="not one of"):
        get_dataset("affectnet")


def test_ckplus_last_three_frames_labels_and_landmarks(raw):
    res = ckplus.read(raw["ckplus"])
    assert res.records and not res.rejected
    by_seq: dict[str, list] = {}
    for r in res.records:
        by_seq.setdefault(r.sequence, []).append(r)
    for seq, recs in by_seq.items():
        subj, num = seq.split("_")
        frames = sorted((raw["ckplus"] / "cohn-kanade-images" / subj / num).glob("*.png"))
        assert [r.path for r in recs] == [f.relative_to(raw["ckplus"]).as_posix() for f in frames[-3:]]
        code = int(float(next((raw["ckplus"] / "Emotion" / subj / num).glob("*.txt")).read_text()))
        assert {r.label for r in recs} == {code - 1}  # 1-based file code -> 0-based label
        assert recs[0].label_name == ckplus.CLASS_NAMES[code - 1]
        assert all(r.landmarks.shape == (68, 2) and r.landmarks.dtype == np.float32 for r in recs)
    # real CK+ has unlabelled sequences: counted, not errors
    assert res.skipped["unlabelled sequences (no Emotion file)"] > 0
    assert "327" in str(res.report) and res.report.to_dict()["n_images"] == len(res.records)


@pytest.mark.parametrize("text, match", [
    ("happy!", "cannot parse emotion label 'happy!'"),
    ("   0.0000000e+00", r"label 0 \(neutral\)"),
    ("   9.0000000e+00", "outside 1..7"),
    ("   2.5000000e+00", "not a whole number"),
])
def test_ckplus_bad_label_files_are_rejected_with_the_file_named(raw, tmp_path, text, match):
    root = copy(raw, "ckplus", tmp_path)
    emo = first_labelled(root)
    emo.write_text(text)
    res = ckplus.read(root)
    rel = emo.relative_to(root).as_posix()
    assert [p for p, _ in res.rejected] == [rel]
    reason = res.rejected[0][1]
    assert rel in reason and re.search(match, reason), reason
    assert not any(r.sequence == "_".join(emo.parent.parts[-2:]) for r in res.records)
    assert len(res.records) == len(ckplus.read(raw["ckplus"]).records) - 3  # the rest survives


def test_ckplus_zero_byte_and_duplicate_frames(raw, tmp_path):
    root = copy(raw, "ckplus", tmp_path)
    emo = first_labelled(root)
    seq_dir = root / "cohn-kanade-images" / emo.parent.parent.name / emo.parent.name
    frames = sorted(seq_dir.glob("*.png"))
    frames[-1].write_bytes(b"")
    shutil.copyfile(frames[-3], frames[-2])  # the same image content twice
    res = ckplus.read(root)
    why = dict(res.rejected)
    rel = lambda p: p.relative_to(root).as_posix()
    assert why[rel(frames[-1])] == "empty file (0 bytes)"
    assert why[rel(frames[-2])] == f"duplicate frame: same image content as {rel(frames[-3])}"
    kept = {r.path for r in res.records}
    assert rel(frames[-3]) in kept and rel(frames[-2]) not in kept and rel(frames[-1]) not in kept


def test_ckplus_malformed_landmarks_keeps_the_frame_without_them(raw, tmp_path):
    root = copy(raw, "ckplus", tmp_path)
    lm = sorted((root / "Landmarks").rglob("*_landmarks.txt"))
    emo = first_labelled(root)
    target = root / "Landmarks" / emo.parent.parent.name / emo.parent.name / emo.name.replace("_emotion", "_landmarks")
    assert target in lm
    target.write_text("1 2\n3 4\n")
    res = ckplus.read(root)
    rec = next(r for r in res.records if Path(r.path).stem == target.name.replace("_landmarks.txt", ""))
    assert rec.landmarks is None
    assert any("malformed landmarks" in r and target.name in r for _, r in res.rejected)


def test_empty_missing_and_wrong_roots(raw, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        ckplus.read(empty)
    with pytest.raises(DataError, match="does not exist"):
        ckplus.read(tmp_path / "nope")
    parent = tmp_path / "datasets"
    shutil.copytree(raw["ckplus"], parent / "CK+")
    want = f"no cohn-kanade-images/ under {parent} .*; did you mean {parent / 'CK+'} ?"
    with pytest.raises(DataError, match=re.escape(want).replace(re.escape(".*"), ".*")):
        ckplus.read(parent)
    with pytest.raises(DataError, match=r"no OriginalImg/ under"):
        oulu.read(raw["ckplus"])
    with pytest.raises(DataError, match="no Sessions/ under"):
        mmi.read(raw["oulu"])
    with pytest.raises(DataError, match=r"no F###/ under"):
        DATASETS["bu4dfe"].read(raw["oulu"])


def test_oulu_default_and_selectable_lighting(raw, tmp_path):
    res = oulu.read(raw["oulu"])
    assert len(res.records) == 2 * 6 * 3 and not res.rejected
    assert {r.label_name for r in res.records} == set(oulu.CLASS_NAMES)
    assert all(r.path.startswith("OriginalImg/VL/Strong/") for r in res.records)
    root = copy(raw, "oulu", tmp_path)
    (root / "OriginalImg" / "VL" / "Strong").rename(root / "OriginalImg" / "VL" / "Dark")
    with pytest.raises(DataError, match="no OriginalImg/VL/Strong/.*found: VL/Dark"):
        oulu.read(root)
    dark = oulu.read(root, lighting="Dark")
    assert len(dark.records) == len(res.records) and dark.records[0].path.startswith("OriginalImg/VL/Dark/")
    with pytest.raises(DataError, match="lighting"):
        oulu.read(root, lighting="Bright")


def test_mmi_middle_frames_from_video_and_from_images(raw):
    res = mmi.read(raw["mmi"])
    assert len(res.records) == 2 * 6 * 3 and not res.rejected
    video = [r for r in res.records if r.video_frame is not None]
    stills = [r for r in res.records if r.video_frame is None]
    assert video and stills  # both reader paths
    assert all(r.path.endswith(".avi") and r.key == f"{r.path}#{r.video_frame}" for r in video)
    by_seq: dict[str, list] = {}
    for r in res.records:
        by_seq.setdefault(r.sequence, []).append(r)
    for seq, recs in by_seq.items():
        sess = raw["mmi"] / "Sessions" / seq
        n = len(list(sess.glob("*.jpg"))) or mmi.video_frame_count(next(sess.glob("*.avi")))
        start = (n - 3) // 2
        assert [r.frame for r in recs] == list(range(start, start + 3))  # the middle 3
    assert {r.subject for r in res.records} == {"S001", "S002"}


def test_mmi_xml_without_emotion_and_unknown_codes(raw, tmp_path):
    root = copy(raw, "mmi", tmp_path)
    xml = min((root / "Sessions" / "1").glob("*.xml"))
    xml.write_text('<?xml version="1.0"?><Session><Metatag Name="Gender" Value="Male"/></Session>')
    xml2 = min((root / "Sessions" / "2").glob("*.xml"))
    xml2.write_text(xml2.read_text().replace('Name="Emotion" Value="2"', 'Name="Emotion" Value="7"'))
    xml3 = min((root / "Sessions" / "3").glob("*.xml"))
    xml3.write_text("<Session><Metatag")
    res = mmi.read(root)
    why = dict(res.rejected)
    assert "no <Metatag Name=\"Emotion\"" in why[xml.relative_to(root).as_posix()]
    assert "emotion code 7" in why[xml2.relative_to(root).as_posix()]
    assert "malformed XML" in why[xml3.relative_to(root).as_posix()]
    assert {r.sequence for r in res.records}.isdisjoint({"1", "2", "3"})
    # a user-supplied code map relabels: swap anger and disgust
    swapped = mmi.read(raw["mmi"], emotion_map={**mmi.EMOTION_CODES, 1: "disgust", 2: "anger"})
    base = {r.key: r.label_name for r in mmi.read(raw["mmi"]).records}
    flip = {"anger": "disgust", "disgust": "anger"}
    assert all(flip.get(base[r.key], base[r.key]) == r.label_name for r in swapped.records)
    with pytest.raises(DataError, match="bad item"):
        mmi.parse_emotion_map("1=joy")
    assert mmi.parse_emotion_map("1=anger, 4=happy") == {1: "anger", 4: "happy"}


def test_bu4dfe_all_frames(raw):
    res = DATASETS["bu4dfe"].read(raw["bu4dfe"])
    n_files = len(list(raw["bu4dfe"].rglob("*.jpg")))
    assert len(res.records) == n_files and not res.rejected
    assert {r.subject for r in res.records} == {"F001", "M001"}
    assert {r.label_name for r in res.records} == set(DATASETS["bu4dfe"].class_names)


def test_landmarks68_sidecars_give_every_layout_landmarks(raw, tmp_path):
    for layout in ("oulu", "mmi", "bu4dfe"):
        recs = DATASETS[layout].read(raw[layout]).records
        assert all(r.landmarks is not None and r.landmarks.shape == (68, 2) for r in recs), layout
    video = next(r for r in mmi.read(raw["mmi"]).records if r.video_frame is not None)
    assert sidecar_path(raw["mmi"], video.path, video.video_frame).name.endswith(f"_{video.video_frame:05d}.txt")
    root = copy(raw, "oulu", tmp_path)
    first = oulu.read(root).records[0]
    sidecar_path(root, first.path).write_text("garbage")
    shutil.rmtree(root / "Landmarks68" / "OriginalImg" / "VL" / "Strong" / "P002")
    res = oulu.read(root)
    assert res.records[0].landmarks is None and "malformed landmarks" in res.rejected[0][1]
    assert all(r.landmarks is None for r in res.records if r.subject == "P002")
    assert len(res.records) == 2 * 6 * 3  # the faces are kept; only the landmarks aligner will refuse them
