"""Shared fixtures. Ray is started once per test session (2 CPUs, no dashboard), and only when a
test asks for it, so the Ray-free core's tests never pay for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEPT_CLUSTER_CONFIG_UPDATE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=150 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_cfg():
    """The tiny demo config (jobs/configs/demo.yaml) as a Config object."""
    from pathlib import Path

    from fers_dist.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml")
