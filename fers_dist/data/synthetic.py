"""Draw procedural synthetic faces and write them in a real dataset layout (CK+, Oulu-CASIA, MMI, BU-4DFE).

Identity (face shape, skin tone, eye spacing and size, nose, mouth, hair) is fixed per subject, and so is
the recording session (background, light direction and strength), as in the real sets where a subject is
filmed in one sitting; expression is geometry (brows, eyelids, mouth corners and opening) ramping from
neutral to the peak; nuisances (pose, small session drift per sequence and frame, sensor noise) keep the
task learnable but not trivial. A session fixed per subject is what makes a target face predictable from
a source face of the same subject, as the synthesis branch assumes (measured: same-subject, same-
expression frames of different sequences differ by MSE 0.005 with it, 0.026 with a new background per
sequence and light per frame). The 68 iBUG points
that are drawn are exactly those written to CK+ Landmarks files (and, for the other layouts, to the
optional ``Landmarks68/`` sidecar files the readers understand). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fers_dist.data.layouts.base import sidecar_path
from fers_dist.errors import DataError

LAYOUTS = ("ckplus", "oulu", "mmi", "bu4dfe")
EXPRESSIONS = ("neutral", "anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
# Peak expression geometry (canonical face units: half face width = 1; y points down).
_E = {"brow": 0.0, "inner": 0.0, "squeeze": 0.0, "eye": 1.0, "corner": 0.0, "width": 1.0, "gap": 0.0, "lip_up": 0.0,
          "press": 0.0, "asym": 0.0, "nose": 0.0}
PEAKS = {
    "neutral": _E,
    "anger": {**_E, "brow": -0.10, "inner": -0.12, "squeeze": 0.07, "eye": 0.65, "corner": -0.03,
              "width": 0.88, "press": 0.6},
    "contempt": {**_E, "asym": 0.13, "width": 1.05, "eye": 0.9},
    "disgust": {**_E, "brow": -0.06, "inner": -0.06, "eye": 0.7, "corner": -0.06, "gap": 0.06,
                "lip_up": 0.08, "nose": 0.07},
    "fear": {**_E, "brow": 0.13, "inner": 0.10, "squeeze": 0.04, "eye": 1.5, "corner": -0.04,
             "width": 1.15, "gap": 0.14},
    "happy": {**_E, "corner": 0.15, "width": 1.25, "gap": 0.06, "eye": 0.8},
    "sadness": {**_E, "inner": 0.15, "eye": 0.8, "corner": -0.10, "width": 0.95},
    "surprise": {**_E, "brow": 0.22, "inner": 0.05, "eye": 1.6, "width": 0.82, "gap": 0.42},
}
# Real-layout names of each expression.
CK_CODES = {"anger": 1, "contempt": 2, "disgust": 3, "fear": 4, "happy": 5, "sadness": 6, "surprise": 7}
OULU_DIRS = {"anger": "Anger", "disgust": "Disgust", "fear": "Fear", "happy": "Happiness",
             "sadness": "Sadness", "surprise": "Surprise"}
BU_DIRS = {"anger": "Angry", "disgust": "Disgust", "fear": "Fear", "happy": "Happy", "sadness": "Sad",
           "surprise": "Surprise"}
SIX = tuple(OULU_DIRS)
# Height / width of the real frames: CK+ 640x490, Oulu-CASIA VL 320x240, MMI 720x576, BU-4DFE 1040x1329.
ASPECT = {"ckplus": 490 / 640, "oulu": 240 / 320, "mmi": 576 / 720, "bu4dfe": 1329 / 1040}


@dataclass
class Identity:
    fw: float; jh: float; brow_y: float; arch: float; eye_dx: float; eye_y: float; eye_w: float
    eye_h: float; nose_y: float; nose_w: float; mouth_y: float; mouth_w: float; lip: float
    skin: np.ndarray; hair: np.ndarray; hair_len: float; fringe: float; gain: float
    background: np.ndarray; light: float; light_strength: float; brightness: float  # the session

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Identity:
        u = rng.uniform
        light, dark = np.array([200, 215, 240.0]), np.array([55, 80, 120.0])  # BGR skin range
        hairs = np.array([[25, 25, 30], [30, 50, 80], [70, 130, 180], [150, 150, 155], [20, 35, 60.0]])
        return cls(fw=u(0.9, 1.1), jh=u(1.2, 1.45), brow_y=u(-0.62, -0.5), arch=u(0.04, 0.1),
                   eye_dx=u(0.36, 0.48), eye_y=u(-0.36, -0.26), eye_w=u(0.3, 0.42), eye_h=u(0.06, 0.1),
                   nose_y=u(0.12, 0.25), nose_w=u(0.15, 0.25), mouth_y=u(0.52, 0.66), mouth_w=u(0.3, 0.42),
                   lip=u(0.045, 0.08), skin=light + (dark - light) * u() + rng.normal(0, 8, 3),
                   hair=hairs[rng.integers(len(hairs))] + rng.normal(0, 10, 3), hair_len=u(0, 1),
                   fringe=u(-1.05, -0.8), gain=u(0.7, 1.1),
                   background=u(60, 200) + rng.normal(0, 12, 3), light=u(0, np.pi * 2),
                   light_strength=u(0, 0.35), brightness=u(0.85, 1.15))


def face_landmarks(idn: Identity, expression: str, t: float, quirk: np.ndarray | None = None) -> np.ndarray:
    """68 iBUG points (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67) in canonical units
    for ``expression`` at intensity ``t`` in [0, 1]. ``quirk`` is a small per-subject variation of how
    the expression is made (multiplies each peak parameter's displacement)."""
    peak = PEAKS[expression]
    k = t * idn.gain
    e = {n: _E[n] + (v - _E[n]) * k * (1.0 if quirk is None else quirk[i]) for i, (n, v) in enumerate(peak.items())}
    pts = np.zeros((68, 2))
    th = np.linspace(0, np.pi, 17)  # jaw 0..16, chin drops with the mouth opening
    pts[0:17, 0] = -idn.fw * np.cos(th)
    pts[0:17, 1] = -0.15 + idn.jh * np.sin(th) ** 0.9 + 0.6 * e["gap"] * np.sin(th) ** 6
    u = np.linspace(0, 1, 5)  # brows: outer -> inner on the left (17-21), inner -> outer on the right
    for s, idx, inner_w in ((-1, slice(17, 22), u), (1, slice(22, 27), u[::-1])):
        x = s * (0.85 - 0.7 * inner_w) + -s * e["squeeze"] * inner_w
        y = idn.brow_y - idn.arch * np.sin(np.pi * (0.2 + 0.6 * u)) - e["brow"] - e["inner"] * inner_w
        pts[idx] = np.c_[x, y]
    nose_y = idn.nose_y - e["nose"]
    pts[27:31] = np.c_[np.zeros(4), np.linspace(idn.eye_y, nose_y, 4)]
    pts[31:36] = np.c_[np.linspace(-idn.nose_w, idn.nose_w, 5), nose_y + 0.07 + np.array([0, 0.02, 0.03, 0.02, 0])]
    a, h = idn.eye_w / 2, idn.eye_h * e["eye"]
    for s, start in ((-1, 36), (1, 42)):  # corner, 2 upper lid, corner, 2 lower lid (clockwise)
        cx = s * idn.eye_dx
        xs = cx + a * np.array([-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3])
        ys = idn.eye_y + np.array([0, -h, -h, 0, 0.8 * h, 0.8 * h])
        pts[start:start + 6] = np.c_[xs, ys]
    mw, my, g = idn.mouth_w * e["width"], idn.mouth_y, e["gap"]
    lt = idn.lip * (1 - 0.5 * e["press"])

    def lift(x):  # corners lift fully, the middle not at all; contempt lifts the left corner only
        r = (np.abs(x) / mw) ** 2
        return e["corner"] * r + e["asym"] * r * (x < 0)

    xo = mw * np.array([-1, -0.55, -0.2, 0, 0.2, 0.55, 1, 0.55, 0.2, 0, -0.2, -0.55])
    yo = np.r_[[my], my - 0.3 * g - e["lip_up"] - lt * np.array([1.0, 1.3, 1.1, 1.3, 1.0]), [my],
               my + 0.7 * g + lt * np.array([1.2, 1.5, 1.5, 1.5, 1.2])]
    pts[48:60] = np.c_[xo, yo - lift(xo)]
    xi = mw * np.array([-0.85, -0.3, 0, 0.3, 0.85, 0.3, 0, -0.3])
    yi = np.r_[[my], np.full(3, my - 0.3 * g - e["lip_up"] * 0.6), [my], np.full(3, my + 0.7 * g)]
    pts[60:68] = np.c_[xi, yi - lift(xi)]
    return pts


def render(idn: Identity, pts: np.ndarray, shape: tuple[int, int], pose: tuple, rng: np.random.Generator,
           background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw a face (BGR uint8 of ``shape`` = (height, width)) and return it with its 68 landmarks in pixels."""
    import cv2

    h, w = shape
    unit = min(h, w)
    angle, scale, tx, ty = pose
    c, s = np.cos(angle), np.sin(angle)
    m = np.array([[c, -s], [s, c]]) * scale * unit * 0.27

    def px(p):
        return np.asarray(p) @ m.T + [w / 2 + tx * unit, h / 2 + ty * unit]

    def poly(p):
        return np.round(px(p) * 16).astype(np.int32).reshape(-1, 1, 2)

    aa, sh = cv2.LINE_AA, 4
    yy = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = np.clip(background[None, None, :] + 30 * yy[..., None], 0, 255).astype(np.uint8)
    arc = np.linspace(0, np.pi, 15)
    top = np.c_[idn.fw * np.cos(arc), -0.15 - 1.15 * np.sin(arc)]  # forehead, right temple -> left
    if idn.hair_len > 0.5:  # long hair behind the head
        back = np.r_[np.c_[1.25 * idn.fw * np.cos(arc), -0.2 - 1.3 * np.sin(arc)], [[-1.25, 0.9], [1.25, 0.9]]]
        cv2.fillPoly(canvas, [poly(back)], idn.hair.tolist(), aa, sh)
    for side in (-1, 1):  # ears
        cv2.ellipse(canvas, tuple(int(v) for v in px([side * idn.fw * 1.02, -0.05])),
                    (max(1, int(unit * 0.027 * scale)), max(1, int(unit * 0.05 * scale))),
                    np.degrees(angle), 0, 360, (idn.skin * 0.9).tolist(), -1, aa)
    cv2.fillPoly(canvas, [poly(np.r_[pts[0:17], top])], idn.skin.tolist(), aa, sh)
    fringe = np.r_[top, np.c_[np.linspace(-idn.fw, idn.fw, 9),
                               idn.fringe + 0.08 * np.sin(np.linspace(0, 3 * np.pi, 9))]]
    cv2.fillPoly(canvas, [poly(fringe)], idn.hair.tolist(), aa, sh)
    brow_col = (idn.hair * 0.6).tolist()
    for idx in (slice(17, 22), slice(22, 27)):
        cv2.polylines(canvas, [poly(pts[idx])], False, brow_col, max(1, int(unit * 0.018 * scale)), aa, sh)
    for start in (36, 42):
        eye = pts[start:start + 6]
        cv2.fillPoly(canvas, [poly(eye)], (235, 235, 235), aa, sh)
        r = min(idn.eye_w * 0.2, 0.9 * (eye[4, 1] - eye[1, 1]) / 2) * unit * 0.27 * scale
        cv2.circle(canvas, tuple(int(v) for v in px(eye.mean(0))), max(1, int(r)), (40, 60, 70), -1, aa)
        cv2.polylines(canvas, [poly(eye)], True, (30, 30, 40), 1, aa, sh)
    nose_col = (idn.skin * 0.7).tolist()
    cv2.polylines(canvas, [poly(pts[27:31])], False, nose_col, 1, aa, sh)
    cv2.polylines(canvas, [poly(pts[31:36])], False, nose_col, max(1, int(unit * 0.01)), aa, sh)
    cv2.fillPoly(canvas, [poly(pts[48:60])], (idn.skin * np.array([0.65, 0.6, 0.95])).tolist(), aa, sh)
    if pts[66, 1] - pts[62, 1] > 0.015:
        cv2.fillPoly(canvas, [poly(pts[60:68])], (35, 25, 40), aa, sh)
    else:
        cv2.polylines(canvas, [poly(pts[60:65])], False, (60, 40, 60), 1, aa, sh)
    light = idn.light + rng.normal(0, 0.1)  # the session's directional light and brightness, sensor noise
    strength = idn.light_strength * rng.uniform(0.95, 1.05)
    gain = (1 + strength * (xx * np.cos(light) + yy * np.sin(light))) * idn.brightness * rng.uniform(0.98, 1.02)
    out = canvas.astype(np.float32) * gain[..., None]
    noise = np.empty_like(out)
    cv2.setRNGSeed(int(rng.integers(2**31)))  # OpenCV's fast normal generator, seeded from ours
    cv2.randn(noise, 0.0, float(rng.uniform(2, 6)))
    out += noise
    return np.clip(out, 0, 255, out=out).astype(np.uint8), px(pts).astype(np.float32)


class _Sequence:
    """One subject's expression sequence: fixed pose per sequence, small per-frame jitter."""

    def __init__(self, idn: Identity, expression: str, n: int, shape: tuple, rng: np.random.Generator,
                 ramp: str = "onset"):
        self.idn, self.expression, self.n, self.shape, self.rng, self.ramp = idn, expression, n, shape, rng, ramp
        self.pose = np.array([rng.normal(0, np.radians(5)), rng.uniform(0.88, 1.08),
                              rng.normal(0, 0.025), rng.normal(0, 0.025)])
        self.quirk = rng.uniform(0.75, 1.25, len(_E))
        self.background = idn.background + rng.normal(0, 3, 3)  # the session's, drifting a little

    def intensity(self, k: int) -> float:
        x = k / max(1, self.n - 1)
        if self.ramp == "apex":  # MMI: onset, apex, offset
            return float(min(1.0, 1.6 * np.sin(np.pi * x)))
        return float(x * x * (3 - 2 * x))  # smoothstep: neutral -> peak

    def frames(self):
        for k in range(self.n):
            pts = face_landmarks(self.idn, self.expression, self.intensity(k), self.quirk)
            jitter = self.pose + self.rng.normal(0, [np.radians(0.8), 0.008, 0.004, 0.004])
            yield render(self.idn, pts, self.shape, tuple(jitter), self.rng, self.background)


def _length(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def _rng(seed: int, layout: str, subject: int) -> np.random.Generator:
    return np.random.default_rng([seed, LAYOUTS.index(layout), subject])


def _write(path: Path, img: np.ndarray, gray: bool = False) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if path.suffix in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), img, params):
        raise DataError(f"{path}: cannot write image")


def _write_landmarks(path: Path, lm: np.ndarray) -> None:
    """68 lines "x y" as CK+ writes them (also the Landmarks68/ sidecar format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"   {x:.7e}   {y:.7e}\n" for x, y in lm))


def _ckplus(out: Path, i: int, rng, shape: tuple, stats: dict, length=None) -> None:
    subj = f"S{i + 10:03d}"
    idn = Identity.sample(rng)
    labelled = list(rng.choice(list(CK_CODES), size=rng.integers(3, 7), replace=False))
    plan = [(e, True) for e in labelled] + [(str(rng.choice(EXPRESSIONS)), False)
                                            for _ in range(rng.integers(1, 3))]
    for j in rng.permutation(len(plan)):
        expr, has_label = plan[j]
        seq = f"{int(j) + 1:03d}"
        frames = list(_Sequence(idn, expr, _length(rng, length or (6, 10)), shape, rng).frames())
        for k, (img, lm) in enumerate(frames, start=1):
            stem = f"{subj}_{seq}_{k:08d}"
            _write(out / "cohn-kanade-images" / subj / seq / f"{stem}.png", img, gray=True)
            _write_landmarks(out / "Landmarks" / subj / seq / f"{stem}_landmarks.txt", lm)
        if has_label and expr in CK_CODES:
            emo = out / "Emotion" / subj / seq / f"{subj}_{seq}_{len(frames):08d}_emotion.txt"
            emo.parent.mkdir(parents=True, exist_ok=True)
            emo.write_text(f"   {float(CK_CODES[expr]):.7e}\n")
            stats["labelled"] += 1
        stats["sequences"] += 1
        stats["images"] += len(frames)


def _oulu(out: Path, i: int, rng, shape: tuple, stats: dict, length=None) -> None:
    subj, idn = f"P{i + 1:03d}", Identity.sample(rng)
    for expr in SIX:
        folder = out / "OriginalImg" / "VL" / "Strong" / subj / OULU_DIRS[expr]
        for k, (img, lm) in enumerate(_Sequence(idn, expr, _length(rng, length or (8, 12)), shape, rng).frames()):
            _write(folder / f"{k:03d}.jpeg", img)
            _write_landmarks(sidecar_path(out, (folder / f"{k:03d}.jpeg").relative_to(out).as_posix()), lm)
            stats["images"] += 1
        stats["sequences"] += 1
        stats["labelled"] += 1


def _mmi(out: Path, i: int, rng, shape: tuple, stats: dict, length=None) -> None:
    import cv2

    from fers_dist.data.layouts.mmi import EMOTION_CODES

    code = {v: k for k, v in EMOTION_CODES.items()}
    subj, idn = f"S{i + 1:03d}", Identity.sample(rng)
    for j, expr in enumerate(SIX):
        number = i * len(SIX) + j + 1
        sess, name = out / "Sessions" / str(number), f"{subj}-{j + 1:03d}"
        sess.mkdir(parents=True, exist_ok=True)
        drawn = list(_Sequence(idn, expr, _length(rng, length or (12, 18)), shape, rng, "apex").frames())
        frames = [img for img, _ in drawn]
        rel = f"Sessions/{number}/{name}"
        if number % 2:  # odd sessions as image frames, even ones as a video: both reader paths
            for k, (img, lm) in enumerate(drawn):
                _write(sess / f"{name}-{k:04d}.jpg", img)
                _write_landmarks(sidecar_path(out, f"{rel}-{k:04d}.jpg"), lm)
        else:
            for k, (_, lm) in enumerate(drawn):
                _write_landmarks(sidecar_path(out, f"{rel}.avi", k), lm)
            writer = cv2.VideoWriter(str(sess / f"{name}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, shape[::-1])
            if not writer.isOpened():
                raise DataError(f"{sess / name}.avi: OpenCV cannot write MJPG video")
            for img in frames:
                writer.write(img)
            writer.release()
        (sess / f"{name}.xml").write_text(
            f'<?xml version="1.0" encoding="utf-8"?>\n<Session Id="{number}" Subject="{subj}">\n'
            f'  <Metatag Name="Emotion" Value="{code[expr]}" />\n  <Metatag Name="View" Value="frontal" />\n'
            f"</Session>\n")
        stats["sequences"] += 1
        stats["labelled"] += 1
        stats["images"] += len(frames)


def _bu4dfe(out: Path, i: int, rng, shape: tuple, stats: dict, length=None) -> None:
    subj, idn = f"{'FM'[i % 2]}{i // 2 + 1:03d}", Identity.sample(rng)
    for expr in SIX:
        for k, (img, lm) in enumerate(_Sequence(idn, expr, _length(rng, length or (8, 12)), shape, rng).frames()):
            _write(out / subj / BU_DIRS[expr] / f"{k:03d}.jpg", img)
            _write_landmarks(sidecar_path(out, f"{subj}/{BU_DIRS[expr]}/{k:03d}.jpg"), lm)
            stats["images"] += 1
        stats["sequences"] += 1
        stats["labelled"] += 1


WRITERS = {"ckplus": _ckplus, "oulu": _oulu, "mmi": _mmi, "bu4dfe": _bu4dfe}


def synthesize(layout: str, out: str | Path, subjects: int, seed: int = 0, size: int = 256,
               frames: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Write ``subjects`` synthetic subjects in ``layout`` under ``out`` (frames ``size`` pixels wide, with
    the real dataset's aspect ratio); returns a summary dict. ``frames=(lo, hi)`` overrides the
    frames per sequence (default CK+ 6-10, Oulu and BU-4DFE 8-12, MMI 12-18)."""
    from tqdm import tqdm

    if layout not in WRITERS:
        raise DataError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    if subjects < 1:
        raise DataError(f"subjects: need at least 1, got {subjects}")
    if size < 64:
        raise DataError(f"size: faces need at least 64 px, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"sequences": 0, "labelled": 0, "images": 0}
    shape = (2 * round(size * ASPECT[layout] / 2), size)  # (height, width); even sizes suit video codecs
    t0 = time.perf_counter()
    for i in tqdm(range(subjects), desc=f"synth {layout}", unit="subject", disable=not progress):
        WRITERS[layout](out, i, _rng(seed, layout, i), shape, stats, frames)
    return {"layout": layout, "out": str(out), "subjects": subjects, "seed": seed, "width": shape[1],
            "height": shape[0], **stats,
            "seconds": round(time.perf_counter() - t0, 2)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=LAYOUTS, required=True, help="dataset layout to write")
    p.add_argument("--subjects", type=int, default=12, help="number of synthetic subjects")
    p.add_argument("--out", required=True, help="folder to write the dataset into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256,
                   help="image width in pixels; the height follows the real dataset's aspect ratio")


def run(args: argparse.Namespace) -> int:
    s = synthesize(args.layout, args.out, args.subjects, seed=args.seed, size=args.size)
    print(f"wrote {s['images']} images in {s['sequences']} sequences ({s['labelled']} labelled) of "
          f"{s['subjects']} subjects to {s['out']} ({s['layout']} layout, {s['seconds']} s)")
    return 0
