"""``fers bench tune``: what Ray Tune costs over plain Optuna, and what ASHA saves.

1. Overhead: the same small study (``--overhead-trials`` trials of ``--overhead-epochs`` epochs, random
   sampler, one trial at a time) through ``fers tune``'s own code path (Ray Tune + OptunaSearch,
   reuse_actors=True) and through plain Optuna in this process. Ray's per-trial overhead is
   (Tuner.fit wall time - plain Optuna wall time) / trials; Ray start-up is reported separately.
2. ASHA: a ``--asha-trials`` study of ``--asha-epochs`` epochs with ASHA and without pruning, same sampler
   and seed, so both studies draw the same configurations. Compute is the epochs trained summed over
   trials; the targets are >= 40% less compute and a best (completed) trial within 1 point.

Data: ``--data-root`` holding ``oulu/faces.parquet``, else synthetic Oulu-CASIA faces made and prepared
in the work folder. Models are demo.yaml-sized with identity none.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fers_dist.config import DEMO_YAML


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEMO_YAML), help="base config (model size, batch)")
    p.add_argument("--data-root", help="folder with oulu/faces.parquet (default: synthesise one)")
    p.add_argument("--subjects", type=int, default=24, help="synthetic subjects when no --data-root")
    p.add_argument("--overhead-trials", type=int, default=8)
    p.add_argument("--overhead-epochs", type=int, default=1)
    p.add_argument("--asha-trials", type=int, default=16)
    p.add_argument("--asha-epochs", type=int, default=9, help="epochs per trial (ASHA max_t)")
    p.add_argument("--grace-period", type=int, default=2, help="ASHA: at epoch 1 every tiny trial is still at chance")
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--inner-folds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="small batches: more steps, so epoch 1 already "
                                                               "separates trials (ties never prune)")
    p.add_argument("--skip-asha", action="store_true", help="only the overhead comparison")
    p.add_argument("--skip-overhead", action="store_true", help="only the ASHA comparison")
    p.add_argument("--workdir", help="keep studies and outputs here (default: a temporary folder)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data(args, work: Path) -> str:
    if args.data_root:
        return args.data_root
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize

    synthesize("oulu", work / "raw", args.subjects, seed=0, size=128)
    prepare("oulu", work / "raw", work / "data", aligner="center", size=40, n_folds=8, log=_log)
    return str(work / "data")


def plain_optuna(cfg, n: int, storage: str) -> float:
    """The same study in this process with plain Optuna (``study.optimize``); returns its wall time."""
    import optuna
    import torch

    from fers_dist.tune import search_space as ss
    from fers_dist.tune.cli import make_sampler, trial_epochs
    from fers_dist.tune.objective import NestedCV
    from fers_dist.tune.searcher import _faces

    t, epochs, threads = cfg.tune, trial_epochs(cfg), torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray trial holding < 1 CPU (OMP_NUM_THREADS=1)
    t0 = time.perf_counter()
    study = optuna.create_study(study_name="plain", storage=storage, direction="maximize",
                                sampler=make_sampler("random", cfg.train.seed * 7919, False))
    study.enqueue_trial(ss.baseline(cfg))

    def objective(trial):
        params = ss.suggest(trial, t.space)
        if ss.point_error(cfg, params):
            raise optuna.TrialPruned("invalid config")
        nested = NestedCV(cfg.with_overrides(params), _faces(cfg.data.root, t.dataset), outer_fold=t.outer_fold,
                          k=t.inner_folds, epochs=epochs)
        return nested.run(lambda m: trial.report(m["inner_val_accuracy"], m["epochs_trained"]))["inner_val_accuracy"]

    done = 0
    while done < n:
        study.optimize(objective, n_trials=n - done)
        done = len([x for x in study.trials if x.state.name == "COMPLETE"])
    torch.set_num_threads(threads)
    return time.perf_counter() - t0


def _overhead(args, study, work: Path) -> dict:
    n = args.overhead_trials
    _log(f"bench tune: overhead, {n} trials x {args.overhead_epochs} epoch(s), one at a time")
    cfg, s = study("overhead-ray", trials=n, epochs=args.overhead_epochs, pruner="none", max_concurrent=1)
    plain_s = plain_optuna(cfg, n, f"sqlite:///{work / 'overhead-plain'}.db")
    ray_s = s["ray"]["fit_s"]
    return {"overhead_trials": n, "ray_tune_fit_s": round(ray_s, 2), "plain_optuna_s": round(plain_s, 2),
            "ray_overhead_per_trial_s": round((ray_s - plain_s) / n, 2), "overhead_target_s": 3.0}


def _study_stats(summary: dict, cfg) -> dict:
    import optuna

    from fers_dist.tune.study import open_storage

    study = optuna.load_study(study_name=cfg.tune.study, storage=open_storage(cfg.tune.storage))
    ran = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    done = [t for t in ran if t.state.name == "COMPLETE"]
    return {"trials": len(ran), "completed": len(done),
            "stopped_by_asha": sum(t.user_attrs.get("stop_reason") == "asha" for t in ran),
            "epochs_trained": sum(int(t.user_attrs.get("epochs_trained", 0)) for t in ran),
            "best_inner_val_accuracy": max((t.value for t in done), default=None),
            "best_params": max(done, key=lambda t: t.value).params if done else None,
            "fit_s": round(summary["ray"]["fit_s"], 2)}


def bench(args: argparse.Namespace) -> dict:
    from fers_dist.config import load_config
    from fers_dist.data.prepare import start_ray
    from fers_dist.tune.cli import run_tune

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="fers-bench-tune-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ray, started = start_ray()
    init_s = time.perf_counter() - t0
    try:
        root = _data(args, work)
        base = load_config(args.config).with_overrides({
            "identity.backbone": "none", "train.batch_size": args.batch_size, "data.root": root,
            "cv.storage": str(work / "results"),
            "tune.dataset": "oulu", "tune.inner_folds": args.inner_folds, "tune.sampler": "random",
            "tune.cpus_per_trial": 0.5, "tune.gpus_per_trial": 0})

        def study(name: str, **tune) -> tuple:
            cfg = base.with_overrides({"tune.study": name, "tune.storage": f"sqlite:///{work / name}.db",
                                       **{f"tune.{k}": v for k, v in tune.items()}})
            return cfg, run_tune(cfg, out=str(work / name), log=_log)

        result = {"ray_init_s": round(init_s, 2)}
        if not args.skip_overhead:
            result.update(_overhead(args, study, work))
            _log(f"bench tune: {result}")
        if not args.skip_asha:
            kw = {"trials": args.asha_trials, "epochs": args.asha_epochs, "grace_period": args.grace_period,
                      "reduction_factor": args.reduction_factor}
            asha = _study_stats(study("asha", pruner="asha", **kw)[1], base.with_overrides(
                {"tune.study": "asha", "tune.storage": f"sqlite:///{work / 'asha'}.db"}))
            full = _study_stats(study("full", pruner="none", **kw)[1], base.with_overrides(
                {"tune.study": "full", "tune.storage": f"sqlite:///{work / 'full'}.db"}))
            saved = 1 - asha["epochs_trained"] / full["epochs_trained"]
            gap = None
            if asha["best_inner_val_accuracy"] is not None and full["best_inner_val_accuracy"] is not None:
                gap = 100 * (full["best_inner_val_accuracy"] - asha["best_inner_val_accuracy"])
            result.update({"asha": asha, "no_pruning": full, "asha_compute_saved": round(saved, 3),
                           "asha_best_gap_points": None if gap is None else round(gap, 2),
                           "asha_targets_met": saved >= 0.4 and gap is not None and gap <= 1.0})
        return result
    finally:
        if started:
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
