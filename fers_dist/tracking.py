"""Experiment tracking on an MLflow server (``cv.tracking.mlflow``, ``--mlflow URI``), through MLflow's own
client: one MLflow run per fold run, one per tuning trial.

A fold run's MLflow run is named like the fold run (``ckplus-original-f3``) in an experiment named after
``cv.experiment``; it holds the flattened config as params, every epoch's metrics, the final test metrics,
the confusion matrix as an artifact, and tags for dataset, variant, fold, seed, config hash and tag. A
fold run that restarts (a lost worker, ``--resume``) finds its MLflow run again by its ``fers.run_key`` tag
and carries on in it, so there is one MLflow run per fold run. Ray-free: the Ray layer calls it from rank
0 of each run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fers_dist.errors import FersError

RUN_KEY_TAG = "fers.run_key"


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FersError("cv.tracking.mlflow is set but mlflow is not installed (pip install mlflow)") from None
    return MlflowClient(tracking_uri=uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"loss": {"lam_adv": 0.3}}`` -> ``{"loss.lam_adv": "0.3"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class MlflowRun:
    """One MLflow run, created on first use or found again by ``run_key``."""

    def __init__(self, uri: str, experiment: str, name: str, run_key: str, *, tags: dict, params: dict):
        from mlflow.entities import Param

        self.client = c = _client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = c.create_experiment(experiment)
            except Exception:  # noqa: BLE001  (another run created it first: use theirs)
                exp_id = c.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            c.update_run(self.run_id, status="RUNNING")
            return
        run = c.create_run(exp_id, run_name=name, tags={**{k: str(v) for k, v in tags.items()}, RUN_KEY_TAG: run_key})
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def end(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def fold_run(uri: str, cfg, dataset: str, fold: int, tag: str, name: str, run_key: str) -> MlflowRun:
    """The MLflow run of one fold run (see the module docstring)."""
    tags = {"dataset": dataset, "variant": cfg.model.variant, "fold": fold, "seed": cfg.train.seed,
            "config_hash": cfg.hash(), "tag": tag}
    return MlflowRun(uri, cfg.cv.experiment, name, run_key, tags=tags, params=flatten(cfg.model_dump(mode="json")))


@contextmanager
def track_fold(uri: str | None, cfg, dataset: str, fold: int, tag: str, name: str, run_key: str
               ) -> Iterator[MlflowRun | None]:
    """The fold run's MLflow run for a block (None without a URI), ended FINISHED, or FAILED on an error."""
    if not uri:
        yield None
        return
    run = fold_run(uri, cfg, dataset, fold, tag, name, run_key)
    try:
        yield run
    except BaseException:
        run.end(ok=False)
        raise
    run.end()


def log_epoch(run: MlflowRun, metrics: dict) -> None:
    """One epoch's metrics; fes_da's fine-tuning epochs under ``fes_da.`` (their epochs restart at 0)."""
    fes_da = metrics.get("phase") == "fes_da"
    run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, int(metrics.get("epoch", 0)),
                    "fes_da." if fes_da else "")


def log_result(run: MlflowRun, result) -> None:
    """The fold's final test metrics and its confusion matrix (``confusion.json``)."""
    run.log_metrics({"test_accuracy": result.accuracy, "epochs_run": result.epochs_run,
                     **{f"test_accuracy_{n}": a for n, a in zip(result.class_names, result.per_class_accuracy)}},
                    step=result.epochs_run)
    run.log_dict({"class_names": result.class_names, "confusion": result.confusion,
                  "rows": "true class", "columns": "predicted class"}, "confusion.json")
