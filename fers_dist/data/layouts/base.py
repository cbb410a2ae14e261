"""What every layout reader shares: the record type, the result type, the Table I report, and the
checks for empty/wrong roots, empty files and duplicate frames.

Readers are Ray-free and never decode images (decoding happens in the prepare pipeline, where a
corrupt image becomes a rejected row with its reason). They do read every file they select once, to
hash it: the hashes find duplicate frames and make the dataset's content hash.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fers_dist.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
N_LANDMARKS = 68
# Optional landmarks beside any layout (real datasets other than CK+ ship none): 68 lines "x y" in
# <root>/Landmarks68/<relative image path without extension>.txt, or <...video stem>_<frame:05d>.txt
# for a video frame. `fers synth` writes them; any 68-point (iBUG) detector's output can be used.
SIDECAR_DIR = "Landmarks68"


def sidecar_path(root: Path, rel: str, video_frame: int | None = None) -> Path:
    stem = Path(rel).with_suffix("").as_posix()
    return root / SIDECAR_DIR / (f"{stem}_{video_frame:05d}.txt" if video_frame is not None else f"{stem}.txt")


@dataclass
class FaceRecord:
    """One face image to prepare. ``path`` is relative to the dataset root; for a frame decoded
    from a video it is the video file and ``video_frame`` the 0-based frame index."""

    path: str
    dataset: str
    subject: str
    sequence: str
    frame: int
    label: int  # 0-based over the dataset's class_names
    label_name: str
    landmarks: np.ndarray | None = None  # 68x2 float32, iBUG order
    video_frame: int | None = None
    digest: str = ""  # sha256 of the file's bytes (set by the reader)

    @property
    def key(self) -> str:
        """The row's path as written to Parquet: ``file.avi#<frame>`` for video frames."""
        return self.path if self.video_frame is None else f"{self.path}#{self.video_frame}"


@dataclass
class TableReport:
    """What a reader found against the paper's Table I (sequences and images per class)."""

    dataset: str
    class_names: tuple[str, ...]
    sequences: dict[str, int]
    images: dict[str, int]
    expected_sequences: int | None
    expected_images: int | None
    expected_per_class: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return {
            "sequences_per_class": self.sequences,
            "images_per_class": self.images,
            "n_sequences": sum(self.sequences.values()),
            "n_images": sum(self.images.values()),
            "paper_sequences": self.expected_sequences,
            "paper_images": self.expected_images,
            "paper_sequences_per_class": self.expected_per_class,
        }

    def __str__(self) -> str:
        exp = self.expected_per_class or {}
        lines = [f"{self.dataset}: sequences per class (found / paper Table I)"]
        for name in self.class_names:
            want = exp.get(name)
            lines.append(f"  {name:<10} {self.sequences.get(name, 0):>5} / {want if want is not None else '-':>4}"
                         f"   images {self.images.get(name, 0)}")
        tot_s, tot_i = sum(self.sequences.values()), sum(self.images.values())
        lines.append(f"  {'total':<10} {tot_s:>5} / {self.expected_sequences or '-':>4}"
                     f"   images {tot_i} / {self.expected_images or '-'}")
        return "\n".join(lines)


@dataclass
class ReadResult:
    records: list[FaceRecord]
    skipped: dict[str, int]  # counted, not errors (e.g. unlabelled CK+ sequences)
    rejected: list[tuple[str, str]]  # (path, reason)
    report: TableReport
    inputs: dict[str, str] = field(default_factory=dict)  # every file read: relative path -> sha256


# -- helpers shared by the readers ---------------------------------------------------------------
def frame_number(name: str) -> int:
    """The last run of digits in a file name's stem: ``S005_001_00000011.png`` -> 11."""
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else -1


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder sorted by frame number (then name)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: (frame_number(p.name), p.name))


