"""One (dataset, variant, fold) run on Ray: the per-worker ``train_func`` and the Tune trial that starts it.

The trial builds a ``TorchTrainer`` named after the run and its config hash (``run_key``:
``ckplus-original-f3-1a2b3c4d5e6f``), so Train V2 resumes it by name and a changed config starts afresh;
``workers_per_run=0`` uses Train's local mode inside the trial (reports then go straight to Tune, since
``ray.train.report`` is refused inside a Tune function). The final report carries the fold's result row
(``fold_result``), which the driver appends to folds.parquet.

Checkpoints live at ``<storage>/<experiment>/checkpoints/<run_key>/`` (``main.pt``, and ``fes_da.pt``
for fes_da), one file each, replaced at every save, so a run keeps a bounded number of objects. With a
local or NFS path ``fit_fold`` writes there directly. With object storage (s3://, gs://) it writes to a
local folder, rank 0 uploads each save to the same place in the background (:class:`Uploader`), and a run
that starts again, on any node, downloads it and resumes; the local folder goes when the run ends.
Besides every ``train.checkpoint_every`` epochs, a run saves at the end of the epoch in which Ray Train
announces a preemption of one of its nodes (:func:`preemption_probe`). The checkpoints also carry the
config hash, and ``fit_fold`` refuses one made under another config.

Devices come from what Ray assigned to the run (:func:`choose_device`), never from what the node has.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fers_dist.config import parse_config
from fers_dist.errors import FersError
from fers_dist.provenance import provenance
from fers_dist.results import experiment_uri, result_row, run_key, run_name
from fers_dist.storage import download, exists, is_uri, upload
from fers_dist.tracking import log_epoch, log_result, track_fold
from fers_dist.train.pretrain import pretrained_uri
from fers_dist.train.speed import cap_process_memory, set_alloc_conf

CHECKPOINT_FILES = ("main.pt", "fes_da.pt")


def checkpoint_home(storage: str, experiment: str, key: str) -> str:
    return f"{experiment_uri(storage, experiment)}/checkpoints/{key}"


def choose_device(requested: str, gpu_ids: list, cuda_usable: bool) -> str:
    """The torch device of a run under Ray, from the GPUs Ray assigned to it (``gpu_ids``).

    ``cpu`` stays on the CPU (logical GPUs on a CPU cluster, or a deliberate CPU run). A run that holds no
    GPU never touches CUDA, even on a GPU node. GPUs assigned but CUDA unusable is an error, never a silent
    CPU run. ``cuda:N`` is refused: under Ray the GPU is Ray's choice. ``FERS_DEVICE`` (the test suite's
    ``cpu``) replaces ``auto``, as in ``resolve_device``."""
    if requested == "auto" and os.environ.get("FERS_DEVICE"):
        requested = os.environ["FERS_DEVICE"]
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda:"):
        raise FersError(f"train.device: {requested!r} is not allowed under Ray, which assigns the GPU; use "
                        f"auto, cuda or cpu")
    if not gpu_ids:
        if requested == "cuda":
            raise FersError("train.device: 'cuda' but this run holds no GPU (set cv.gpus_per_run > 0)")
        return "cpu"
    if not cuda_usable:
        raise FersError(f"Ray assigned GPU {', '.join(map(str, gpu_ids))} to this run but CUDA is not usable "
                        f"in this process; fix the node's driver/torch build, or set train.device: cpu")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    first = str(gpu_ids[0])
    return f"cuda:{visible.index(first) if first in visible else int(first)}"


def _ray_device(requested: str, local_mode: bool) -> str:
    import ray
    import torch

    device = choose_device(requested, ray.get_gpu_ids(), torch.cuda.is_available())
    if device != "cpu" and not local_mode:  # a Train worker: Train's own pick among the worker's GPUs
        import ray.train.torch

        return str(ray.train.torch.get_device())
    return device


@contextmanager
def _local_checkpoints(home: str, key: str):
    """A local folder holding the run's checkpoints: ``home`` itself, or, for object storage, a scratch
    copy of what the bucket has, removed when the run ends (the bucket keeps the checkpoints; a retry
    downloads them again), so nodes never fill their disks with runs that are over."""
    if not is_uri(home):
        yield Path(home)
        return
    ckdir = Path(tempfile.mkdtemp(prefix=f"fers-{key}-"))
    try:
        for name in CHECKPOINT_FILES:
            if exists(f"{home}/{name}"):
                download(f"{home}/{name}", ckdir / name)
        yield ckdir
    finally:
        shutil.rmtree(ckdir, ignore_errors=True)


def preemption_probe(local_mode: bool):
    """``save_now`` for ``fit_fold``: true once Ray Train reports an imminent preemption of a node holding this
    run's workers (``ray.train.get_preemption_info``, a collective every rank calls once per epoch), or once
    this process got SIGTERM (where a handler can be installed: Train and Tune run the loop in a thread)."""
    import signal
    import threading

    import ray.train

    term = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: term.set())
    info = None if local_mode else getattr(ray.train, "get_preemption_info", None)
    return lambda: term.is_set() or bool(info and info() is not None)


class Uploader:
    """Checkpoint uploads to object storage in the background, one at a time: training goes on while the last
    save travels. A file replaced while it uploads is read whole either way (saves are temp + rename)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), None

    def submit(self, local: str, uri: str) -> None:
        self.wait()
        self.pending = self.pool.submit(upload, local, uri)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # an upload error fails the run here, never silently
            self.pending = None


