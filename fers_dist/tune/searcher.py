"""The Ray side of ``fers tune``: the trial function, an OptunaSearch that records honestly why each
trial ended, an ASHA that remembers whom it stopped, and a tqdm progress callback.

Ray's OptunaSearch tells Optuna COMPLETE for a trial that ASHA stopped early (with its last value). Here
such a trial is told PRUNED (Optuna then uses its last intermediate value, as for its own pruners), and
every trial carries user attrs: ``stop_reason`` (completed | asha | interrupted | error |
invalid_config), ``epochs_trained``, ``wall_s``, ``ray_trial_id`` and the per-fold accuracies.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from fers_dist.config import Config, parse_config
from fers_dist.tune.search_space import point_error

logger = logging.getLogger(__name__)
MAX_REJECTS = 200  # consecutive invalid points before giving up (check_feasible makes this unlikely)

_FACES: dict[tuple, Any] = {}  # per worker process: reused actors keep the decoded dataset


def _faces(root: str, dataset: str):
    from fers_dist.data.loader import load_faces, parquet_path

    path = parquet_path(root, dataset)
    st = os.stat(path) if path.exists() else None
    key = (str(path.resolve()), st and st.st_mtime_ns, st and st.st_size)
    if key not in _FACES:
        _FACES.clear()
        _FACES[key] = load_faces(root, dataset)
    return _FACES[key]


def tune_trial(params: dict, *, base: dict, outer_fold: int, inner_folds: int, epochs: int, objective: str,
               devices_held: float) -> None:
    """One trial: the base config with the sampled ``params`` (dotted keys), nested CV in lockstep,
    one ``tune.report`` per epoch. Runs inside a Ray worker; the objective itself is Ray-free."""
    import ray
    import torch

    from fers_dist.cv.fold_run import choose_device
    from fers_dist.train.speed import cap_process_memory, set_alloc_conf
    from fers_dist.tune.objective import NestedCV
    from fers_dist.tune.studies import OUTER_FOLD

    params = dict(params)
    outer_fold = params.pop(OUTER_FOLD, outer_fold)  # the study this trial belongs to (one per outer fold)
    cfg = parse_config(base, source="tune base config").with_overrides(params)
    set_alloc_conf(cfg)
    # the device Ray assigned to this trial: none held means CPU, even on a GPU node
    cfg = cfg.with_overrides({"train.device": choose_device(cfg.train.device, ray.get_gpu_ids(),
                                                            torch.cuda.is_available())})
    cap_process_memory(cfg.train.device, devices_held if ray.get_gpu_ids() else 0)
    faces = _faces(cfg.data.root, base["tune"]["dataset"])
    nested = NestedCV(cfg, faces, outer_fold=outer_fold, k=inner_folds, epochs=epochs, objective=objective,
                      devices_held=devices_held, log=lambda m: print(m, file=sys.stderr))
    from fers_dist.provenance import provenance

    prov = json.dumps({**provenance(cfg.train.device), "node_id": ray.get_runtime_context().get_node_id()})
    seen = json.dumps({"outer_fold": outer_fold, "subjects": nested.subjects})  # recorded on the Optuna trial
    run = None
    if cfg.cv.tracking.mlflow:  # one MLflow run per trial: the sampled λ as params, the inner-fold scores
        from fers_dist.tracking import MlflowRun

        trial = tune.get_context().get_trial_id()
        run = MlflowRun(cfg.cv.tracking.mlflow, f"{cfg.tune.study}-trials", f"trial-{trial}",
                        f"{cfg.tune.study}-{trial}", tags={"study": cfg.tune.study, "outer_fold": outer_fold,
                                                           "objective": objective},
                        params={k: str(v) for k, v in params.items()})

    def report(m: dict) -> None:
        if run:
            run.log_metrics(m, int(m.get("epochs_trained", m.get("epoch", 0))))
        tune.report({**m, "provenance": prov, "data_seen": seen})

    try:
        nested.run(report)
    except BaseException:
        if run:
            run.end(ok=False)
        raise
    if run:
        run.end()


class RecordingASHA(ASHAScheduler):
    """ASHA that remembers the trials it stopped before max_t (so the searcher can say so)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.stopped_early: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.stopped_early.add(trial.trial_id)
        return action


