"""Experiment tracking against a REAL MLflow server (cluster_fixtures.mlflow_server), queried back with
MlflowClient: one MLflow run per fold run with its config, epochs, test metrics and confusion matrix; one
per tuning trial; Tune trial folders named by run; ``--set`` recorded in the rows; provenance per row."""

from __future__ import annotations

import json

import pytest

from fers_dist.cli import main
from fers_dist.config import dump_config
from fers_dist.results import read_folds

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_every_fold_run_is_one_mlflow_run(mlflow_server, tiny_cfg, prepared_data, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    cfg = tiny_cfg.with_overrides({"data.root": str(prepared_data), "cv.storage": str(tmp_path / "results"),
                                   "cv.experiment": "tracked", "cv.workers_per_run": 0, "cv.gpus_per_run": 0,
                                   "cv.cpus_per_run": 1})
    dump_config(cfg, tmp_path / "cfg.yaml")
    argv = ["cv", "--config", str(tmp_path / "cfg.yaml"), "--datasets", "ckplus", "--variants", "original",
            "--folds", "0,1", "--mlflow", mlflow_server, "--set", "train.epochs=3", "--set", "loss.lam_cyc=0.25"]
    assert main(argv) == 0
    rows = read_folds(str(tmp_path / "results" / "tracked" / "folds.parquet")).set_index("fold")
    assert (rows["epochs_run"] == 3).all()  # --set reached the runs, and the rows record it
    assert json.loads(rows.loc[0, "config"])["loss"]["lam_cyc"] == 0.25
    assert rows["torch_version"].notna().all() and (rows["hostname"] != "").all()  # provenance per row
    assert {p.name for p in (tmp_path / "results" / "tracked").glob("tune-*/*") if p.is_dir()} == {
        "ckplus-original-f0", "ckplus-original-f1"}  # Tune's (TensorBoard) folders are named by run

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"ckplus-original-f0", "ckplus-original-f1"}
    for fold in (0, 1):
        r = runs[f"ckplus-original-f{fold}"]
        assert r.info.status == "FINISHED"
        assert {k: r.data.tags[k] for k in ("dataset", "variant", "fold", "seed", "config_hash", "tag")} == {
            "dataset": "ckplus", "variant": "original", "fold": str(fold), "seed": "0",
            "config_hash": rows.loc[fold, "config_hash"], "tag": "paper"}
        assert r.data.params["loss.lam_cyc"] == "0.25" and r.data.params["train.epochs"] == "3"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [0, 1, 2]
        assert r.data.metrics["test_accuracy"] == pytest.approx(rows.loc[fold, "accuracy"])
        local = client.download_artifacts(r.info.run_id, "confusion.json", str(tmp_path / f"a{fold}"))
        with open(local) as f:
            assert json.load(f)["confusion"] == [list(map(int, row)) for row in rows.loc[fold, "confusion"]]


def test_every_tuning_trial_is_one_mlflow_run(mlflow_server, demo_cfg, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient
    from test_tune import write_faces

    from fers_dist.tune.cli import run_tune

    write_faces(tmp_path / "data")
    cfg = demo_cfg.with_overrides({
        "identity.backbone": "none", "train.batch_size": 16, "data.root": str(tmp_path / "data"),
        "cv.storage": str(tmp_path / "results"), "cv.tracking.mlflow": mlflow_server, "tune.dataset": "oulu",
        "tune.trials": 2, "tune.epochs": 1, "tune.inner_folds": 2, "tune.pruner": "none",
        "tune.cpus_per_trial": 0.5, "tune.gpus_per_trial": 0, "tune.study": "tracked-study", "tune.outer_folds": None,
        "tune.storage": f"sqlite:///{tmp_path / 'study.db'}"})
    run_tune(cfg, out=str(tmp_path / "out"))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tracked-study-trials")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.data.tags["study"] == "tracked-study" for r in runs)
    for r in runs:
        assert "loss.lam_adv" in r.data.params  # the sampled λ
        assert 0 <= r.data.metrics["inner_val_accuracy"] <= 1
