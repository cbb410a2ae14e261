"""One (dataset, variant, fold) run on Ray: the per-worker ``train_func`` and the Tune trial that starts it.

The trial builds a ``TorchTrainer`` named after the run (``ckplus-original-f3``), so Train V2 resumes it
by name; ``workers_per_run=0`` uses Train's local mode inside the trial (reports then go straight to
Tune, since ``ray.train.report`` is refused inside a Tune function). The final report carries the fold's
result row (``fold_result``), which the driver appends to folds.parquet.

Checkpoints: with local (or NFS) storage, ``fit_fold`` writes straight into
``<storage>/<experiment>/checkpoints/<run>/`` and resumes from there after any restart, of a worker or of
the whole experiment. With object storage (s3://, gs://) checkpoints travel through ``ray.train.report``
and come back through ``get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fers_dist.config import parse_config
from fers_dist.results import experiment_uri, result_row, run_name


def is_remote(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def checkpoint_home(storage: str, experiment: str, name: str) -> str:
    return f"{experiment_uri(storage, experiment)}/checkpoints/{name}"


def train_func(config: dict) -> None:
    """Ray Train per-worker function: fit one fold (plain PyTorch) and report through Ray."""
    import ray.train
    import ray.tune

    from fers_dist.train.fold import fit_fold

    local_mode = config["workers"] == 0
    report_fn = ray.tune.report if local_mode else ray.train.report
    Checkpoint = ray.tune.Checkpoint if local_mode else ray.train.Checkpoint
    get_checkpoint = ray.tune.get_checkpoint if local_mode else ray.train.get_checkpoint
    rank = 0 if local_mode else ray.train.get_context().get_world_rank()  # > 0 only for data parallel

    cfg = parse_config(config["cfg"], source="run config")
    storage, remote = config["storage"], is_remote(config["storage"])
    name = run_name(config["dataset"], cfg.model.variant, config["fold"], config["tag"])
    if remote:  # checkpoints travel through Ray; resume from the last one reported
        ckdir = Path(tempfile.mkdtemp(prefix=f"fers-{name}-"))
        restored = get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                shutil.copytree(d, ckdir, dirs_exist_ok=True)
    else:
        ckdir = Path(checkpoint_home(storage, config["experiment"], name))
    ckdir.mkdir(parents=True, exist_ok=True)
    (ckdir / f"worker{rank or ''}.pid").write_text(str(os.getpid()))  # the fault-tolerance test finds us

    def report(metrics: dict, saved: str | None) -> None:
        attach = Checkpoint.from_directory(str(ckdir)) if saved and remote else None
        report_fn({**metrics, "run": name}, checkpoint=attach)

    data = Path(cfg.data.root) / config["dataset"]
    result = fit_fold(cfg, data, config["fold"], report=report, checkpoint_dir=ckdir,
                      init_from=config.get("init_from"))
    row = result_row(result, experiment=config["experiment"], tag=config["tag"],
                     checkpoint_uri="" if remote else str(ckdir), config=config["cfg"])
    final = {"run": name, "final": True, "test_accuracy": result.accuracy, "fold_result": json.dumps(row)}
    report_fn(final, checkpoint=Checkpoint.from_directory(str(ckdir)) if remote and rank == 0 else None)


def fold_trial(config: dict) -> None:
    """Tune function trainable: start the run's TorchTrainer and wait for it."""
    config = config.get("run", config)  # the grid puts each run's settings under "run"
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = parse_config(config["cfg"], source="run config")
    name = run_name(config["dataset"], cfg.model.variant, config["fold"], config["tag"])
    workers = config["workers"]
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=bool(config["worker"].get("GPU")),
            resources_per_worker=config["worker"] or None),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=f"{experiment_uri(config['storage'], config['experiment'])}/train",
            failure_config=ray.train.FailureConfig(max_failures=config["max_failures"]),
            callbacks=[TuneReportCallback()] if workers else None,
        ),
    )
    trainer.fit()
