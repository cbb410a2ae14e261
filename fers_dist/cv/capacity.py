"""What the cluster can GROW to, not only what is free now: the autoscaler's ceiling, asking it for nodes,
waiting for the first ones, and where fold-run drivers go.

- **Ceiling.** Train V2 reads the most a cluster can hold from the cluster config Ray keeps in the GCS
  (``ray._private.state.state.get_max_resources_from_cluster_config``); that is read first. Open-source
  Ray 2.60's autoscalers do not fill it in (only a hosted control plane does), so the second source is the
  file the autoscaler itself runs with: ``monitor.py --autoscaling-config=FILE`` on the head node (what
  ``ray up`` writes as ``~/ray_bootstrap_config.yaml``), read from ``/proc`` there. KubeRay's autoscaler
  reads the RayCluster object instead, which a Ray job cannot see: set ``cv.max_gpus`` (``--max-gpus``)
  there. ``cv.max_gpus`` overrides the GPU ceiling wherever it is set.
- **Planning.** Concurrency is planned against ``free now + (ceiling - total now)``; Tune queues the runs and
  :func:`scaled` asks the autoscaler for them at once (``ray.autoscaler.sdk.request_resources``), waits,
  with a visible line, until the first run fits (``cv.resource_timeout_s``), and withdraws the request when
  the block ends. Without a ceiling (a fixed cluster, the embedded local Ray) nothing changes.
- **Drivers.** Fold-run drivers (Tune trials of worker-mode runs, and with them the Train controller, which
  Train V2 pins to its driver's node) ask for a sliver of ``cv.driver_resource`` when some node type
  advertises it (the head, or on-demand nodes), so a preempted spot node takes only Train workers with it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fers_dist.config import CVConfig
from fers_dist.errors import FersError

DRIVER_SHARE = 0.01  # of cv.driver_resource per driver: a head advertising 1000 hosts 100000 drivers
KEYS = ("CPU", "GPU")


@dataclass(frozen=True)
class Capacity:
    plan: dict  # CPU/GPU to plan concurrency against: free now, plus what the autoscaler can still add
    total: dict  # what the cluster has now
    ceiling: dict | None = None  # the most it can have (None: fixed size, or unknown)
    source: str = "free now (no autoscaler ceiling found)"
    node_types: list[dict] = field(default_factory=list)  # resources of each node type that may join

    @property
    def elastic(self) -> bool:
        return bool(self.ceiling) and any(self.ceiling.get(k, 0) > self.total.get(k, 0) for k in KEYS)


def ceiling_from_launcher(config: dict) -> tuple[dict, list[dict]]:
    """The most of each resource a launcher config's cluster can hold: the head once, then each worker type's
    ``max_workers``, GPU-richest first, within the cluster's ``max_workers``; and every type's resources."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    out = {k: float(v) for k, v in (types.get(head, {}).get("resources") or {}).items()}
    budget = config.get("max_workers", math.inf)
    workers = sorted((t for name, t in types.items() if name != head),
                     key=lambda t: -float((t.get("resources") or {}).get("GPU", 0)))
    for t in workers:
        n = min(int(t.get("max_workers", 0)), budget)
        budget -= n
        for k, v in (t.get("resources") or {}).items():
            out[k] = out.get(k, 0.0) + n * float(v)
    return out, [dict(t.get("resources") or {}) for t in types.values()]


def _monitor_config_path(gcs: str) -> str | None:
    """``--autoscaling-config`` of the autoscaler process of the cluster at ``gcs``, read from /proc (Linux)."""
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if any(a.endswith("monitor.py") and "autoscaler" in a for a in args) and f"--gcs-address={gcs}" in args:
            for a in args:
                if a.startswith("--autoscaling-config="):
                    return os.path.expanduser(a.split("=", 1)[1])
    return None


def _read_head_config(gcs: str) -> dict | None:
    import yaml

    path = _monitor_config_path(gcs)
    if not path:
        return None
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def autoscaler_ceiling() -> tuple[dict | None, list[dict], str]:
    """(ceiling, node types, where it came from); (None, [], why) when the cluster has no autoscaler config."""
    import ray
    from ray._private.state import state

    try:
        kept = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001  (an older GCS without the key: fall through to the head's file)
        kept = None
    if kept:
        return {k: float(v) for k, v in kept.items()}, [], "the cluster config Ray keeps in the GCS"
    gcs = ray.get_runtime_context().gcs_address
    head = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    if head and head[0] == ray.get_runtime_context().get_node_id():
        config = _read_head_config(gcs)
    elif head:
        reader = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_read_head_config)
        config = ray.get(reader.remote(gcs), timeout=60)
    else:
        config = None
    if not config:
        return None, [], "no autoscaler config"
    ceiling, types = ceiling_from_launcher(config)
    return ceiling, types, "the autoscaler's cluster config on the head"


