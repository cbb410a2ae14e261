"""Elastic and preemption-proof (issue 17), on clusters from real parts (cluster_fixtures.py):

- scale-out: Ray's real autoscaler (fake_multinode provider) starts with a CPU-only head; `fers cv` plans
  against the autoscaler's ceiling, not the empty cluster, and the autoscaler launches the GPU nodes;
- node loss: `ray.cluster_utils.Cluster` with the driver resource on the head; the worker node holding a
  run is removed after the run's first checkpoint, and the run resumes on another node.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from fers_dist.cv.capacity import Capacity, ceiling_from_launcher, driver_resources, scaled
from fers_dist.cv.cli import run_cv
from fers_dist.errors import FersError
from fers_dist.results import run_key


def _cfg(tiny_cfg, data, storage, **cv):
    return tiny_cfg.with_overrides({"data.root": str(data), "cv.storage": str(storage), "cv.datasets": ["ckplus"],
                                    "cv.variants": ["original"], "cv.shared_filesystem": True,
                                    "train.device": "cpu", **{f"cv.{k}": v for k, v in cv.items()}})


class PeakNodes:
    """The most alive nodes ``ray.nodes()`` showed, polled in the background."""

    def __init__(self, every: float = 0.5):
        import ray

        self.peak, self.first_gpu_s, self.t0, self._stop = 0, None, time.monotonic(), threading.Event()

        def poll():
            while not self._stop.is_set():
                alive = [n for n in ray.nodes() if n.get("Alive")]
                self.peak = max(self.peak, len(alive))
                if self.first_gpu_s is None and any(n["Resources"].get("GPU") for n in alive):
                    self.first_gpu_s = time.monotonic() - self.t0
                self._stop.wait(every)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(timeout=10)
        return self.peak


@pytest.mark.slow
@pytest.mark.ray
def test_cv_scales_out_on_a_real_autoscaler(autoscaling, tiny_cfg, prepared_data, tmp_path, capfd):
    """6 runs at gpus_per_run 1 on a cluster that starts with no GPU at all: `fers cv` plans 3 at once from
    the autoscaler's config (no cv.max_gpus), waits visibly for the first GPU node, and the autoscaler
    launches more than one worker node; every run finishes."""
    cfg = _cfg(tiny_cfg, prepared_data, tmp_path, experiment="elastic", folds=list(range(6)), workers_per_run=0,
               gpus_per_run=1, cpus_per_run=1, max_failures=1).with_overrides({"train.epochs": 1})
    assert cfg.cv.max_gpus is None
    peak, t0 = PeakNodes(), time.monotonic()
    frame = run_cv(cfg)
    wall, nodes = time.monotonic() - t0, peak.stop()
    err = capfd.readouterr().err
    print(f"autoscaling: peak {nodes} nodes (head + {nodes - 1} workers), first GPU node after "
          f"{peak.first_gpu_s:.0f} s, {len(frame)} runs in {wall:.0f} s")
    assert "3 run(s) at once" in err and "the autoscaler's cluster config on the head" in err, err[-2000:]
    assert "waiting for 3 GPU nodes" in err, err[-2000:]
    assert len(frame) == 6 and (frame["status"] == "finished").all(), frame[["run_name", "status", "error"]]
    assert nodes - 1 > 1, f"the autoscaler launched only {nodes - 1} worker node(s)"
    assert frame["node_id"].nunique() > 1


@pytest.fixture
def spot_cluster(s3):
    """A head that is never preempted (it advertises `fers_driver`) and two spot-like GPU nodes. (A node
    cannot be added from another thread, so no replacement joins after the loss.)"""
    import ray
    from conftest import start_local_ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                            "resources": {"fers_driver": 1000}})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            start_local_ray()


@pytest.mark.slow
@pytest.mark.ray
def test_a_lost_node_costs_its_runs_only_a_resume(spot_cluster, tiny_cfg, prepared_data, tmp_path):
    """3 worker-mode runs, drivers on the head (fers_driver). The node holding one run is removed after that
    run's first checkpoint; its runs restart on the surviving node: every run finishes, the lost run
    resumed from its checkpoint (epoch > 0 in its history), folds.parquet has one finished row per run, and
    the lost run's result equals an unkilled run's."""
    from fers_dist.train.fold import fit_fold

    cfg = _cfg(tiny_cfg, prepared_data, tmp_path, experiment="spot", folds=[0, 1, 2], workers_per_run=1,
               gpus_per_run=0.5, cpus_per_run=0.5, max_failures=2).with_overrides({"train.epochs": 4})
    homes = {f: tmp_path / "spot" / "checkpoints" / run_key("ckplus", "original", f, "paper", cfg.hash())
             for f in (0, 1, 2)}
    lost, cv_done = {}, threading.Event()

    def remove_a_node():
        while not cv_done.is_set():
            for fold, home in homes.items():
                if (home / "main.pt").exists() and (home / "worker.node").exists():
                    node_id = (home / "worker.node").read_text()
                    node = [n for n in spot_cluster.worker_nodes if n.node_id == node_id]
                    if node:
                        lost.update(fold=fold, node=node_id, t=time.monotonic())
                        spot_cluster.remove_node(node[0])
                        return
            cv_done.wait(0.2)

    killer = threading.Thread(target=remove_a_node, daemon=True)
    t0 = time.monotonic()
    killer.start()
    try:
        frame = run_cv(cfg)
    finally:
        cv_done.set()
    wall = time.monotonic() - t0
    killer.join(timeout=5)
    assert lost, "no run reached its first checkpoint"
    assert len(frame) == 3 and (frame["status"] == "finished").all(), frame[["run_name", "status", "error"]]
    assert sorted(frame["fold"]) == [0, 1, 2]  # exactly one row per run
    row = frame.set_index("fold").loc[lost["fold"]]
    assert row["node_id"] != lost["node"]
    resumed = [h["resumed_from"] for h in json.loads(row["history"]) if "resumed_from" in h]
    assert resumed and resumed[0] > 0, resumed
    assert [h["epoch"] for h in json.loads(row["history"])] == list(range(4))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Train worker (1 CPU)
    try:
        ref = fit_fold(cfg.with_overrides({"model.variant": "original"}), prepared_data / "ckplus", lost["fold"],
                       device="cpu", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert row["accuracy"] == pytest.approx(ref.accuracy, abs=1e-9)
    assert [list(r) for r in row["confusion"]] == ref.confusion
    last = json.loads(row["history"])[-1]
    assert last["loss"] == pytest.approx(ref.history[-1]["loss"], rel=1e-5)
    done = frame.set_index("fold")["finished_at"].map(lambda t: time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")))
    later = done[lost["fold"]] - done.drop(lost["fold"]).max()
    print(f"node loss: fold {lost['fold']} lost its node {lost['t'] - t0:.0f} s in, resumed at epoch {resumed[0]}, "
          f"finished {later:+.0f} s after the last unkilled run; CV wall {wall:.0f} s")


# -- the pieces, without a cluster -------------------------------------------------------------------
def test_ceiling_from_the_shipped_launcher_configs():
    """aws.yaml: 8 single-GPU nodes + one 8-GPU node within max_workers 9 -> 16 GPUs; a smaller global
    max_workers is filled GPU-richest first."""
    from pathlib import Path

    import yaml

    aws = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml").read_text())
    ceiling, types = ceiling_from_launcher(aws)
    assert ceiling["GPU"] == 16 and ceiling["CPU"] == 8 + 8 * 16 + 96 and ceiling["fers_driver"] > 0
    assert {t.get("GPU", 0) for t in types} == {0, 1, 8}
    assert ceiling_from_launcher({**aws, "max_workers": 2})[0]["GPU"] == 8 + 1


def test_driver_resource_is_asked_for_only_where_a_node_offers_it(capsys):
    from fers_dist.config import CVConfig

    cv = CVConfig()
    fixed = Capacity(plan={"CPU": 2}, total={"CPU": 2})
    assert driver_resources(cv, fixed, [{"CPU": 1, "fers_driver": 1000}]) == {"fers_driver": 0.01}
    notes = []
    assert driver_resources(cv, fixed, [{"CPU": 1}, {"CPU": 1, "GPU": 1}], notes.append) == {}
    assert len(notes) == 1 and "cv.driver_resource='fers_driver'" in notes[0]
    assert driver_resources(cv, fixed, [{"CPU": 2}], notes.append) == {} and len(notes) == 1  # one node: no note
    assert driver_resources(CVConfig(driver_resource=""), fixed, [{"fers_driver": 1}]) == {}


@pytest.mark.ray
def test_waiting_for_gpu_nodes_times_out_in_one_line(ray_session):
    """The session's Ray has no GPU; told it can grow to 2 (cv.max_gpus), `scaled` asks, waits and gives up
    after cv.resource_timeout_s with what was asked for and what the cluster offers."""
    from fers_dist.config import CVConfig
    from fers_dist.cv.capacity import plan_capacity

    cap = plan_capacity(CVConfig(max_gpus=2), {"CPU": 2.0, "GPU": 0.0})
    assert cap.elastic and cap.plan["GPU"] == 2 and cap.source.startswith("cv.max_gpus=2")
    lines = []
    asked = r"^cv.resource_timeout_s=1: 2 runs asked the autoscaler for 2 GPUs \(2 GPU nodes\), but after 1 s"
    with (pytest.raises(FersError, match=asked + r" the cluster offers 0 GPUs / 2 CPUs"),
          scaled(cap, [{"CPU": 1, "GPU": 1}] * 2, 1, "2 runs", lines.append)):
        pytest.fail("the block ran without a GPU")
    assert lines == [("fers: waiting for 2 GPU nodes (0 of 2 GPUs up; the autoscaler is asked for them; "
                      "cv.resource_timeout_s=1)")]


def test_dry_run_packs_as_ray_does_waits_for_the_barrier_and_for_nodes():
    from fers_dist.cv.plan import simulate

    # 4 runs at 0.25 GPU on 8 GPUs: Ray puts all four on card 0, which they share -> 4x one run's time
    assert simulate([(1.0, False)] * 4, 0.25, [(0.0, 8)]) == (pytest.approx(4.0), 4)
    # fes_da waits for its original (the barrier), even with a GPU free
    assert simulate([(1.0, False), (0.5, True)], 1, [(0.0, 2)])[0] == pytest.approx(1.5)
    # a cluster starting at min_workers (1 GPU) that reaches 4 after half an hour
    assert simulate([(1.0, False)] * 4, 1, [(0.0, 1), (0.5, 4)]) == (pytest.approx(1.5), 4)
    with pytest.raises(FersError, match="no GPUs"):
        simulate([(1.0, False)], 1, [(0.0, 0)])


def test_dry_run_plans_for_a_launcher_config(capsys):
    from pathlib import Path

    from fers_dist.cli import main

    root = Path(__file__).resolve().parents[1]
    assert main(["cv", "--config", str(root / "jobs/configs/paper.yaml"), "--dry-run", "--cluster",
                 str(root / "cluster/aws.yaml"), "--node-start-min", "10"]) == 0
    out = capsys.readouterr().out
    assert "16 GPU(s) (aws.yaml: 1 at start): up to 32 runs at once (2 per GPU)" in out
    assert "new nodes join 10 min after fers cv asks for them" in out and "fes_da starts only after" in out
