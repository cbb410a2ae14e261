"""fers_dist.cpustat: per-role CPU accounting for the benchmarks (Linux /proc)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fers_dist.cpustat import CPUAccount, available, role

pytestmark = pytest.mark.skipif(not available(), reason="reads /proc (Linux only)")


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_roles_follow_ray_process_names():
    assert role(10, "anything", driver=10) == "driver"
    assert role(11, "ray::MapWorker(MapBatches(AlignBatch))", driver=10) == "map_workers"
    assert role(12, "ray::MapBatches(fn)", driver=10) == "map_workers"
    assert role(13, "ray::_StatsActor", driver=10) == "ray_data_internal"
    assert role(14, "ray::_AutoscalingCoordinatorActor", driver=10) == "ray_data_internal"
    assert role(15, "ray::IDLE", driver=10) == "ray_workers_other"
    assert role(15, "python /v/site-packages/ray/_private/workers/default_worker.py", driver=10) == "ray_workers_other"
    assert role(16, "/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x", driver=10) == "ray_system"
    assert role(17, "/usr/bin/python train.py", driver=10) == "other"


def test_driver_and_other_processes_are_accounted():
    child = [sys.executable, "-c", ("import time\nend = time.process_time() + 0.6\n"
                                    "while time.process_time() < end: pass")]
    with CPUAccount(interval=0.05) as acc:
        proc = subprocess.Popen(child)
        _spin(0.5)
        proc.wait()
        time.sleep(0.1)  # exited children keep no /proc entry: the last sample before exit counts
    cpu = acc.summary()
    assert cpu["driver"] >= 0.45
    assert cpu["other"] >= 0.3  # the child, sampled every 0.05 s while it ran
    assert cpu["machine_busy"] >= 0.9 * (cpu["driver"] + cpu["other"])
