"""Distributed cross-validation on Ray: the grid, packing without deadlock, fault tolerance, resume,
folds.parquet rows, and clear errors before any run starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fers_dist.config import ConfigError, CVConfig
from fers_dist.cv.cli import Run, check_inputs, plan_runs, run_cv
from fers_dist.cv.fold_run import choose_device
from fers_dist.cv.resources import check_placeable, plan_resources
from fers_dist.errors import FersError
from fers_dist.results import append_rows, folds_uri, read_folds, run_key

ROOT = Path(__file__).resolve().parents[1]


def cv_cfg(tiny_cfg, data, storage, **cv):
    o = {"data.root": str(data), "cv.storage": str(storage)}
    o.update({f"cv.{k}": v for k, v in cv.items()})
    return tiny_cfg.with_overrides(o)


# -- planning and bad input (no Ray) ------------------------------------------------------------


def test_plan_adds_original_for_fes_da_and_names_runs(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"cv.datasets": ["ckplus"], "cv.variants": ["fes_da"], "cv.folds": [0, 3]})
    assert plan_runs(cfg) == [Run("ckplus", "original", 0, 0), Run("ckplus", "original", 3, 0),
                              Run("ckplus", "fes_da", 0, 0), Run("ckplus", "fes_da", 3, 0)]


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


def test_devices_follow_what_ray_assigned(monkeypatch):
    monkeypatch.delenv("FERS_DEVICE", raising=False)  # the suite's own pin, tested below
    assert choose_device("auto", [], cuda_usable=True) == "cpu"  # holds no GPU: never CUDA, even on a GPU node
    assert choose_device("cpu", ["0"], cuda_usable=False) == "cpu"  # logical GPUs, a deliberate CPU run
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # Ray narrows the visible devices to the assigned one
    assert choose_device("auto", ["3"], cuda_usable=True) == "cuda:0"
    assert choose_device("cuda", ["3"], cuda_usable=True) == "cuda:0"
    with pytest.raises(FersError, match="assigned GPU 3 to this run but CUDA is not usable"):
        choose_device("auto", ["3"], cuda_usable=False)  # never a silent CPU run
    with pytest.raises(FersError, match="'cuda' but this run holds no GPU"):
        choose_device("cuda", [], cuda_usable=True)
    with pytest.raises(FersError, match=r"train.device: 'cuda:1' is not allowed under Ray"):
        choose_device("cuda:1", ["0"], cuda_usable=True)


def test_the_suite_pins_auto_to_the_cpu_so_it_passes_on_a_gpu_machine(monkeypatch):
    """conftest.py sets FERS_DEVICE=cpu: `auto` means the CPU in fit_fold and in Ray runs, even where Ray
    assigned a (real) GPU, so the bit-identical resume tests cannot meet non-deterministic CUDA kernels."""
    from fers_dist.train.fold import resolve_device

    assert os.environ["FERS_DEVICE"] == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # as on a GPU machine
    assert str(resolve_device("auto")) == "cpu"
    assert choose_device("auto", ["0"], cuda_usable=True) == "cpu"
    assert choose_device("cuda", ["0"], cuda_usable=True) == "cuda:0"  # an explicit device is still honoured
    monkeypatch.setenv("FERS_DEVICE", "")
    assert str(resolve_device("auto")) == "cuda"


def test_what_a_cluster_cannot_place_is_refused_before_any_run(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"cv.storage": "/results", "data.root": "/data"})
    check_placeable(cfg, nodes=1)  # one node, one worker per run: local disk is fine
    with pytest.raises(FersError, match=r"^cv.storage and data.root: local paths but the cluster has 3 nodes"):
        check_placeable(cfg, nodes=3)
    check_placeable(cfg.with_overrides({"cv.shared_filesystem": True}), nodes=3)
    with pytest.raises(FersError, match=r"^data.root: local path but the cluster has 3 nodes"):
        check_placeable(cfg.with_overrides({"cv.storage": "s3://bucket/results"}), nodes=3)
    with pytest.raises(FersError, match=r"^cv.storage and data.root: local paths but cv.workers_per_run=2"):
        check_placeable(cfg.with_overrides({"cv.workers_per_run": 2}), nodes=1)
    with pytest.raises(FersError, match=r"^data.root: 's3://b/d': prepared data is read from a filesystem path"):
        check_placeable(cfg.with_overrides({"data.root": "s3://b/d"}), nodes=1)
    with pytest.raises(FersError, match=r"^train.device: 'cuda:0' is not allowed under Ray"):
        check_placeable(cfg.with_overrides({"train.device": "cuda:0"}), nodes=1)


def test_a_data_parallel_run_must_fit_on_one_node():
    from fers_dist.cv.resources import check_fits_one_node

    nodes = [{"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}]  # 8 GPUs in all, 4 per node
    check_fits_one_node(CVConfig(workers_per_run=4, gpus_per_run=4, cpus_per_run=8), nodes)
    with pytest.raises(FersError, match=r"asks for 8 GPUs / 8 CPUs and the largest node has 4 GPUs / 8 CPUs"):
        check_fits_one_node(CVConfig(workers_per_run=8, gpus_per_run=8, cpus_per_run=8), nodes)


def test_data_parallel_needs_whole_gpus_per_worker():
    with pytest.raises(FersError, match=r"gpus_per_run=1 over cv.workers_per_run=2: .* whole GPUs per worker"):
        plan_resources(CVConfig(workers_per_run=2, gpus_per_run=1), {"CPU": 8, "GPU": 4})
    assert plan_resources(CVConfig(workers_per_run=2, gpus_per_run=2), {"CPU": 8, "GPU": 4}).worker["GPU"] == 1
    assert plan_resources(CVConfig(workers_per_run=1, gpus_per_run=0.5), {"CPU": 8, "GPU": 1}).max_concurrent == 2


# -- real runs ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_a_changed_config_never_resumes_another_configs_checkpoint(tiny_cfg, prepared_data, tmp_path, ray_session):
    """Run a fold; change one loss weight; run again: the second run trains from epoch 0 in its own
    checkpoint folder, both rows are kept, and the two models differ."""
    import torch

    cfg = cv_cfg(tiny_cfg, prepared_data, tmp_path, datasets=["ckplus"], variants=["original"], folds=[0],
                 workers_per_run=0, gpus_per_run=0, cpus_per_run=1)
    changed = cfg.with_overrides({"loss.lam_rec": 2.0})
    first, second = run_cv(cfg), run_cv(changed)
    assert len(first) == 1 and len(second) == 2 and (second["status"] == "finished").all()
    rows = second.set_index("config_hash")
    assert set(rows.index) == {cfg.hash(), changed.hash()}
    assert json.loads(rows.loc[changed.hash(), "history"])[0]["epoch"] == 0  # trained, not resumed
    assert rows.loc[changed.hash(), "checkpoint_uri"] != rows.loc[cfg.hash(), "checkpoint_uri"]
    w = [torch.load(Path(rows.loc[h, "checkpoint_uri"]) / "main.pt", weights_only=True)["modules"]["model"]
         for h in (cfg.hash(), changed.hash())]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])



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


def _wait_for(predicate, timeout=240, every=0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.mark.slow
@pytest.mark.ray
def test_real_workers_pack_and_survive_a_killed_worker(tiny_cfg, prepared_data, tmp_path, ray_session):
    """3 runs with real Train workers where only 2 fit at once must finish (no nested deadlock); then a
    worker SIGKILLed mid-fold restarts from its checkpoint and ends with the unkilled run's metrics."""
    base = {"datasets": ["ckplus"], "variants": ["original"], "workers_per_run": 1, "gpus_per_run": 0,
                "cpus_per_run": 0.9, "max_failures": 2}
    cfg = cv_cfg(tiny_cfg, prepared_data, tmp_path / "a", folds=[0, 1, 2], **base)
    cfg = cfg.with_overrides({"train.epochs": 5})
    assert plan_resources(cfg.cv, ray_session.cluster_resources(), 3).max_concurrent == 2
    straight = run_cv(cfg)
    assert len(straight) == 3 and (straight["status"] == "finished").all()

    killed_cfg = cfg.with_overrides({"cv.storage": str(tmp_path / "b"), "cv.folds": [0]})
    ckdir = tmp_path / "b" / cfg.cv.experiment / "checkpoints" / run_key("ckplus", "original", 0, "paper", cfg.hash())
    kills = []

    def killer():
        if _wait_for(lambda: (ckdir / "main.pt").exists() and (ckdir / "worker.pid").exists()):
            pid = int((ckdir / "worker.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    resumed = run_cv(killed_cfg)
    t.join(timeout=1)
    assert kills, "the worker was never killed"
    assert int((ckdir / "worker.pid").read_text()) != kills[0]  # a new worker finished the fold
    row, ref = resumed.iloc[0], straight.set_index("fold").loc[0]
    assert row["status"] == "finished"
    assert row["accuracy"] == ref["accuracy"] and list(map(list, row["confusion"])) == list(map(list, ref["confusion"]))


@pytest.mark.slow
@pytest.mark.ray
def test_experiment_resumes_after_the_driver_dies(tiny_cfg, prepared_data, tmp_path, ray_session):
    from fers_dist.config import dump_config

    cfg = cv_cfg(tiny_cfg, prepared_data, tmp_path, datasets=["ckplus"], variants=["original"],
                 folds=[0, 1, 2, 3], workers_per_run=0, gpus_per_run=0, cpus_per_run=1,
                 experiment="resumable").with_overrides({"train.epochs": 3})
    dump_config(cfg, tmp_path / "cfg.yaml")
    address = ray_session.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, str(ROOT / "jobs/run_cv.py"), "--config", str(tmp_path / "cfg.yaml"),
                               "--address", address], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = folds_uri(str(tmp_path), "resumable")
    try:
        assert _wait_for(lambda: len(read_folds(uri)) >= 1, timeout=300), "no run finished before the kill"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = read_folds(uri)
    assert 1 <= len(before) < 4, "the driver must die mid-experiment for this test to mean anything"
    from fers_dist.cli import main

    assert main(["cv", "--config", str(tmp_path / "cfg.yaml"), "--resume", "resumable"]) == 0
    after = read_folds(uri)
    assert sorted(after["fold"]) == [0, 1, 2, 3] and (after["status"] == "finished").all()
    kept = after.set_index("fold").loc[list(before["fold"]), "finished_at"]
    assert list(kept) == list(before["finished_at"])  # finished runs were not re-run


@pytest.mark.slow
@pytest.mark.ray
def test_data_parallel_run_trains_one_fold_on_two_workers(tiny_cfg, prepared_data, tmp_path, ray_session):
    """workers_per_run=2: two Train workers (a gloo group) share one fold and the driver writes one row."""
    cfg = cv_cfg(tiny_cfg, prepared_data, tmp_path, datasets=["ckplus"], variants=["original"], folds=[0],
                 workers_per_run=2, gpus_per_run=0, cpus_per_run=1)
    with pytest.raises(FersError, match=r"cv.storage and data.root: local paths but cv.workers_per_run=2"):
        run_cv(cfg)  # the ranks must share the checkpoints: only the config can promise a shared filesystem
    cfg = cfg.with_overrides({"cv.shared_filesystem": True})  # one machine: every rank sees the same disk
    frame = run_cv(cfg)
    assert len(frame) == 1 and frame.iloc[0]["status"] == "finished"
    assert frame.iloc[0]["epochs_run"] == cfg.train.epochs
    ckdir = tmp_path / cfg.cv.experiment / "checkpoints" / run_key("ckplus", "original", 0, "paper", cfg.hash())
    pids = {(ckdir / f).read_text() for f in ("worker.pid", "worker1.pid")}
    assert len(pids) == 2 and (ckdir / "main.pt").exists()


def test_seeds_repeat_every_run_and_count_in_the_plan(tiny_cfg, capsys):
    from fers_dist.cli import main
    from fers_dist.cv.cli import plan_runs
    from fers_dist.results import run_key, run_name

    cfg = tiny_cfg.with_overrides({"cv.datasets": ["ckplus"], "cv.variants": ["original"], "cv.folds": [0, 1],
                                   "cv.seeds": [0, 1, 2]})
    runs = plan_runs(cfg)
    assert [(r.fold, r.seed) for r in runs] == [(f, s) for f in (0, 1) for s in (0, 1, 2)]
    assert len({r.config(cfg).hash() for r in runs}) == 3  # train.seed is in the config hash
    assert [run_name("ckplus", "original", 3, "paper", s) for s in (0, 2)] == ["ckplus-original-f3",
                                                                              "ckplus-original-f3-s2"]
    assert run_key("ckplus", "original", 3, "tuned", "abc", 1) == "ckplus-original-f3-s1-tuned-abc"
    assert len(plan_runs(cfg.with_overrides({"cv.seeds": None, "train.seed": 5}))) == 2  # train.seed alone
    assert main(["cv", "--config", str(ROOT / "jobs/configs/paper.yaml"), "--dry-run", "--gpus", "8",
                 "--set", "cv.seeds=[0,1,2]"]) == 0
    assert "360 runs (ckplus x120, oulu x120, mmi x120; variants no_mtl, no_convflu, original, fes_da; " \
           "3 seeds 0, 1, 2 each)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ray
def test_two_seeds_of_one_fold_are_two_rows_and_one_report_group(tiny_cfg, prepared_data, tmp_path, ray_session):
    from fers_dist.report.experiment import groups, load_rows

    cfg = cv_cfg(tiny_cfg, prepared_data, tmp_path, datasets=["ckplus"], variants=["original"], folds=[0, 1],
                 workers_per_run=0, gpus_per_run=0, cpus_per_run=1).with_overrides({"cv.seeds": [0, 1]})
    frame = run_cv(cfg)
    assert len(frame) == 4 and (frame["status"] == "finished").all()
    assert sorted(frame["run_name"]) == ["ckplus-original-f0", "ckplus-original-f0-s1", "ckplus-original-f1",
                                         "ckplus-original-f1-s1"]
    assert frame.groupby("seed")["config_hash"].nunique().to_dict() == {0: 1, 1: 1}
    assert frame["config_hash"].nunique() == 2
    rows = load_rows(Path(cfg.cv.storage) / cfg.cv.experiment)
    (g,) = groups(rows).values()  # the two seeds are one group, not two labels
    assert g.label == "original" and g.n_seeds == 2
    acc = frame.pivot(index="fold", columns="seed", values="accuracy")
    assert g.fold_accuracy == pytest.approx(acc.mean(axis=1).to_dict())  # per fold: the mean over seeds
    assert g.seed_std == pytest.approx(acc.std(axis=1, ddof=1).mean())
    assert f"(seed std {100 * g.seed_std:.2f}, 2 seeds)" in g.cell()