def plan_capacity(cv: CVConfig, free: dict) -> Capacity:
    """What to plan concurrency against (``free`` is :func:`resources.free_resources`)."""
    import ray

    total = {k: float(ray.cluster_resources().get(k, 0)) for k in KEYS}
    ceiling, types, source = autoscaler_ceiling()
    if cv.max_gpus is not None:
        ceiling = {**(ceiling or total), "GPU": float(cv.max_gpus)}
        source = f"cv.max_gpus={cv.max_gpus:g}" + (f" (CPUs: {source})" if types else "")
    if not ceiling:
        return Capacity(plan=dict(free), total=total)
    plan = {k: float(free.get(k, 0)) + max(0.0, float(ceiling.get(k, 0)) - total[k]) for k in KEYS}
    return Capacity(plan=plan, total=total, ceiling=ceiling, source=source, node_types=types)


def describe(cap: Capacity) -> str:
    if not cap.ceiling:
        return cap.source
    return (f"the cluster can grow to {cap.ceiling.get('GPU', 0):g} GPUs / {cap.ceiling.get('CPU', 0):g} CPUs "
            f"({cap.source}); it has {cap.total['GPU']:g} / {cap.total['CPU']:g} now")


def _nodes_for(gpus: float, types: list[dict]) -> int:
    per = max((float(t.get("GPU", 0)) for t in types), default=0.0)
    return math.ceil(gpus / per - 1e-9) if per else math.ceil(gpus - 1e-9)


@contextmanager
def scaled(cap: Capacity, bundles: list[dict], timeout_s: float, what: str, log=None) -> Iterator[None]:
    """Ask the autoscaler for ``bundles`` (the runs that will run at once), wait until the first one fits
    on the cluster, run the block, then withdraw the request. Does nothing on a cluster that cannot grow."""
    if not cap.elastic or not bundles:
        yield
        return
    import ray
    from ray.autoscaler.sdk import request_resources

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    bundles = [{k: v for k, v in b.items() if v} for b in bundles]
    first = bundles[0]
    need = sum(b.get("GPU", 0) for b in bundles)
    request_resources(bundles=bundles)
    try:
        deadline, said = time.monotonic() + timeout_s, 0.0
        while True:
            have = {k: float(ray.cluster_resources().get(k, 0)) for k in KEYS}
            if all(have[k] >= first.get(k, 0) for k in KEYS):
                break
            if time.monotonic() > deadline:
                raise FersError(
                    f"cv.resource_timeout_s={timeout_s:g}: {what} asked the autoscaler for {need:g} GPUs "
                    f"({_nodes_for(need, cap.node_types)} GPU nodes), but after {timeout_s:g} s the cluster offers "
                    f"{have['GPU']:g} GPUs / {have['CPU']:g} CPUs (its ceiling: {cap.ceiling.get('GPU', 0):g} "
                    f"GPUs, from {cap.source})")
            if time.monotonic() - said >= 30:
                left = max(0.0, need - have["GPU"])
                log(f"fers: waiting for {_nodes_for(left, cap.node_types)} GPU nodes ({have['GPU']:g} of {need:g} "
                    f"GPUs up; the autoscaler is asked for them; cv.resource_timeout_s={timeout_s:g})")
                said = time.monotonic()
            time.sleep(1.0)
        yield
    finally:
        request_resources(bundles=[])  # the autoscaler may scale the nodes down again once idle


def driver_resources(cv: CVConfig, cap: Capacity, nodes: list[dict], log=None) -> dict:
    """The custom resource a worker-mode run's driver asks for, when some node (or node type) offers it;
    else {} and a one-line note on a cluster of more than one node."""
    name = cv.driver_resource
    if not name:
        return {}
    if any(name in n for n in [*nodes, *cap.node_types]) or (cap.ceiling or {}).get(name):
        return {name: DRIVER_SHARE}
    if len(nodes) > 1 or cap.elastic:
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"fers: no node offers cv.driver_resource={name!r}: fold-run drivers may sit on any node, and a "
            f"run whose driver's node is lost restarts through a Tune retry (cluster/README.md, 'Node loss')")
    return {}
