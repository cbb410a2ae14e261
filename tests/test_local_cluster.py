"""A real Ray cluster on this machine: `ray start --head` on loopback, a tiny `jobs/run_cv.py` submitted
through the Jobs API (fers_dist.submit), SUCCEEDED, rows in folds.parquet, cluster stopped.

The head runs with `--block` in its own process group, so stopping it kills only this cluster's
processes (`ray stop` would also kill the test session's own Ray). Cleanup runs even on failure.
Ray 2.60 turns token authentication on for local clusters; the head gets a fresh token of its own
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), which the client sends as `fers submit` would.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
PORT_FLAGS = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
              "--metrics-export-port", "--ray-client-server-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the head's process group (raylet, GCS, workers), then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # the head process is gone; take any straggler of its group with it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def local_cluster(monkeypatch):
    """A 2-CPU Ray head bound to 127.0.0.1 (dashboard included, loopback only), in a temp dir."""
    from fers_dist.errors import FersError
    from fers_dist.submit import auth_headers, check_cluster

    temp = Path(tempfile.mkdtemp(prefix="fers-ray-", dir="/tmp"))  # short: Ray's socket paths
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--num-gpus", "0", "--temp-dir", str(temp), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
           "--object-store-memory", str(150 * 1024 * 1024)]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    # the test session's own Ray also runs here: name this cluster's API server for its State API calls
    # (Train's placement-group cleaner), which otherwise find two GCS processes and give up
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_API_SERVER_ADDRESS=address)
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(temp / "head.log", "wb")  # noqa: SIM115  (closed in the finally below, once the head is stopped)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {(temp / 'head.log').read_text()[-2000:]}")
            try:
                check_cluster(address, auth_headers())
                break
            except FersError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard at {address} did not answer within 120 s")
                time.sleep(1.0)
        yield {"address": address, "temp": temp, "ports": ports}
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def listening_hosts(port: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, check=False, text=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
def test_submitted_cv_job_succeeds_and_writes_folds(local_cluster, prepared_data, tiny_cfg, tmp_path):
    import pandas as pd

    from fers_dist.config import dump_config
    from fers_dist.submit import make_client, submit_job, wait_for_job

    if shutil.which("ss"):  # the dashboard (jobs API) answers on loopback only
        assert listening_hosts(local_cluster["ports"]["--dashboard-port"]) <= {"127.0.0.1"}
    config = tmp_path / "tiny.yaml"
    dump_config(tiny_cfg, config)
    storage = tmp_path / "results"
    entrypoint = [sys.executable, "jobs/run_cv.py", "--config", str(config), "--datasets", "ckplus",
                  "--variants", "original", "--folds", "0,1", "--storage", str(storage),
                  "--data-root", str(prepared_data), "--experiment", "cluster", "--workers-per-run", "1",
                  "--cpus-per-run", "0.5"]  # the entrypoint holds 1 of the 2 CPUs (fers submit's default)
    address = local_cluster["address"]
    job_id = submit_job(entrypoint, address=address, working_dir=ROOT)
    client = make_client(address)
    try:
        status = wait_for_job(client, job_id, timeout=600)
        logs = client.get_job_logs(job_id)
        assert str(status).endswith("SUCCEEDED"), f"job {job_id} ended {status}:\n{logs[-3000:]}"
    finally:
        if not client.get_job_status(job_id).is_terminal():
            client.stop_job(job_id)
    rows = pd.read_parquet(storage / "cluster" / "folds.parquet")
    finished = rows[rows["status"] == "finished"]
    assert sorted(finished["fold"].tolist()) == [0, 1] and set(finished["variant"]) == {"original"}
    assert finished["accuracy"].between(0, 1).all() and (finished["epochs_run"] == 2).all()
