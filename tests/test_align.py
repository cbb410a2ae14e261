"""Aligners: the similarity fit, the landmarks/center/dlib paths, and fan's fail-fast on missing weights."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fers_dist.data import align
from fers_dist.data.align import CANONICAL, AlignerUnavailable, FaceNotFound, anchors, get_aligner
from fers_dist.data.synthetic import Identity, _Sequence
from fers_dist.errors import FersError


def landmarks_with_anchors(points: np.ndarray) -> np.ndarray:
    """68 points whose eye and mouth centres are exactly ``points`` (3x2)."""
    lm = np.zeros((68, 2), np.float32)
    lm[36:42], lm[42:48], lm[48:68] = points[0], points[1], points[2]
    lm[36:42] += np.array([[-3, 0], [-1, -1], [1, -1], [3, 0], [1, 1], [-1, 1]])  # centred offsets
    return lm


def test_similarity_fit_puts_eyes_and_mouth_on_canonical_positions():
    size = 96
    angle, scale, t = np.radians(17), 1.7, np.array([40.0, 25.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    src = (CANONICAL * size) @ rot.T + t  # the canonical triangle seen through a known similarity
    image = np.zeros((260, 260), np.uint8)
    for i, (x, y) in enumerate(src):
        cv2.circle(image, (round(x), round(y)), 3, 80 * (i + 1), -1)
    face = get_aligner("landmarks", size=size).align(image, landmarks_with_anchors(src))
    assert face.shape == (size, size) and face.dtype == np.uint8
    for i, (x, y) in enumerate(CANONICAL * size):  # each dot lands where it should
        assert face[round(y), round(x)] == pytest.approx(80 * (i + 1), abs=25)
    np.testing.assert_allclose(anchors(landmarks_with_anchors(src)), src, atol=1e-4)


def test_landmarks_aligner_needs_sane_landmarks():
    a = get_aligner("landmarks", size=32)
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(FaceNotFound, match="no landmarks"):
        a.align(img, None)
    with pytest.raises(FaceNotFound, match="68x2"):
        a.align(img, np.zeros((5, 2)))
    with pytest.raises(FaceNotFound, match="degenerate"):
        a.align(img, np.ones((68, 2)))
    with pytest.raises(FaceNotFound, match="68x2"):
        a.align(img, np.full((68, 2), np.nan))


def test_center_aligner_resizes_colour_to_gray():
    out = get_aligner("center", size=40).align(np.full((120, 90, 3), 200, np.uint8))
    assert out.shape == (40, 40) and out.dtype == np.uint8 and int(out.mean()) == 200


def test_unknown_aligner_and_bad_option():
    with pytest.raises(FersError, match="not one of"):
        get_aligner("mtcnn")
    with pytest.raises(FersError, match="bad option"):
        get_aligner("center", colour=True)
    with pytest.raises(FersError, match="not one of"):
        align.preflight("mtcnn")


def test_dlib_no_face_on_blank_and_aligns_a_synthetic_face_it_detects():
    dlib_aligner = get_aligner("dlib", size=64, upsample=0)
    with pytest.raises(FaceNotFound, match="dlib: no face detected"):
        dlib_aligner.align(np.full((200, 200), 128, np.uint8))
    detected = 0
    rng = np.random.default_rng(3)
    for _ in range(12):  # dlib's HOG detector finds only some cartoon faces; use those it finds
        img, _ = next(_Sequence(Identity.sample(rng), "neutral", 1, (480, 640), rng).frames())
        try:
            face = dlib_aligner.align(img)
        except FaceNotFound:
            continue
        detected += 1
        assert face.shape == (64, 64) and face.dtype == np.uint8
    if not detected:
        pytest.skip("dlib detected none of the synthetic faces (its no-face path was tested above)")


def test_fan_fails_fast_without_weights_and_never_downloads(tmp_path, monkeypatch):
    import face_alignment.utils
    import torch.hub

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(face_alignment.utils, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    names = align.fan_weight_files()
    assert any(n.startswith("2DFAN4") for n in names) and any(n.startswith("s3fd") for n in names)
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(AlignerUnavailable) as err:
        get_aligner("fan", size=64, device="cpu")
    msg = str(err.value)
    assert all(n in msg for n in names) and str(ckpt) in msg and "\n" not in msg
    with pytest.raises(AlignerUnavailable, match=str(tmp_path / "hub2" / "checkpoints")):
        align.preflight("fan", hub_dir=str(tmp_path / "hub2"))


class _Raises:
    """An aligner that fails the way a GPU aligner can, or the way a bad face does."""

    wants_color = False

    def __init__(self, exc: Exception):
        self.exc = exc

    def align(self, image, landmarks=None):
        raise self.exc


@pytest.mark.parametrize("exc, infrastructure", [
    (__import__("torch").cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (MemoryError(), True),
    (ValueError("landmarks out of the frame"), False),
    (cv2.error("OpenCV(5.0) resize: !ssize.empty()"), False),
])
def test_machine_faults_fail_the_batch_and_bad_faces_are_rejected(tmp_path, exc, infrastructure):
    """fers prepare counts a face it cannot align as rejected, but a CUDA error or OOM is the machine's
    fault: it fails the run with its message, and no face is rejected for it."""
    import pyarrow as pa

    src = tmp_path / "face.png"
    cv2.imwrite(str(src), np.full((64, 64), 128, np.uint8))
    batch = pa.table({"src": [str(src)], "video_frame": [-1], "landmarks": [b""], "path": ["face.png"],
                      "dataset": ["ckplus"], "subject": ["S1"], "sequence": ["001"], "frame": [1], "label": [1],
                      "label_name": ["anger"]}, schema=align.batch_schemas()[0])
    worker = align.AlignBatch("center", 32)
    worker.aligner = _Raises(exc)
    if infrastructure:
        with pytest.raises(type(exc)):
            worker(batch)
    else:
        out = worker(batch).to_pydict()
        assert out["image"] == [b""] and type(exc).__name__ in out["reason"][0]