class FersOptunaSearch(OptunaSearch):
    """OptunaSearch over dotted config keys with cross-field rejection and honest trial states."""

    def __init__(self, *, base_cfg: Config, epochs: int, scheduler: RecordingASHA | None = None, **kw):
        super().__init__(**kw)
        self.base_cfg, self.epochs, self.scheduler = base_cfg, epochs, scheduler
        self.rejected = 0

    def suggest(self, trial_id: str):
        for _ in range(MAX_REJECTS):
            params = super().suggest(trial_id)
            if not isinstance(params, dict):
                return params
            err = point_error(self.base_cfg, params)
            if err is None:
                return params
            ot_trial = self._ot_trials.pop(trial_id)  # reject: a FAILED Optuna trial, no Ray trial spent
            ot_trial.set_user_attr("stop_reason", "invalid_config")
            ot_trial.set_user_attr("error", err)
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            self.rejected += 1
            logger.info("rejected an invalid point: %s", err)
        from fers_dist.errors import FersError

        raise FersError(f"tune.space: {MAX_REJECTS} consecutive sampled points were invalid configs "
                        f"(last: {err}); narrow the ranges")

    def stop_reason(self, trial_id: str, result: dict | None, error: bool) -> str:
        if error:
            return "error"
        if self.scheduler is not None and trial_id in self.scheduler.stopped_early:
            return "asha"
        done = (result or {}).get("epochs_trained", 0)
        return "completed" if done >= self.epochs else "interrupted"

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        reason = self.stop_reason(trial_id, result, error)
        r = result or {}
        ot_trial.set_user_attr("stop_reason", reason)
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        for key in ("epochs_trained", "wall_s", "device_hours", "train_loss"):
            if key in r:
                ot_trial.set_user_attr(key, r[key])
        if "provenance" in r:
            ot_trial.set_user_attr("provenance", json.loads(r["provenance"]))
        if "data_seen" in r:  # the outer fold and every subject this trial trained or validated on
            for k, v in json.loads(r["data_seen"]).items():
                ot_trial.set_user_attr(k, v)
        folds = sorted(k for k in r if k.startswith("inner_val_accuracy_f"))
        if folds:
            ot_trial.set_user_attr("inner_val_accuracies", [r[k] for k in folds])
        if reason == "asha" and isinstance(self._metric, str) and self._metric in r:
            # Tune hands the result ASHA stopped on to on_trial_complete only, never to on_trial_result: report
            # it, so the PRUNED trial's value is its LAST reported score (Optuna uses the last intermediate)
            step = int(r.get("training_iteration", r.get("epochs_trained", 0)))
            if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
                ot_trial.report(float(r[self._metric]), step)
        if reason in ("asha", "interrupted"):
            # PRUNED keeps the last intermediate value (single objective); an interrupted trial is
            # FAILED so it is not counted and a resumed study samples afresh.
            state = TrialState.PRUNED if reason == "asha" else TrialState.FAIL
            try:
                self._ot_study.tell(ot_trial, state=state)
            except Exception as exc:  # noqa: BLE001  (e.g. the storage went away; Ray keeps going)
                logger.warning("could not record trial %s as %s: %s", trial_id, state.name, exc)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)


class ProgressCallback(tune.Callback):
    """A tqdm bar (stderr) over the trials of this run, with the best value so far."""

    def __init__(self, total: int, metric: str, mode: str):
        self.total, self.metric, self.mode = total, metric, mode
        self.bar, self.best = None, None

    def setup(self, **info):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc="fers tune", unit="trial", file=sys.stderr)

    def _done(self, trial, error: bool):
        v = (trial.last_result or {}).get(self.metric)
        if v is not None and not error:
            better = self.best is None or (v > self.best if self.mode == "max" else v < self.best)
            self.best = v if better else self.best
        if self.bar is not None:
            self.bar.update(1)
            if self.best is not None:
                self.bar.set_postfix({self.metric: f"{self.best:.4f}"})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._done(trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._done(trial, True)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
