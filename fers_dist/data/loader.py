"""Parquet -> tensors, fold splits, the paper's augmentation and target-pair sampling. Ray-free.

These sets are tiny (at most a few thousand 110x110 faces), so a whole dataset is one uint8 tensor that the
trainer can put on the GPU; augmentation and target sampling are batched tensor ops on the same device,
with no DataLoader workers and no host round trips.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fers_dist.errors import DataError


@dataclass(frozen=True)
class FaceSet:
    """A prepared dataset (or a subset of one) as tensors."""

    images: torch.Tensor  # uint8 [N, C, S, S], aligned faces
    labels: torch.Tensor  # int64 [N], 0-based expression
    subjects: torch.Tensor  # int64 [N], index into subject_names
    folds: torch.Tensor  # int64 [N], outer CV fold
    class_names: tuple[str, ...]
    subject_names: tuple[str, ...]
    dataset: str = ""

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_folds(self) -> int:
        return int(self.folds.max()) + 1 if len(self) else 0

    def subset(self, idx: torch.Tensor) -> FaceSet:
        idx = idx.to(self.labels.device)
        return replace(self, images=self.images[idx], labels=self.labels[idx],
                       subjects=self.subjects[idx], folds=self.folds[idx])

    def to(self, device: torch.device | str) -> FaceSet:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device),
                       subjects=self.subjects.to(device), folds=self.folds.to(device))

    def n_subjects(self) -> int:
        return int(self.subjects.unique().numel())


def parquet_path(data: str | Path, dataset: str | None = None) -> Path:
    """Accept a faces.parquet file, a dataset folder, or a data root plus dataset name."""
    p = Path(data)
    if p.suffix == ".parquet":
        return p
    if dataset and not (p / "faces.parquet").exists():
        p = p / dataset
    return p / "faces.parquet"


def load_faces(data: str | Path, dataset: str | None = None) -> FaceSet:
    """Read ``<root>/<dataset>/faces.parquet`` (written by ``fers prepare``) into a FaceSet."""
    import cv2
    import pyarrow.parquet as pq

    path = parquet_path(data, dataset)
    if not path.exists():
        hint = f" (run: fers prepare --dataset {dataset or '<name>'} --root RAW --out {data})"
        raise DataError(f"{path}: no prepared dataset here{hint}")
    try:
        table = pq.read_table(path, columns=["image", "subject", "label", "label_name", "fold", "dataset"])
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for corrupt or foreign files)
        raise DataError(f"{path}: not a readable faces.parquet ({type(e).__name__}: {e})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the prepared dataset has no faces")
    cols = table.to_pydict()
    class_names = _class_names(path, cols)
    images = []
    for i, blob in enumerate(cols["image"]):
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DataError(f"{path}: row {i} holds an undecodable image")
        images.append(img[None] if img.ndim == 2 else img[..., ::-1].transpose(2, 0, 1))  # BGR PNG -> RGB
    subject_names = tuple(sorted(set(cols["subject"])))
    code = {s: i for i, s in enumerate(subject_names)}
    return FaceSet(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(cols["label"], dtype=torch.int64),
        subjects=torch.tensor([code[s] for s in cols["subject"]], dtype=torch.int64),
        folds=torch.tensor(cols["fold"], dtype=torch.int64),
        class_names=class_names,
        subject_names=subject_names,
        dataset=cols["dataset"][0],
    )


def _class_names(path: Path, cols: dict) -> tuple[str, ...]:
    manifest = path.parent / "manifest.json"
    if manifest.exists():
        names = json.loads(manifest.read_text()).get("class_names")
        if names:
            return tuple(names)
    by_label = dict(zip(cols["label"], cols["label_name"]))
    return tuple(by_label[k] for k in range(max(by_label) + 1))


# -- splits ------------------------------------------------------------------------------------------


def split_fold(faces: FaceSet, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training side (the other folds) and the test side (``fold``)."""
    n = faces.n_folds
    if not isinstance(fold, int) or not 0 <= fold < n:
        raise DataError(f"fold {fold!r} is out of range: {faces.dataset or 'dataset'} has folds 0..{n - 1}")
    test = faces.folds == fold
    train_idx, test_idx = (~test).nonzero().squeeze(1), test.nonzero().squeeze(1)
    if train_idx.numel() == 0:
        raise DataError(f"fold {fold}: the training split is empty (every face is in the test fold)")
    if test_idx.numel() == 0:
        raise DataError(f"fold {fold}: the test split is empty")
    return train_idx, test_idx


