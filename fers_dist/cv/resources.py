"""How fold runs are packed onto a cluster, so that nested Train-in-Tune runs can never deadlock.

Each fold run is a Tune trial (the "driver") that starts a Ray Train run of ``workers_per_run`` workers.
The driver holds almost no CPU; the workers hold ``cpus_per_run`` / ``gpus_per_run`` (split evenly across
workers; fractional GPUs pack several folds on one card). Tune's concurrency is capped by what whole runs
(driver + workers) need, so every started driver can always get its workers. With ``workers_per_run=0``
(Train's local mode) the trial itself holds the run's resources and trains in-process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fers_dist.config import CVConfig
from fers_dist.errors import FersError

DRIVER_CPU = 0.01  # a Tune trial that only waits on its Train run; Tune rejects 0


@dataclass(frozen=True)
class RunResources:
    trial: dict  # resources of the Tune trial (driver)
    workers: int  # Ray Train workers (0 = local mode, in the trial)
    worker: dict  # resources per Train worker
    max_concurrent: int  # whole runs that fit on the cluster at once

    @property
    def use_gpu(self) -> bool:
        return self.worker.get("GPU", 0) > 0 or self.trial.get("gpu", 0) > 0


@contextmanager
def ray_session(address: str | None = None, *, quiet: bool = False) -> Iterator[None]:
    """Ray for a block (:func:`fers_dist.data.prepare.start_ray`), shut down afterwards if the block
    started it."""
    from fers_dist.data.prepare import start_ray

    ray, started = start_ray(address, quiet=quiet)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def free_resources(settle_s: float = 5.0) -> dict:
    """CPUs and GPUs this driver can still get: the cluster's totals less what is held. A job submitted
    with ``fers submit`` holds ``--num-cpus`` (default 1) for its own entrypoint, and other jobs may hold
    more; planning on the totals would start runs whose Train workers can never be placed. Actors that
    just finished (Ray Data's pool after ``fers prepare``) release their CPUs a moment later, so this waits
    up to ``settle_s`` for the free count to reach the totals and keeps the largest count it saw."""
    import time

    import ray

    total = ray.cluster_resources()
    best = {"CPU": 0.0, "GPU": 0.0}
    deadline = time.monotonic() + settle_s
    while True:
        free = ray.available_resources()
        for k, seen in best.items():
            best[k] = max(seen, min(float(total.get(k, 0)), float(free.get(k, 0))))
        if all(best[k] >= float(total.get(k, 0)) for k in best) or time.monotonic() > deadline:
            return best
        time.sleep(0.25)


def plan_resources(cv: CVConfig, cluster: dict, n_runs: int | None = None) -> RunResources:
    """Resources per run and the concurrency cap for ``cluster`` (``free_resources()``)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if cv.gpus_per_run > 0 and gpus == 0:
        raise FersError(f"cv.gpus_per_run={cv.gpus_per_run} but the cluster has no GPUs "
                        f"(it has {cpus:g} CPUs, 0 GPUs); set cv.gpus_per_run: 0 to train on CPUs")
    if cv.gpus_per_run > gpus > 0 and cv.workers_per_run <= 1:
        raise FersError(f"cv.gpus_per_run={cv.gpus_per_run} exceeds the cluster's {gpus:g} GPUs")
    w = cv.workers_per_run
    if w == 0:
        trial = {"cpu": cv.cpus_per_run, "gpu": cv.gpus_per_run}
        worker: dict = {}
        run_cpu = cv.cpus_per_run
    else:
        trial = {"cpu": DRIVER_CPU, "gpu": 0}
        worker = {"CPU": cv.cpus_per_run / w}
        if cv.gpus_per_run:
            worker["GPU"] = cv.gpus_per_run / w
            if w > 1 and cv.gpus_per_run % w:  # NCCL refuses two ranks of one group on one device
                raise FersError(f"cv.gpus_per_run={cv.gpus_per_run:g} over cv.workers_per_run={w}: a data-parallel "
                                f"run needs whole GPUs per worker (use gpus_per_run = a multiple of {w})")
        run_cpu = DRIVER_CPU + cv.cpus_per_run
    if run_cpu > cpus:
        raise FersError(f"cv.cpus_per_run={cv.cpus_per_run} (+{trial['cpu']} for the driver) exceeds the "
                        f"{cpus:g} CPUs free on the cluster (a submitted job's entrypoint holds its --num-cpus)")
    fit = math.floor(cpus / run_cpu + 1e-9)
    if cv.gpus_per_run:
        fit = min(fit, math.floor(gpus / cv.gpus_per_run + 1e-9))
    fit = max(1, fit)
    return RunResources(trial=trial, workers=w, worker=worker,
                        max_concurrent=min(fit, n_runs) if n_runs else fit)


def run_bundles(res: RunResources) -> list[dict]:
    """What one run asks the autoscaler for: its Train workers' bundles (its driver is a sliver of a node that
    is already up), or, in local mode, the trial's own."""
    if not res.workers:
        return [{k: v for k, v in (("CPU", res.trial["cpu"]), ("GPU", res.trial.get("gpu", 0))) if v}]
    return [dict(res.worker) for _ in range(res.workers)]


def alive_nodes() -> list[dict]:
    """Each alive node's resources (``CPU``, ``GPU``, …)."""
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def check_fits_one_node(cv: CVConfig, nodes: list[dict]) -> None:
    """A data-parallel run's workers are placed STRICT_PACK (one node): a run larger than every node would
    wait forever, so it is refused here."""
    if cv.workers_per_run <= 1 or not nodes:
        return
    cpus, gpus = max(float(n.get("CPU", 0)) for n in nodes), max(float(n.get("GPU", 0)) for n in nodes)
    if cv.gpus_per_run > gpus or cv.cpus_per_run > cpus:
        raise FersError(f"cv.workers_per_run={cv.workers_per_run}: a data-parallel run's workers share one node, "
                        f"but the run asks for {cv.gpus_per_run:g} GPUs / {cv.cpus_per_run:g} CPUs and the "
                        f"largest node has {gpus:g} GPUs / {cpus:g} CPUs")


def check_device(cfg) -> None:
    if cfg.train.device.startswith("cuda:"):
        raise FersError(f"train.device: {cfg.train.device!r} is not allowed under Ray, which assigns the GPU; "
                        f"use auto, cuda or cpu")


def check_placeable(cfg, nodes: int) -> None:
    """Before any run starts: what a cluster of ``nodes`` nodes cannot run as configured.

    Local paths (``cv.storage``, ``data.root``) are read and written by whichever node runs a fold, and
    a data-parallel run's ranks must see the same checkpoints: with more than one node, or with
    ``workers_per_run > 1``, they must be a filesystem mounted everywhere at the same path, which only
    the config can promise (``cv.shared_filesystem: true``). ``train.device: cuda:N`` is Ray's choice."""
    from fers_dist.storage import is_uri

    check_device(cfg)
    if is_uri(cfg.data.root):
        raise FersError(f"data.root: {cfg.data.root!r}: prepared data is read from a filesystem path (local, or "
                        f"NFS on a cluster); only cv.storage may be an object store")
    why = (f"the cluster has {nodes} nodes" if nodes > 1 else
           f"cv.workers_per_run={cfg.cv.workers_per_run}" if cfg.cv.workers_per_run > 1 else "")
    local = [k for k, v in (("cv.storage", cfg.cv.storage), ("data.root", cfg.data.root)) if not is_uri(v)]
    if why and local and not cfg.cv.shared_filesystem:
        fix = ("put cv.storage on s3:// or gs://, and " if "cv.storage" in local else "") + (
            f"set cv.shared_filesystem: true (--shared-filesystem) once {' and '.join(local)} holds the same "
            f"files on every node (an NFS mount, or a per-node copy of the read-only data)")
        raise FersError(f"{' and '.join(local)}: local path{'s' if len(local) > 1 else ''} but {why}; {fix}")


def describe(res: RunResources, cluster: dict) -> str:
    per = (f"{res.workers} worker(s) x {res.worker}" if res.workers
           else f"local mode in the trial, {res.trial}")
    return (f"{res.max_concurrent} run(s) at once on {cluster.get('CPU', 0):g} free CPUs / "
            f"{cluster.get('GPU', 0):g} free GPUs; each run: {per}")


# -- memory per run ------------------------------------------------------------------------------------
GPU_MEMORY_GB = {"H200": 141, "H100": 80, "GH200": 96, "A100-80G": 80, "A100": 40, "L40S": 48, "L40": 48,
                 "L4": 24, "A10G": 24, "A10": 24, "V100": 16, "T4": 16}  # Ray's accelerator_type names


def gpu_memory_gb(cv: CVConfig, nodes: list[dict]) -> tuple[float | None, str]:
    """Memory of one GPU: ``cv.gpu_memory_gb``, else from the nodes' ``accelerator_type:*`` resources
    (the smallest card, if the types differ); None when unknown."""
    if cv.gpu_memory_gb:
        return cv.gpu_memory_gb, "cv.gpu_memory_gb"
    types = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
    if types and all(t in GPU_MEMORY_GB for t in types):
        return min(GPU_MEMORY_GB[t] for t in types), f"accelerator type {'/'.join(types)}"
    return None, f"accelerator type {'/'.join(types) or 'not reported'}"


def max_batch(cfg) -> int:
    """The largest batch a run (or a tuning trial: the search space's ``train.batch_size``) can use."""
    p = cfg.tune.space.get("train.batch_size")
    if p is None:
        return cfg.train.batch_size
    return int(max(p.choices) if p.type == "categorical" else p.high)


def check_gpu_memory(cfg, nodes: list[dict], share: float, batch: int, key: str, log=print,
                     tuning: bool = False) -> None:
    """Refuse, in one line, runs whose estimated peak memory (``train/memory.py``) exceeds their GPU share
    (``share`` of one card, at ``batch`` per process): packed runs would otherwise OOM each other.
    ``tuning``: a λ-study trial (its inner-fold models are held at once, stepped in lockstep)."""
    if share <= 0 or cfg.train.device == "cpu":
        return
    memory, source = gpu_memory_gb(cfg.cv, nodes)
    if memory is None:
        log(f"fers: GPU memory check skipped: {source} has no known memory size; set cv.gpu_memory_gb")
        return
    from fers_dist.cv.plan import run_memory

    est = run_memory(cfg, [cfg.tune.dataset] if tuning else cfg.cv.datasets, batch,
                     models=cfg.tune.inner_folds if tuning else 1)
    limit = min(1.0, share) * memory
    if est.total_gb > limit:
        raise FersError(f"{key}={share:g} GPU of {memory:g} GB ({source}) gives a run {limit:.1f} GB, but one run "
                        f"needs an estimated {est.line()}; give each run more of a GPU or lower train.batch_size")