def train_func(config: dict) -> None:
    """Ray Train per-worker function: fit one fold (plain PyTorch) and report through Ray."""
    import ray.train
    import ray.tune

    from fers_dist.train.fold import fit_fold

    local_mode = config["workers"] == 0
    report_fn = ray.tune.report if local_mode else ray.train.report
    rank = 0 if local_mode else ray.train.get_context().get_world_rank()  # > 0 only for data parallel

    cfg = parse_config(config["cfg"], source="run config")
    set_alloc_conf(cfg)  # before this process's first CUDA allocation
    device = _ray_device(cfg.train.device, local_mode)
    cap_process_memory(device, cfg.cv.gpus_per_run / max(1, config["workers"]))
    name = run_name(config["dataset"], cfg.model.variant, config["fold"], config["tag"], cfg.train.seed)
    key = run_key(config["dataset"], cfg.model.variant, config["fold"], config["tag"], cfg.hash(), cfg.train.seed)
    home = checkpoint_home(config["storage"], config["experiment"], key)
    with _local_checkpoints(home, key) as ckdir:
        ckdir.mkdir(parents=True, exist_ok=True)
        (ckdir / f"worker{rank or ''}.pid").write_text(str(os.getpid()))  # the fault-tolerance tests find us
        (ckdir / f"worker{rank or ''}.node").write_text(ray.get_runtime_context().get_node_id())
        init_from = config.get("init_from")
        if init_from and is_uri(init_from):  # fes_da: the original run's main.pt, read from the bucket
            init_from = str(download(init_from, ckdir / "init_from" / Path(init_from).name))
        pretrained = pretrained_uri(cfg)  # train.init_from: the BU-4DFE model every fold starts from
        if pretrained and is_uri(pretrained):
            pretrained = str(download(pretrained, ckdir / "pretrained" / Path(pretrained).name))

        data = Path(cfg.data.root) / config["dataset"]
        uri = cfg.cv.tracking.mlflow if rank == 0 else None
        with track_fold(uri, cfg, config["dataset"], config["fold"], config["tag"], name, key) as mlflow:
            uploads = Uploader()

            def report(metrics: dict, saved: str | None) -> None:
                if saved and is_uri(home) and rank == 0:
                    uploads.submit(saved, f"{home}/{Path(saved).name}")
                if mlflow:
                    log_epoch(mlflow, metrics)
                report_fn({**metrics, "run": name})

            result = fit_fold(cfg, data, config["fold"], report=report, checkpoint_dir=ckdir, init_from=init_from,
                              device=device, pretrained=pretrained, save_now=preemption_probe(local_mode))
            uploads.wait()  # the last checkpoint is in the bucket before the run counts as finished
            if mlflow:
                log_result(mlflow, result)
        row = result_row(result, experiment=config["experiment"], tag=config["tag"], checkpoint_uri=home,
                         config=config["cfg"])
        row.update(provenance(device), node_id=ray.get_runtime_context().get_node_id())
        report_fn({"run": name, "final": True, "test_accuracy": result.accuracy, "fold_result": json.dumps(row)})


def fold_trial(config: dict) -> None:
    """Tune function trainable: start the run's TorchTrainer and wait for it."""
    config = config.get("run", config)  # the grid puts each run's settings under "run"
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = parse_config(config["cfg"], source="run config")
    key = run_key(config["dataset"], cfg.model.variant, config["fold"], config["tag"], cfg.hash(), cfg.train.seed)
    workers, use_gpu = config["workers"], bool(config["worker"].get("GPU"))
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        # a run on CPUs that holds (logical) GPUs still talks gloo: NCCL needs the GPUs it would train on
        torch_config=TorchConfig(backend="nccl" if use_gpu and cfg.train.device != "cpu" else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=config["worker"] or None,
            placement_strategy="STRICT_PACK"),  # a data-parallel run's ranks share one node
        run_config=ray.train.RunConfig(
            name=key,
            storage_path=f"{experiment_uri(config['storage'], config['experiment'])}/train",
            failure_config=ray.train.FailureConfig(max_failures=config["max_failures"]),
            callbacks=[TuneReportCallback()] if workers else None,
        ),
    )
    trainer.fit()
