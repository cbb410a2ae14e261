"""The cluster path, proved on a cluster (cluster_fixtures.py): three real Ray nodes with logical GPUs and
S3 storage on a loopback moto server. Each test is one of the first-contact failures it fixes."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from fers_dist.cv.cli import run_cv
from fers_dist.errors import FersError
from fers_dist.model.lightcnn import LightCNN9
from fers_dist.results import run_key
from fers_dist.storage import exists, list_files

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _official_lightcnn(path) -> None:
    """A LightCNN-9 saved as the official train.py saves it (DataParallel keys under 'state_dict')."""
    torch.manual_seed(0)
    net = LightCNN9(num_classes=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 80, "arch": "LightCNN-9",
                "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)


def test_relative_paths_and_logical_gpus_place_runs_on_the_worker_nodes(
        multinode, tiny_cfg, prepared_data, tmp_path, monkeypatch):
    """Train workers chdir into their run folders: the relative identity.checkpoint, data.root and
    cv.storage of a config must still be found. With gpus_per_run 0.5 Ray places the runs by GPU, so on the
    worker nodes, never on the GPU-less head; the Train workers hold logical GPUs and train on the CPU."""
    monkeypatch.chdir(tmp_path)
    _official_lightcnn(tmp_path / "weights" / "LightCNN_9Layers_checkpoint.pth.tar")
    (tmp_path / "data").symlink_to(prepared_data)
    cfg = tiny_cfg.with_overrides({
        "identity.backbone": "lightcnn9", "identity.checkpoint": "weights/LightCNN_9Layers_checkpoint.pth.tar",
        "data.root": "data", "cv.storage": "results", "cv.experiment": "relative", "cv.datasets": ["ckplus"],
        "cv.variants": ["original"], "cv.folds": [0, 1], "cv.workers_per_run": 1, "cv.gpus_per_run": 0.5,
        "cv.cpus_per_run": 0.5, "cv.max_failures": 0, "cv.shared_filesystem": True, "train.device": "cpu",
        "train.epochs": 1, "train.batch_size": 16})
    frame = run_cv(cfg)
    assert len(frame) == 2 and (frame["status"] == "finished").all(), frame[["run_name", "status", "error"]]
    assert set(frame["identity"]) == {"lightcnn9"}  # the checkpoint was found by the workers
    assert set(frame["node_id"]) <= multinode.worker_ids and multinode.head_id not in set(frame["node_id"])
    stored = json.loads(frame["config"].iloc[0])
    assert stored["identity"]["checkpoint"] == str(tmp_path / "weights" / "LightCNN_9Layers_checkpoint.pth.tar")


def test_s3_storage_end_to_end_prepare_cv_report_fes_eval(multinode, s3, tiny_cfg, prepared_data, tmp_path):
    """cv.storage on S3: fes_da reuses the original run's checkpoint from the bucket (it never trains the
    original model again), rows carry their checkpoint URIs, each run keeps one object per checkpoint
    file however often it saves, and the report and fes-eval read the generators from the bucket."""
    from fers_dist.report import fes_eval
    from fers_dist.report.cli import build_report

    storage = f"{s3.uri}/results"
    cfg = tiny_cfg.with_overrides({
        "data.root": str(prepared_data), "cv.storage": storage, "cv.experiment": "s3chain",
        "cv.datasets": ["ckplus"], "cv.variants": ["original", "fes_da"], "cv.folds": [0],
        "cv.workers_per_run": 0, "cv.gpus_per_run": 0.5, "cv.cpus_per_run": 0.5, "cv.shared_filesystem": True,
        "train.device": "cpu", "train.epochs": 3, "train.checkpoint_every": 1})
    scratch_before = set(Path(tempfile.gettempdir()).glob("fers-ckplus-*"))
    frame = run_cv(cfg).set_index("variant")
    assert (frame["status"] == "finished").all(), frame[["status", "error"]]
    h = cfg.hash()
    homes = {v: f"{storage}/s3chain/checkpoints/{run_key('ckplus', v, 0, 'paper', h)}" for v in ("original", "fes_da")}
    assert frame.loc["original", "checkpoint_uri"] == homes["original"]
    assert frame.loc["fes_da", "checkpoint_uri"] == homes["fes_da"]
    phases = {h.get("phase") for h in json.loads(frame.loc["fes_da", "history"])}
    assert phases == {"fes_da"}  # no epoch of the original objective: its model came from the bucket
    objects = list_files(f"{storage}/s3chain/checkpoints")
    assert objects == sorted([f"{s3.bucket}/results/s3chain/checkpoints/{homes['original'].rsplit('/', 1)[1]}/main.pt",
                              f"{s3.bucket}/results/s3chain/checkpoints/{homes['fes_da'].rsplit('/', 1)[1]}/fes_da.pt"])
    # the nodes keep no local copy: each run's scratch folder (its checkpoints, fes_da's downloaded main.pt)
    # is removed once the bucket has them (the worker nodes here share this machine's temp folder)
    left = {p for v in homes for p in Path(tempfile.gettempdir()).glob(f"fers-{homes[v].rsplit('/', 1)[1]}-*")}
    assert not left - scratch_before, left - scratch_before

    exp = f"{storage}/s3chain"
    report = build_report(exp, tmp_path / "report")
    assert [p.name for p in report["figures"] if p.name.startswith("synthesis_ckplus")]
    assert report["html"].is_file()

    p = argparse.ArgumentParser()
    fes_eval.add_arguments(p)
    assert fes_eval.run(p.parse_args([exp, "--recogniser-epochs", "1", "--identity", "lightcnn",
                                      "--identity-faces", "4", "--device", "cpu"])) == 0
    assert exists(f"{exp}/fes_eval.parquet") and exists(f"{exp}/fes_eval.csv")
    import pyarrow.parquet as pq

    from fers_dist.storage import filesystem

    fs, path = filesystem(f"{exp}/fes_eval.parquet")
    fes = pq.read_table(path, filesystem=fs).to_pandas()
    assert sorted(fes["variant"]) == ["fes_da", "original"]
    assert len(pd.unique(fes["fold"])) == 1


def test_planner_reads_the_card_from_the_nodes_and_refuses_a_share_too_small(multinode, tiny_cfg, prepared_data,
                                                                               tmp_path):
    """The worker nodes advertise `accelerator_type:H100`: `fers cv` sizes the GPU share from the nodes Ray
    reports (80 GB), and refuses, before any run starts, runs estimated larger than 0.5 of it (the paper's
    model at batch 128, ~49 GB); the tiny model at the same share is accepted and trains."""
    paper = {"model.width": 256, "model.input_size": 96, "data.aligned_size": 110, "train.batch_size": 128}
    cfg = tiny_cfg.with_overrides({
        "data.root": str(prepared_data), "cv.storage": str(tmp_path / "results"), "cv.experiment": "sized",
        "cv.datasets": ["ckplus"], "cv.variants": ["original"], "cv.folds": [0], "cv.workers_per_run": 0,
        "cv.gpus_per_run": 0.5, "cv.cpus_per_run": 0.5, "cv.max_failures": 0, "cv.shared_filesystem": True,
        "train.device": "auto", "train.epochs": 1})
    with pytest.raises(FersError, match=r"^cv.gpus_per_run=0.5 GPU of 80 GB \(accelerator type H100\) gives a run "
                                        r"40.0 GB, but one run needs an estimated ~4\d\.\d GB"):
        run_cv(cfg.with_overrides(paper))
    assert not (tmp_path / "results" / "sized" / "folds.parquet").exists()
    frame = run_cv(cfg)  # `auto` trains on the CPU here (FERS_DEVICE=cpu), on the GPU Ray assigned elsewhere
    assert (frame["status"] == "finished").all() and set(frame["node_id"]) <= multinode.worker_ids


def test_pretrain_on_a_worker_node_to_s3_then_folds_start_from_it(multinode, s3, tiny_cfg, prepared_data, tmp_path):
    """fers pretrain's Train worker runs on a GPU node and uploads its model to the bucket; the fold runs, on
    the worker nodes too, download it from there and start from it (rows tagged 'pretrained')."""
    from fers_dist.cv.pretrain import run_pretrain
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize
    from fers_dist.train.pretrain import pretrained_uri

    synthesize("bu4dfe", tmp_path / "raw", subjects=6, seed=0, size=160, frames=(3, 4), progress=False)
    data = tmp_path / "data"
    prepare("bu4dfe", tmp_path / "raw", data, aligner="landmarks", size=40, n_folds=2, log=lambda *a: None)
    (data / "ckplus").symlink_to(prepared_data / "ckplus")
    cfg = tiny_cfg.with_overrides({
        "data.root": str(data), "cv.storage": f"{s3.uri}/results", "cv.experiment": "pre", "cv.datasets": ["ckplus"],
        "cv.variants": ["original"], "cv.folds": [0], "cv.workers_per_run": 1, "cv.gpus_per_run": 0.5,
        "cv.cpus_per_run": 0.5, "cv.max_failures": 0, "cv.shared_filesystem": True, "train.device": "cpu",
        "train.epochs": 1, "train.pretrain_epochs": 1, "train.batch_size": 16, "train.init_from": "pretrained"})
    summary = run_pretrain(cfg, log=lambda m: None)
    uri = pretrained_uri(cfg)
    assert summary["dataset"] == "bu4dfe" and summary["epochs"] == 1
    assert exists(uri) and exists(uri.replace("/main.pt", "/summary.json"))
    frame = run_cv(cfg)
    assert (frame["status"] == "finished").all(), frame[["status", "error"]]
    assert list(frame["tag"]) == ["pretrained"] and list(frame["pretrained_from"]) == [uri]
    assert set(frame["node_id"]) <= multinode.worker_ids