def inner_folds(faces: FaceSet, train_idx: torch.Tensor, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Subject-disjoint inner (train, validation) splits carved from ``train_idx`` only (nested CV)."""
    from fers_dist.data.folds import assign_folds

    sub = faces.subjects[train_idx].tolist()
    lab = faces.labels[train_idx].tolist()
    names = [faces.subject_names[s] for s in sub]
    fold_of = assign_folds(names, lab, n_folds=k, dataset=f"{faces.dataset}-inner", seed=seed)
    inner = torch.tensor([fold_of[n] for n in names], device=train_idx.device)
    return [(train_idx[inner != f], train_idx[inner == f]) for f in range(k)]


def holdout_split(faces: FaceSet, train_idx: torch.Tensor, fraction: float, seed: int = 0):
    """One subject-disjoint validation split holding out about ``fraction`` of the training subjects."""
    k = max(2, round(1 / fraction))
    return inner_folds(faces, train_idx, k, seed)[0]


# -- augmentation (paper: random 96 crop of 110, mirror, rotation in {-15..15} step 5) ---------------


def rotation_table(rotations: list[float], device: torch.device) -> torch.Tensor:
    """The allowed rotation angles in radians, built once per run: copying them to the device every step
    would be a host-to-device transfer (and a sync) per step."""
    return torch.tensor(rotations, dtype=torch.float32, device=device) * (math.pi / 180)


def sample_augmentation(n: int, size: int, crop: int, angles: torch.Tensor, mirror: bool,
                        generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Affine matrices [n, 2, 3] for ``F.affine_grid``: a random crop, rotation (one of ``angles``, from
    :func:`rotation_table`) and mirror per sample. No host sync.

    Built once per batch and applied to the source image AND its target image, so the pair stays
    geometrically aligned for L_rec.
    """
    kw = {"generator": generator, "device": device}
    theta = angles[torch.randint(angles.numel(), (n,), **kw)]
    flip = (torch.where(torch.rand(n, **kw) < 0.5, -1.0, 1.0) if mirror
            else torch.ones(n, device=device))
    off = torch.randint(size - crop + 1, (n, 2), **kw).float()  # top-left corner in pixels
    s = crop / size
    t = (crop + 2 * off) / size - 1  # crop centre in normalised input coordinates
    cos, sin = torch.cos(theta) * s, torch.sin(theta) * s
    return torch.stack([torch.stack([cos * flip, -sin, t[:, 0]], 1),
                        torch.stack([sin * flip, cos, t[:, 1]], 1)], 1)


def apply_augmentation(images: torch.Tensor, affine: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 [n, C, S, S] -> float [n, C, crop, crop] in [-1, 1]; out-of-face corners are black."""
    x = images.float() / 255
    grid = F.affine_grid(affine, [x.shape[0], x.shape[1], crop, crop], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * 2 - 1


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """Test-time input: the centre crop, float in [-1, 1]."""
    o = (images.shape[-1] - crop) // 2
    return images[..., o:o + crop, o:o + crop].float() / 127.5 - 1


# -- target pairs ------------------------------------------------------------------------------------


class TargetSampler:
    """Draws, for each source face, a target expression the SAME subject has, and a real image I^t of
    that subject showing it (eq. 7 needs one). The source's own expression is drawn only when the
    subject has no other. All on the faces' device, batched."""

    def __init__(self, labels: torch.Tensor, subjects: torch.Tensor, num_classes: int):
        self.num_classes = num_classes
        key = subjects * num_classes + labels
        self.order = torch.argsort(key, stable=True)
        n_keys = (int(subjects.max()) + 1) * num_classes
        self.count = torch.bincount(key, minlength=n_keys)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.available = (self.count > 0).view(-1, num_classes)
        self.labels, self.subjects = labels, subjects

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        subj, own = self.subjects[idx], self.labels[idx]
        weights = self.available[subj].float()
        others = weights.clone()
        others[torch.arange(idx.numel(), device=idx.device), own] = 0
        weights = torch.where(others.sum(1, keepdim=True) > 0, others, weights)
        target = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        key = subj * self.num_classes + target
        pick = (torch.rand(idx.numel(), generator=generator, device=idx.device) * self.count[key]).long()
        return target, self.order[self.start[key] + pick]


def class_balance(labels: torch.Tensor, num_classes: int) -> dict:
    """Counts per class and the imbalance ratio (largest / smallest non-empty class)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    nz = counts[counts > 0]
    return {"counts": counts.tolist(),
            "imbalance": float(nz.max() / nz.min()) if nz.numel() else float("nan")}
