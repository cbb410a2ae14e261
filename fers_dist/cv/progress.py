"""Driver-side Tune callbacks: write each finished run's row to folds.parquet, and show a live table of
runs (finished / running / failed, with the latest accuracy) plus a one-screen summary at the end."""

from __future__ import annotations

import json
import sys
import time

from ray.tune import Callback

from fers_dist.results import append_rows, result_row


class RowWriter(Callback):
    """Appends one folds.parquet row per finished run (the driver is one process: no write races)."""

    def __init__(self, storage: str, experiment: str):
        self.storage, self.experiment = storage, experiment
        self.rows = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "fold_result" in result:
            append_rows(self.storage, self.experiment, [json.loads(result["fold_result"])])
            self.rows += 1

    def on_trial_error(self, iteration, trials, trial, **info):
        c = trial.config.get("run", trial.config)
        from fers_dist.config import parse_config

        cfg = parse_config(c["cfg"])
        failed = {"dataset": c["dataset"], "variant": cfg.model.variant, "fold": c["fold"],
                  "seed": cfg.train.seed, "config_hash": cfg.hash(), "accuracy": float("nan")}
        error = str(getattr(trial, "error_file", "") or "failed")
        append_rows(self.storage, self.experiment,
                    [result_row(failed, experiment=self.experiment, tag=c["tag"], status="failed",
                                error=error, config=c["cfg"])])


class ProgressTable(Callback):
    """A compact live table on stderr, refreshed at most every ``every_s`` seconds."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.every_s = total, every_s
        self.state: dict[str, dict] = {}
        self.t0 = self.last = time.time()

    def _name(self, trial) -> str:
        c = trial.config.get("run", trial.config)
        return f"{c['dataset']}-{c['variant']}-f{c['fold']}"

    def on_trial_start(self, iteration, trials, trial, **info):
        self.state[self._name(trial)] = {"status": "running", "epoch": "-", "acc": None}
        self._maybe_print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        s = self.state.setdefault(self._name(trial), {"status": "running", "epoch": "-", "acc": None})
        if "epoch" in result:
            s["epoch"] = result["epoch"]
            s["acc"] = result.get("val_accuracy", result.get("train_accuracy"))
        if result.get("final"):
            s.update(status="finished", acc=result["test_accuracy"])
        self._maybe_print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.state.setdefault(self._name(trial), {"epoch": "-", "acc": None})["status"] = "failed"
        self._maybe_print(force=True)

    def on_experiment_end(self, trials, **info):
        self._maybe_print(force=True)

    def _maybe_print(self, force: bool = False):
        if not force and time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        counts = {k: sum(1 for s in self.state.values() if s["status"] == k) for k in ("finished", "running", "failed")}
        lines = [(f"[fers cv {time.time() - self.t0:6.0f}s] {counts['finished']}/{self.total} finished, "
                  f"{counts['running']} running, {counts['failed']} failed")]
        for name, s in sorted(self.state.items()):
            if s["status"] != "finished" or force:
                acc = "" if s["acc"] is None else f"{s['acc']:.3f}"
                lines.append(f"  {name:<28} {s['status']:<9} epoch {s['epoch']!s:>4}  acc {acc}")
        print("\n".join(lines), file=sys.stderr, flush=True)


def summary_table(frame) -> str:
    """Mean ± std test accuracy per dataset x variant (finished runs), as fixed-width text."""
    if frame is None or not len(frame):
        return "(no finished runs)"
    done = frame[frame["status"] == "finished"]
    tags = done["tag"] if "tag" in done.columns else "paper"
    done = done.assign(_label=done["variant"].where(tags == "paper", done["variant"] + " (" + tags + ")"))
    width = max([11, *map(len, done["_label"])])
    lines = [f"{'dataset':<8} {'variant':<{width}} {'accuracy (%)':>16}  folds"]
    for (ds, var), g in done.groupby(["dataset", "_label"], sort=True):  # another tag is another experiment
        acc = g["accuracy"] * 100
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        lines.append(f"{ds:<8} {var:<{width}} {acc.mean():>8.2f} ± {std:5.2f}  {len(acc)}")
    return "\n".join(lines)
