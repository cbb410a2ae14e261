"""Shared fixtures. Ray is started once per test session (2 CPUs, no dashboard), and only when a
test asks for it, so the Ray-free core's tests never pay for it."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["cluster_fixtures"]  # the multi-node Ray cluster and the loopback S3 server

os.environ.setdefault("RAY_ACCEPT_CLUSTER_CONFIG_UPDATE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Train V2's controller polls its workers every 2 s, so each real-worker run waits on it as it starts and ends:
# an empty 1-worker TorchTrainer took 14-15 s here, 9-11 s at 0.25 s (Ray's processes inherit this at start)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# every `device: auto` (demo.yaml, Ray runs) means the CPU, so the suite asserts the same bit-identical resumes
# on a GPU machine as here; set FERS_DEVICE= (empty) to let `auto` pick CUDA again
os.environ.setdefault("FERS_DEVICE", "cpu")
# read when ray is imported: clients keep 127.0.0.1 instead of the machine's address (tests stay on loopback)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# pytest-xdist (pyproject's addopts: -n 2 --dist loadgroup): the suite runs on two worker processes, one
# group of tests at a time each. The modules that start their own Ray clusters share one group, so they run
# one after another on one worker: the autoscaler's fake cluster needs port 6379, and a restarted session Ray
# must not meet another module's nodes.
CLUSTER_MODULES = {"test_cluster", "test_elastic", "test_local_cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Every test file is one xdist group (its module fixtures are built once, on one worker); the cluster
    modules are one group together."""
    for item in items:
        stem = item.path.stem
        item.add_marker(pytest.mark.xdist_group("clusters" if stem in CLUSTER_MODULES else stem))


def start_local_ray():
    """The session's local Ray: 2 CPUs, no dashboard (cluster_fixtures.py restarts it after a cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=150 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_cfg():
    """The tiny demo config (jobs/configs/demo.yaml) as a Config object."""
    from pathlib import Path

    from fers_dist.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml")


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, ray_session):
    """Synthetic CK+ and Oulu-CASIA faces (12 subjects each), prepared by the real Ray Data pipeline
    at 40x40 with the `landmarks` aligner: <root>/<dataset>/faces.parquet, 10 folds."""
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize

    base = tmp_path_factory.mktemp("prepared")
    for layout in ("ckplus", "oulu"):
        synthesize(layout, base / "raw" / layout, subjects=12, seed=0, size=160, progress=False)
        prepare(layout, base / "raw" / layout, base / "data", aligner="landmarks", size=40, log=lambda *a: None)
    return base / "data"


@pytest.fixture(scope="session")
def tiny_cfg(demo_cfg):
    """The demo model at 2 epochs, no identity network: the fastest honest full-objective run."""
    return demo_cfg.with_overrides({"train.epochs": 2, "train.checkpoint_every": 1,
                                    "identity.backbone": "none", "train.fes_da_epochs": 1})
