"""A REAL tiny experiment for the report and fes-eval tests, built once per test session.

Synthetic CK+ faces (``fers_dist.data.synthetic``) go through the real reader, aligner and fold
assignment of ``fers prepare`` (its serial path, so no Ray), then ``fit_fold`` trains the demo model for
2 epochs: ``original`` and ``no_mtl`` on all 3 folds and ``fes_da`` on fold 0 only (reusing the original
checkpoint), with checkpoints, appended to folds.parquet through ``results.append_rows``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "tiny"
N_FOLDS = 3
_BUILT: dict = {}


def _prepare(raw: Path, data_root: Path) -> None:
    """fers prepare's reader -> aligner -> folds, through its serial (Ray-free) path."""
    import pyarrow.parquet as pq

    from fers_dist.data import prepare as P
    from fers_dist.data.align import align_serial
    from fers_dist.data.layouts import get_dataset

    spec = get_dataset("ckplus")
    result = spec.read(raw)
    aligned = align_serial(P.input_table(result.records, raw), "landmarks", 40)
    faces, _, _ = P.consolidate(aligned, "ckplus", N_FOLDS, 0)
    folder = data_root / "ckplus"
    folder.mkdir(parents=True)
    pq.write_table(faces, folder / "faces.parquet")
    (folder / "manifest.json").write_text(json.dumps({"class_names": list(spec.class_names)}))


def build_tiny_experiment(root: Path) -> dict:
    import torch

    from fers_dist.config import load_config
    from fers_dist.data.loader import load_faces
    from fers_dist.data.synthetic import synthesize
    from fers_dist.results import append_rows, experiment_uri, result_row
    from fers_dist.train.fold import fit_fold

    torch.set_num_threads(1)
    synthesize("ckplus", root / "raw", subjects=9, size=64, frames=(3, 4), progress=False)
    data_root, storage = root / "data", root / "results"
    _prepare(root / "raw", data_root)
    cfg = load_config(ROOT / "jobs" / "configs" / "demo.yaml", {
        "train.epochs": 2, "identity.backbone": "none", "data.n_folds": N_FOLDS, "data.root": str(data_root),
        "cv.storage": str(storage), "cv.experiment": EXPERIMENT, "model.width": 8, "model.cls_hidden": 32,
        "model.disc_width": 8, "identity.encoder_epochs": 1})
    faces = load_faces(data_root, "ckplus")
    exp_dir = Path(experiment_uri(str(storage), EXPERIMENT))
    rows = []
    runs = [(v, f) for v in ("original", "no_mtl") for f in range(N_FOLDS)] + [("fes_da", 0)]
    for variant, fold in runs:
        vcfg = cfg.with_overrides({"model.variant": variant})
        ckdir = exp_dir / "checkpoints" / f"ckplus-{variant}-f{fold}"
        init = exp_dir / "checkpoints" / f"ckplus-original-f{fold}" / "main.pt" if variant == "fes_da" else None
        res = fit_fold(vcfg, faces, fold, checkpoint_dir=ckdir, init_from=init, log=lambda m: None)
        rows.append(result_row(res, experiment=EXPERIMENT, checkpoint_uri=str(ckdir),
                               config=vcfg.model_dump(mode="json")))
    append_rows(str(storage), EXPERIMENT, rows)
    return {"exp_dir": exp_dir, "data_root": data_root, "cfg": cfg, "faces": faces}


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory) -> dict:
    """Built once even though two test modules import this fixture."""
    if "exp" not in _BUILT:
        _BUILT["exp"] = build_tiny_experiment(tmp_path_factory.mktemp("tiny-experiment"))
    return _BUILT["exp"]


def copy_experiment(tiny: dict, dst: Path, edit=None) -> Path:
    """A new experiment folder holding the tiny experiment's folds.parquet (checkpoint paths are absolute,
    so they still resolve), optionally edited: ``edit(frame) -> frame``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fers_dist.results import read_folds

    dst.mkdir(parents=True, exist_ok=True)
    src = tiny["exp_dir"] / "folds.parquet"
    if edit is None:
        shutil.copy(src, dst / "folds.parquet")
    else:
        frame = edit(read_folds(str(src)).copy())
        pq.write_table(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False),
                       dst / "folds.parquet")
    return dst