def sorted_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_root(root: str | Path, marker: str, what: str, found=None) -> Path:
    """Fail with a one-line ``DataError`` unless ``root/marker`` exists. A root that is a parent of
    the real one gets a suggestion (``did you mean X/CK+ ?``)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: dataset root does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a folder")
    if (root / marker).is_dir() if found is None else found(root):
        return root
    if not any(root.iterdir()):
        raise DataError(f"{root}: dataset root is empty (expected {what})")
    hits = _find_below(root, marker, found)
    hint = f"; did you mean {hits[0]} ?" if hits else ""
    raise DataError(f"no {marker}/ under {root} (expected {what}){hint}")


def _find_below(root: Path, marker: str, found, depth: int = 3) -> list[Path]:
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted_dirs(d)
            except OSError:
                continue
            for c in children:
                if (c / marker).is_dir() if found is None else found(c):
                    return [c]
                nxt.append(c)
        level = nxt
    return []


class Collector:
    """Accumulates records, rejections, skips and input hashes while a reader walks a root."""

    def __init__(self, root: Path, dataset: str):
        self.root, self.dataset = root, dataset
        self.records: list[FaceRecord] = []
        self.rejected: list[tuple[str, str]] = []
        self.skipped: Counter[str] = Counter()
        self.inputs: dict[str, str] = {}
        self._seen: dict[tuple[str, int | None], str] = {}  # (digest, video frame) -> first path

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def reject(self, path: Path | str, reason: str) -> None:
        self.rejected.append((self.rel(path) if isinstance(path, Path) else path, reason))

    def note_input(self, path: Path) -> str:
        digest = sha256_file(path)
        self.inputs[self.rel(path)] = digest
        return digest

    def add(self, path: Path, **fields) -> None:
        """Add a face, unless its file is empty or a byte-identical duplicate of one already kept."""
        rel = self.rel(path)
        video_frame = fields.get("video_frame")
        if path.stat().st_size == 0:
            self.reject(rel, "empty file (0 bytes)")
            return
        digest = self.inputs.get(rel) or self.note_input(path)
        first = self._seen.get((digest, video_frame))
        if first is not None:
            where = rel if video_frame is None else f"{rel}#{video_frame}"
            self.rejected.append((where, f"duplicate frame: same image content as {first}"))
            return
        if fields.get("landmarks") is None:
            fields["landmarks"] = self.sidecar(rel, video_frame)
        rec = FaceRecord(path=rel, dataset=self.dataset, digest=digest, **fields)
        self._seen[(digest, video_frame)] = rec.key
        self.records.append(rec)

    def sidecar(self, rel: str, video_frame: int | None = None) -> np.ndarray | None:
        """Landmarks from the optional ``Landmarks68/`` tree (None if absent; a bad file is rejected)."""
        path = sidecar_path(self.root, rel, video_frame)
        if not path.is_file():
            return None
        self.note_input(path)
        try:
            return parse_landmarks(path)
        except ValueError as e:
            self.reject(path, f"{self.rel(path)}: malformed landmarks ({e}); the frame is kept without landmarks")
            return None

    def result(self, class_names, table1: dict) -> ReadResult:
        seqs: dict[str, set] = {n: set() for n in class_names}
        imgs: Counter[str] = Counter()
        for r in self.records:
            seqs[r.label_name].add(r.sequence)
            imgs[r.label_name] += 1
        report = TableReport(
            dataset=self.dataset, class_names=tuple(class_names),
            sequences={n: len(s) for n, s in seqs.items()}, images={n: imgs[n] for n in class_names},
            expected_sequences=table1.get("sequences"), expected_images=table1.get("images"),
            expected_per_class=table1.get("per_class"),
        )
        return ReadResult(self.records, dict(self.skipped), self.rejected, report, self.inputs)


def parse_landmarks(path: Path) -> np.ndarray:
    """A CK+ ``*_landmarks.txt``: 68 lines of ``x y`` floats -> 68x2 float32 (ValueError if not)."""
    rows = [ln.split() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(rows) != N_LANDMARKS or any(len(r) != 2 for r in rows):
        raise ValueError(f"expected {N_LANDMARKS} lines of 'x y', got {len(rows)} lines")
    pts = np.asarray(rows, dtype=np.float64).astype(np.float32)
    if not np.isfinite(pts).all():
        raise ValueError("non-finite coordinate")
    return pts


def pick_last(frames: list[Path], n: int = 3) -> list[Path]:
    return frames[-n:]


def pick_middle(count: int, n: int = 3) -> list[int]:
    """Indices of the ``n`` middle frames of a sequence of ``count`` frames."""
    if count <= n:
        return list(range(count))
    start = (count - n) // 2
    return list(range(start, start + n))
