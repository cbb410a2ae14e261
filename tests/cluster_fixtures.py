"""A cluster on one machine, from real parts, for the tests that are about nodes, placement and storage:

- ``multinode``: Ray's own ``ray.cluster_utils.Cluster``, real raylets as separate nodes: a 1-CPU head
  with no GPU and two 1-CPU worker nodes with one *logical* GPU each (Ray schedules and places by it;
  training runs with ``train.device: cpu``). The session's local Ray is shut down for the module and
  started again afterwards.
- ``s3``: a moto server on 127.0.0.1 and a free port, reached as ``s3://BUCKET/...`` through the
  standard ``AWS_ENDPOINT_URL`` (set before the cluster starts, so every node's workers inherit it).

- ``autoscaling``: Ray's real autoscaler with its ``fake_multinode`` provider, which launches fake nodes as
  local raylets: a CPU-only head and a worker type of 1 CPU + 1 logical GPU, ``min_workers: 0``,
  ``max_workers: 3`` (the recipe and its traps: ../shared/RAY-NOTES.md). Its GCS must sit on 6379; it is
  torn down by killing exactly its own processes (``ray stop --force`` would stop every Ray of the user).
- ``mlflow_server``: a real ``mlflow server`` (sqlite backend, artifacts served from a temporary folder)
  on 127.0.0.1 and a free port.

Everything listens on loopback only and is stopped at the end, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

BUCKET = "fers-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield SimpleNamespace(endpoint=env["AWS_ENDPOINT_URL"], bucket=BUCKET, uri=f"s3://{BUCKET}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def multinode(s3):
    import ray
    from conftest import start_local_ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    try:
        # logical GPUs that say what card they are, as Ray's GPU nodes do (the planner reads its memory from it)
        workers = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1})
                   for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        head = [i for i, n in nodes.items() if not n["Resources"].get("GPU")]
        assert len(nodes) == 3 and len(head) == 1, nodes
        yield SimpleNamespace(cluster=cluster, head_id=head[0], worker_ids=set(nodes) - set(head),
                              workers=workers)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            start_local_ray()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]
    log = open(root / "server.log", "wb")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server on {uri} did not answer within 120 s")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


FAKE_NODE_ID_PREFIX = "f" * 51 + "0"  # the fake provider's node ids: fff...f00000 (head), fff...f00001, ...
FAKE_CONFIG = {
    "cluster_name": "fers-fake", "max_workers": 3, "idle_timeout_minutes": 5, "upscaling_speed": 1.0,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}},
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
    "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}


def kill_processes_matching(*keys: str) -> list[int]:
    """SIGTERM, then SIGKILL, every process whose command line holds one of ``keys``, with its descendants."""
    table = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(d)] = (ppid, cmd)
    hit = {p for p, (_, cmd) in table.items() if p != os.getpid() and any(k in cmd for k in keys)}
    while True:
        more = {p for p, (pp, _) in table.items() if pp in hit} - hit
        if not more:
            break
        hit |= more
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in hit:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    return sorted(hit)


@pytest.fixture
def autoscaling(tmp_path_factory):
    import ray
    import yaml
    from conftest import start_local_ray

    root = Path(tempfile.mkdtemp(prefix="fers-as-"))  # short: Ray's socket paths live under it
    config = tmp_path_factory.mktemp("autoscaler") / "fake.yaml"
    config.write_text(yaml.safe_dump(FAKE_CONFIG))
    # token auth as Ray defaults to: every process, this one included, reads the same ~/.ray/auth_token
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    saved = {k: os.environ.get(k) for k in env}
    had_local = ray.is_initialized()
    ray.shutdown()
    os.environ.update(env)
    try:
        with socket.socket() as s:  # checked once the session's own Ray is down
            if s.connect_ex(("127.0.0.1", 6379)) == 0:
                pytest.skip("port 6379 is taken: the fake_multinode provider needs its GCS there")
        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port=6379",
                        "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                        "--disable-usage-stats", f"--temp-dir={root}", f"--autoscaling-config={config}"],
                       check=True, capture_output=True, timeout=120)
        ray.init(address="127.0.0.1:6379", log_to_driver=False, configure_logging=False)
        yield SimpleNamespace(config=FAKE_CONFIG, address="127.0.0.1:6379")
    finally:
        ray.shutdown()
        kill_processes_matching(str(root), FAKE_NODE_ID_PREFIX)
        if not os.environ.get("FERS_KEEP_RAY_LOGS"):  # set it to read the cluster's logs after a failure
            shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if had_local:
            start_local_ray()
