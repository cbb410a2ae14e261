"""Several Optuna studies in ONE Ray Tune run: nested CV per outer fold (``fers tune --outer-folds``).

Outer fold k has its own study (``<study>-outer<k>``), tuned only on inner folds carved from k's training
subjects. ``StudySearch`` hands each new Tune trial to the study with the most trials still to run (ties:
the lowest fold), so the studies share the cluster's GPUs side by side; the trial's config carries
``OUTER_FOLD`` so the trial function knows which subjects it may see. ``StudyASHA`` keeps one ASHA per study:
a trial is only ever compared with trials of its own outer fold, whose inner folds hold the same subjects.
"""

from __future__ import annotations

from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

OUTER_FOLD = "__outer_fold"


class StudySearch(Searcher):
    """Dispatches ``suggest``/results to one searcher per outer fold (``{fold: (searcher, trials to run)}``)."""

    def __init__(self, searchers: dict, metric=None, mode=None):
        first = next(iter(searchers.values()))[0]
        super().__init__(metric=metric or first.metric, mode=mode or first.mode)
        self.searchers = {k: s for k, (s, _) in searchers.items()}
        self.left = {k: n for k, (_, n) in searchers.items()}
        self.fold_of: dict[str, int] = {}

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.searchers.values())

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        done = [s.set_search_properties(metric, mode, config, **spec) for s in self.searchers.values()]  # each one
        return all(done)

    def suggest(self, trial_id: str):
        open_ = [k for k, n in self.left.items() if n > 0]
        if not open_:
            return Searcher.FINISHED
        k = max(open_, key=lambda f: (self.left[f], -f))
        params = self.searchers[k].suggest(trial_id)
        if not isinstance(params, dict):
            return params
        self.left[k] -= 1
        self.fold_of[trial_id] = k
        return {**params, OUTER_FOLD: k}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.fold_of:
            self.searchers[self.fold_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self.fold_of:
            self.searchers[self.fold_of[trial_id]].on_trial_complete(trial_id, result=result, error=error)


class StudyASHA(FIFOScheduler):
    """One ``RecordingASHA`` per outer fold, chosen by the trial's ``OUTER_FOLD``."""

    def __init__(self, children: dict):
        super().__init__()
        self.children = children

    def _child(self, trial):
        return self.children[trial.config[OUTER_FOLD]]

    @property
    def stopped_early(self) -> set[str]:
        return set().union(*(c.stopped_early for c in self.children.values()))

    def set_search_properties(self, metric, mode, **spec) -> bool:
        done = [c.set_search_properties(metric, mode, **spec) for c in self.children.values()]  # each one
        return all(done)

    def on_trial_add(self, tune_controller, trial):
        self._child(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._child(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self._child(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._child(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"outer fold {k}: {c.debug_string()}" for k, c in self.children.items())
