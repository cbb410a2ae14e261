"""Synthetic faces: real layouts, determinism, identity vs expression geometry, landmark fidelity."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from fers_dist.cli import main as cli_main
from fers_dist.data.layouts.base import parse_landmarks
from fers_dist.data.synthetic import Identity, face_landmarks, synthesize
from fers_dist.errors import DataError


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ck") / "ckplus"
    synthesize("ckplus", root, 3, seed=7, size=192, progress=False)
    return root


def test_ckplus_files_follow_the_real_layout(ck):
    pngs = sorted((ck / "cohn-kanade-images").rglob("*.png"))
    assert pngs and all(re.fullmatch(r"S\d{3}_\d{3}_\d{8}\.png", p.name) for p in pngs)
    img = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert img.ndim == 2 and img.shape == (148, 192)  # grayscale, CK+'s 640x490 aspect ratio
    emotions = sorted((ck / "Emotion").rglob("*_emotion.txt"))
    assert emotions and all(re.fullmatch(r"   [1-7]\.0000000e\+00\n", e.read_text()) for e in emotions)
    for e in emotions:  # the emotion file sits beside the last frame of its sequence
        frames = sorted((ck / "cohn-kanade-images" / e.parent.parent.name / e.parent.name).glob("*.png"))
        assert e.name == frames[-1].stem + "_emotion.txt"
    seqs = {p.parent for p in pngs}
    assert len(emotions) < len(seqs)  # some sequences are unlabelled, like real CK+
    lm = sorted((ck / "Landmarks").rglob("*_landmarks.txt"))
    assert len(lm) == len(pngs)
    lines = lm[0].read_text().splitlines()
    assert len(lines) == 68 and all(re.fullmatch(r"   \S+e[+-]\d\d   \S+e[+-]\d\d", ln) for ln in lines)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, _c = (synthesize("oulu", tmp_path / n, 1, seed=s, size=96, progress=False) for n, s in
               (("a", 3), ("b", 3), ("c", 4)))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    assert a["images"] == b["images"]


def test_layout_specific_outputs(tmp_path):
    s = synthesize("mmi", tmp_path / "mmi", 1, size=96, progress=False)
    sessions = sorted((tmp_path / "mmi" / "Sessions").iterdir(), key=lambda p: int(p.name))
    assert len(sessions) == 6 == s["sequences"]
    assert any(list(d.glob("*.avi")) for d in sessions) and any(list(d.glob("*.jpg")) for d in sessions)
    assert all('<Metatag Name="Emotion" Value="' in next(d.glob("*.xml")).read_text() for d in sessions)
    synthesize("oulu", tmp_path / "oulu", 1, size=96, progress=False)
    jpeg = next((tmp_path / "oulu" / "OriginalImg" / "VL" / "Strong" / "P001" / "Happiness").glob("*.jpeg"))
    assert cv2.imread(str(jpeg), cv2.IMREAD_UNCHANGED).shape == (72, 96, 3)  # colour, VL
    synthesize("bu4dfe", tmp_path / "bu", 2, size=96, progress=False)
    assert {p.name for p in (tmp_path / "bu").iterdir()} == {"F001", "M001", "Landmarks68"}
    with pytest.raises(DataError, match="layout"):
        synthesize("affectnet", tmp_path / "x", 1)
    with pytest.raises(DataError, match="at least 1"):
        synthesize("oulu", tmp_path / "x", 0)


def test_expression_geometry_and_stable_identity():
    idn = Identity.sample(np.random.default_rng(0))
    pk = {e: face_landmarks(idn, e, 1.0) for e in ("neutral", "happy", "sadness", "surprise", "anger", "fear")}
    corner_y = {e: p[[48, 54], 1].mean() for e, p in pk.items()}  # y grows downwards
    assert corner_y["happy"] < corner_y["neutral"] < corner_y["sadness"]
    gap = {e: p[66, 1] - p[62, 1] for e, p in pk.items()}
    assert gap["surprise"] > gap["fear"] > gap["neutral"] >= 0
    brow = {e: p[17:27, 1].mean() for e, p in pk.items()}
    assert brow["surprise"] < brow["neutral"] < brow["anger"]
    eye_open = {e: p[40, 1] - p[38, 1] for e, p in pk.items()}
    assert eye_open["surprise"] > eye_open["neutral"] > eye_open["anger"]
    np.testing.assert_allclose(face_landmarks(idn, "happy", 0.0), pk["neutral"])  # the ramp starts neutral
    for p in pk.values():  # identity: the upper face outline does not move with the expression
        np.testing.assert_allclose(p[[0, 16, 27]], pk["neutral"][[0, 16, 27]])
    other = face_landmarks(Identity.sample(np.random.default_rng(1)), "neutral", 0.0)
    assert np.abs(other - pk["neutral"]).max() > 0.02


def iris_hits(ck: Path, shift) -> tuple[int, int]:
    """Open eyes whose written eye centre is on the drawn dark iris, with bright sclera half-way to
    either eye corner; (hits, eyes checked)."""
    hits = n = 0
    for f in sorted((ck / "Landmarks").rglob("*_landmarks.txt")):
        lm = parse_landmarks(f) + np.asarray(shift, np.float32)
        png = ck / "cohn-kanade-images" / f.parent.parent.name / f.parent.name / f.name.replace("_landmarks.txt", ".png")
        img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).astype(float)
        px = lambda p, img=img: img[round(p[1]), round(p[0])]
        for start in (36, 42):
            eye = lm[start:start + 6]
            if eye[4, 1] - eye[2, 1] < 4:  # nearly closed: no sclera to compare with
                continue
            c = eye.mean(0)
            n += 1
            hits += px(c) + 60 < min(px((eye[0] + c) / 2), px((eye[3] + c) / 2))
    return hits, n


def test_written_landmarks_are_the_drawn_points(ck):
    """The Landmarks files hold the drawn (pose-jittered) points: the eye centre they give sits on the
    iris; moving them by 2 px loses it."""
    hits, n = iris_hits(ck, (0, 0))
    assert n > 100 and hits >= 0.8 * n, f"{hits}/{n}"
    for shift in ((2, 0), (0, 2), (-2, 0)):
        moved, _ = iris_hits(ck, shift)
        assert moved < 0.3 * n, (shift, moved, n)


def test_fers_synth_cli(tmp_path, capsys):
    assert cli_main(["synth", "--layout", "bu4dfe", "--subjects", "1", "--out", str(tmp_path / "b"),
                     "--size", "80"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "b" / "F001" / "Angry").is_dir()
