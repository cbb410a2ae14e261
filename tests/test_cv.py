"""Distributed cross-validation on Ray: the grid, packing without deadlock, fault tolerance, resume,
folds.parquet rows, and clear errors before any run starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fers_dist.config import CVConfig, ConfigError
from fers_dist.dist.cv import Run, check_inputs, plan_runs, run_cv
from fers_dist.dist.resources import plan_resources
from fers_dist.errors import FersError
from fers_dist.results import append_rows, folds_uri, read_folds

ROOT = Path(__file__).resolve().parents[1]


def cv_cfg(tiny_cfg, data, storage, **cv):
    o = {"data.root": str(data), "cv.storage": str(storage)}
    o.update({f"cv.{k}": v for k, v in cv.items()})
    return tiny_cfg.with_overrides(o)


# -- planning and bad input (no Ray) ------------------------------------------------------------


def test_plan_adds_original_for_fes_da_and_names_runs(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"cv.datasets": ["ckplus"], "cv.variants": ["fes_da"], "cv.folds": [0, 3]})
    assert plan_runs(cfg) == [Run("ckplus", "original", 0), Run("ckplus", "original", 3),
                              Run("ckplus", "fes_da", 0), Run("ckplus", "fes_da", 3)]


def test_unknown_dataset_or_variant_is_a_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match="cv.datasets.0"):
        tiny_cfg.with_overrides({"cv.datasets": ["affectnet"]})
    with pytest.raises(ConfigError, match="cv.variants.0"):
        tiny_cfg.with_overrides({"cv.variants": ["no_gates"]})


def test_folds_out_of_range(tiny_cfg):
    with pytest.raises(FersError, match=r"cv.folds: \[10\] out of range 0..9"):
        plan_runs(tiny_cfg.with_overrides({"cv.folds": [0, 10]}))


def test_missing_parquet_folder(tiny_cfg, tmp_path):
    cfg = cv_cfg(tiny_cfg, tmp_path / "nodata", tmp_path / "out")
    with pytest.raises(FersError, match=r"nodata/ckplus/faces.parquet: no prepared ckplus dataset"):
        check_inputs(cfg, plan_runs(cfg))


def test_unwritable_storage(tiny_cfg, prepared_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = cv_cfg(tiny_cfg, prepared_data, blocker / "results", datasets=["ckplus"])
    with pytest.raises(FersError, match="cv.storage .* is not writable"):
        check_inputs(cfg, plan_runs(cfg))


def test_gpu_request_on_cpu_cluster_says_what_it_has():
    with pytest.raises(FersError, match=r"gpus_per_run=0.25 but the cluster has no GPUs \(it has 2 CPUs, 0 GPUs\)"):
        plan_resources(CVConfig(gpus_per_run=0.25), {"CPU": 2.0})


def test_packing_caps_concurrency_by_whole_runs():
    r = plan_resources(CVConfig(workers_per_run=1, gpus_per_run=0.25, cpus_per_run=1), {"CPU": 64, "GPU": 8})
    assert r.max_concurrent == 32 and r.worker == {"CPU": 1.0, "GPU": 0.25}
    r = plan_resources(CVConfig(workers_per_run=1, gpus_per_run=0, cpus_per_run=1), {"CPU": 2})
    assert r.max_concurrent == 1  # driver 0.01 + worker 1 CPU: two runs would not fit with their workers


def test_rows_are_replaced_not_duplicated(tmp_path):
    row = {"dataset": "ckplus", "variant": "original", "fold": 0, "config_hash": "h", "tag": "paper",
           "status": "finished", "accuracy": 0.5}
    append_rows(str(tmp_path), "e", [row])
    append_rows(str(tmp_path), "e", [dict(row, accuracy=0.6), dict(row, fold=1)])
    frame = read_folds(folds_uri(str(tmp_path), "e"))
    assert len(frame) == 2 and frame.set_index("fold").loc[0, "accuracy"] == 0.6
    assert not list(tmp_path.glob("e/*.tmp"))


def test_dry_run_starts_nothing(tiny_cfg, tmp_path, capsys):
    from fers_dist.cli import main

    assert main(["cv", "--config", str(ROOT / "jobs/configs/paper.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "120 runs" in out and "8 GPU(s)" in out and "GPU-hours" in out


# -- real runs ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_cv_two_datasets_two_variants_ten_folds(tiny_cfg, prepared_data, tmp_path, ray_session):
    cfg = cv_cfg(tiny_cfg, prepared_data, tmp_path, datasets=["ckplus", "oulu"],
                 variants=["no_mtl", "original"], workers_per_run=0, gpus_per_run=0, cpus_per_run=1)
    frame = run_cv(cfg)
    assert len(frame) == 40 and (frame["status"] == "finished").all()
    assert set(frame["fold"]) == set(range(10)) and frame[["dataset", "variant", "fold"]].duplicated().sum() == 0
    assert ((frame["accuracy"] >= 0) & (frame["accuracy"] <= 1)).all()
    assert frame.groupby("dataset")["n_test_images"].sum().to_dict() == {
        ds: n for ds, n in _dataset_sizes(prepared_data).items()} | {}
    again = run_cv(cfg)  # everything finished: nothing re-runs, nothing duplicates
    assert len(again) == 40 and (again["finished_at"] == frame["finished_at"]).all()


def _dataset_sizes(data):
    import json

    # each image is in exactly one test fold; two variants -> twice the dataset
    return {ds: 2 * json.loads((data / ds / "manifest.json").read_text())["n_images"] for ds in ("ckplus", "oulu")}
