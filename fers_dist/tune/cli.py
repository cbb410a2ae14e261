"""Tune the loss weights λ1..λ4 and the LR schedule with Ray Tune + Optuna, on nested CV.

``fers tune --config jobs/configs/tune.yaml --dataset oulu --trials 50 --storage sqlite:///oulu.db``

- Search space: ``tune.space`` in the YAML (dotted config keys). The config's own values (the paper's)
  are enqueued as the first trial, so the study always holds the baseline. Points breaking a
  cross-field rule (lr_end > lr_start) are rejected and recorded as FAILED trials (search_space.py).
- Objective: mean accuracy on INNER validation folds carved from the training subjects of outer fold
  ``tune.outer_fold``; the outer test fold is never loaded into a trial (objective.py). Nested CV
  (``--outer-folds all``): one study per outer fold k, tuned on k's training subjects only, all in one
  Ray Tune run (studies.py).
  ``--objective fer+fes`` adds FES realism, ``fer-fast`` device-hours (Pareto front).
- Ray Tune runs the trials (OptunaSearch, TPE by default; ASHA stops weak trials on the epoch
  reports; a ConcurrencyLimiter sized to the cluster; reuse_actors=True).
- The study lives in persistent Optuna storage: running the same command again resumes it, keeping
  finished trials and running only the missing ones (``--trials`` is the study's total).
- Outputs in ``--out`` (default ``<cv.storage>/tune-<study>``): best.yaml, trials.parquet, PNG plots.
  ``--evaluate-best`` then runs each study's best.yaml through ``fers cv`` on its OWN outer fold only (the
  one whose subjects the study never saw), tag "tuned"; never on folds the study tuned on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from fers_dist.config import Config, add_set_argument, load_config
from fers_dist.errors import DataError, FersError
from fers_dist.paths import resolve_paths

SAMPLERS = ("tpe", "random", "cmaes", "nsgaii")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config with a tune: section (e.g. jobs/configs/tune.yaml)")
    p.add_argument("--dataset", choices=("ckplus", "oulu", "mmi", "bu4dfe"), help="tune.dataset")
    p.add_argument("--trials", type=int, help="total trials the study should hold (tune.trials)")
    p.add_argument("--storage", help="sqlite:///study.db, a study.log journal file, or an RDB URL "
                                     "(default: sqlite in --out)")
    p.add_argument("--study", help="study name (tune.study)")
    p.add_argument("--objective", choices=("fer", "fer+fes", "fer-fast"), help="tune.objective")
    p.add_argument("--sampler", choices=SAMPLERS, help="tune.sampler")
    p.add_argument("--pruner", choices=("asha", "none"), help="tune.pruner (single objective only)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    p.add_argument("--epochs", type=int, help="epochs per trial (tune.epochs)")
    p.add_argument("--outer-fold", type=int, help="one study: the outer fold whose training subjects are tuned on")
    p.add_argument("--outer-folds", help="nested CV: one study per outer fold, 'all' or a comma list (0,3,7); each "
                                         "is tuned on its fold's training subjects and tested on that fold only")
    p.add_argument("--inner-folds", type=int, help="inner CV folds (tune.inner_folds)")
    p.add_argument("--force", action="store_true",
                   help="continue an existing study even though its search space or protocol changed")
    p.add_argument("--evaluate-best", action="store_true",
                   help="afterwards run best.yaml through fers cv on the outer folds (tag 'tuned')")
    p.add_argument("--out", help="output folder (default: <cv.storage>/tune-<study>)")
    p.add_argument("--dry-run", action="store_true", help="print the studies, trials and GPU-hours; start nothing")
    p.add_argument("--bench", metavar="FILE", help="--dry-run: throughput from `fers bench gpu --out FILE`")
    p.add_argument("--data-root", help="data.root: folder holding <dataset>/faces.parquet")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray; 'local' forces one)")
    p.add_argument("--mlflow", metavar="URI", help="cv.tracking.mlflow: log every trial to this MLflow server "
                                                   "(experiment <study>-trials)")
    add_set_argument(p)


FLAG_KEYS = {"dataset": "tune.dataset", "trials": "tune.trials", "storage": "tune.storage",
             "study": "tune.study", "objective": "tune.objective", "sampler": "tune.sampler",
             "pruner": "tune.pruner", "max_concurrent": "tune.max_concurrent", "epochs": "tune.epochs",
             "outer_fold": "tune.outer_fold", "inner_folds": "tune.inner_folds", "data_root": "data.root",
             "mlflow": "cv.tracking.mlflow"}


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items() if getattr(args, name, None) is not None}
    if getattr(args, "outer_folds", None):
        text = args.outer_folds.strip()
        try:
            flags["tune.outer_folds"] = "all" if text == "all" else [int(f) for f in text.split(",") if f.strip()]
        except ValueError:
            raise FersError(f"--outer-folds: {text!r} is not 'all' or a comma list of fold indices") from None
    return load_config(args.config, flags or None, getattr(args, "sets", None))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print_cost(cfg, args.bench)
        return 0
    summary = run_tune(cfg, out=args.out, force=args.force, evaluate_best=args.evaluate_best,
                       address=args.address, source=args.config or "<defaults>")
    for r in summary["studies"]:
        _stderr(f"tune: study {r['study']!r}: {r['counted']}/{cfg.tune.trials} trials "
                f"(storage {summary['storage']}; view with: optuna-dashboard {summary['storage']})")
        if r.get("best_trial") is not None:
            vals = ", ".join(f"{k}={v:.4f}" for k, v in r["best_values"].items())
            _stderr(f"tune: {r['study']}: best trial #{r['best_trial']}: {vals}; wrote {r['out']}")
    if "evaluate_best" in summary:
        e = summary["evaluate_best"]
        acc = "n/a" if e["mean_accuracy"] is None else f"{e['mean_accuracy']:.4f}"
        _stderr(f"tune: tuned config(s) on outer fold(s) {e['folds']} (tag 'tuned'): {e['finished']}/{e['runs']} "
                f"runs finished, mean test accuracy {acc}")
    return 0 if summary["counted"] >= cfg.tune.trials else 1


ASHA_SAVING = 0.576  # compute ASHA saved at grace 2, reduction 3 (fers bench tune, docs/BENCHMARKS.md)


def print_cost(cfg: Config, bench: str | None = None) -> dict:
    """``fers tune --dry-run``: studies x trials x inner folds x epochs, in GPU-hours, with and without ASHA."""
    from fers_dist.cv.plan import PROJECTED_IMAGES_PER_S, bench_throughput, dataset_images

    t = cfg.tune
    ips, source = PROJECTED_IMAGES_PER_S, "projected from counted FLOPs at 35% MFU (pass --bench to measure)"
    if bench:
        ips, source = bench_throughput(cfg.with_overrides({"cv.gpus_per_run": 1.0}), bench)
    n, where = dataset_images(cfg, t.dataset)
    studies = study_plan(cfg)
    epochs = trial_epochs(cfg)
    outer_train = n * (cfg.data.n_folds - 1) / cfg.data.n_folds
    per_trial_epoch = outer_train * (t.inner_folds - 1)  # k inner models, each on (k-1)/k of the training side
    hours = len(studies) * t.trials * epochs * per_trial_epoch / ips / 3600
    mode = (f"nested CV: {len(studies)} studies (one per outer fold)" if t.outer_folds is not None
            else f"one study on the training subjects of outer fold {t.outer_fold}")
    print(f"fers tune {t.study}: {mode}; {t.dataset}: {n} images ({where})")
    print(f"  {len(studies)} x {t.trials} trials x {t.inner_folds} inner folds x {epochs} epochs = "
          f"{len(studies) * t.trials * t.inner_folds * epochs:,} model-epochs of ~{outer_train * (t.inner_folds - 1) / t.inner_folds:.0f} images")
    print(f"  throughput: {ips:.0f} training images/s per GPU ({source})")
    print(f"  without pruning: {hours:,.1f} GPU-hours; with ASHA (grace {t.grace_period}, reduction "
          f"{t.reduction_factor:g}): ~{hours * (1 - ASHA_SAVING):,.1f} GPU-hours, if it saves the {ASHA_SAVING:.0%} "
          f"measured by fers bench tune (grace 2, reduction 3, 9 epochs; a longer grace period saves less)")
    print(f"  then --evaluate-best: {len(studies)} fold run(s) of {cfg.train.epochs} epochs")
    return {"studies": len(studies), "gpu_hours": hours, "gpu_hours_asha": hours * (1 - ASHA_SAVING)}


# -- setup pieces ------------------------------------------------------------------------------
def trial_epochs(cfg: Config) -> int:
    return cfg.tune.epochs or cfg.train.epochs


def trial_resources(cfg: Config) -> dict[str, float]:
    t = cfg.tune
    return {"cpu": t.cpus_per_trial or cfg.cv.cpus_per_run,
            "gpu": cfg.cv.gpus_per_run if t.gpus_per_trial is None else t.gpus_per_trial}


def concurrency(resources: dict[str, float], cluster: dict, requested: int | None) -> int:
    """Trials the cluster can hold at once; a clear error for GPU asks on a cluster without GPUs."""
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    have = ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU")) or "nothing"
    if resources["gpu"] > 0 and gpus == 0:
        raise FersError(f"tune.gpus_per_trial: each trial asks for {resources['gpu']:g} GPU but the Ray cluster "
                        f"has no GPUs ({have}); set tune.gpus_per_trial: 0 (or cv.gpus_per_run: 0) to tune on CPUs")
    if resources["gpu"] > gpus:
        raise FersError(f"tune.gpus_per_trial: {resources['gpu']:g} GPUs per trial but the cluster has {have}")
    if resources["cpu"] > cpus:
        raise FersError(f"tune.cpus_per_trial: {resources['cpu']:g} CPUs per trial but the cluster has {have}")
    cap = math.floor(cpus / resources["cpu"] + 1e-9)
    if resources["gpu"] > 0:
        cap = min(cap, math.floor(gpus / resources["gpu"] + 1e-9))
    return requested or max(1, cap)


def check_data(cfg: Config) -> None:
    """Fail before Ray starts: the prepared data exists, the outer fold(s) exist, enough subjects remain."""
    import pyarrow.parquet as pq

    from fers_dist.data.loader import parquet_path

    t = cfg.tune
    if "://" in cfg.data.root:
        return
    path = parquet_path(cfg.data.root, t.dataset)
    if not path.exists():
        raise DataError(f"{path}: no prepared {t.dataset} data (run: fers prepare --dataset {t.dataset} "
                        f"--root RAW --out {cfg.data.root}, or pass --data-root)")
    cols = pq.read_table(path, columns=["fold", "subject"]).to_pydict()
    n_folds = max(cols["fold"]) + 1
    key = "tune.outer_fold" if t.outer_folds is None else "tune.outer_folds"
    for k, _ in study_plan(cfg, n_folds):
        if not 0 <= k < n_folds:
            raise FersError(f"{key}: {k} is out of range: {path} has folds 0..{n_folds - 1}")
        subjects = {s for s, f in zip(cols["subject"], cols["fold"]) if f != k}
        if len(subjects) < t.inner_folds:
            raise FersError(f"tune.inner_folds: {t.inner_folds} inner folds need {t.inner_folds} training subjects; "
                            f"outer fold {k} of {path} leaves {len(subjects)}")


def study_plan(cfg: Config, n_folds: int | None = None) -> list[tuple[int, str]]:
    """(outer fold, study name) of every study: one (``tune.outer_fold``, ``tune.study``), or, with
    ``tune.outer_folds``, one per listed outer fold named ``<study>-outer<k>``."""
    t = cfg.tune
    if t.outer_folds is None:
        return [(t.outer_fold, t.study)]
    folds = range(n_folds or cfg.data.n_folds) if t.outer_folds == "all" else dict.fromkeys(t.outer_folds)
    return [(k, f"{t.study}-outer{k}") for k in folds]


def make_sampler(name: str, seed: int, multi: bool):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if multi:
        raise FersError("tune.sampler: cmaes is single-objective; use tpe or nsgaii for fer+fes / fer-fast")
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise FersError("tune.sampler: cmaes needs the 'cmaes' package (pip install cmaes), or use tpe") from None
    return optuna.samplers.CmaEsSampler(seed=seed)


# -- the run -----------------------------------------------------------------------------------
def run_tune(cfg: Config, *, out: str | None = None, force: bool = False, evaluate_best: bool = False,
             address: str | None = None, source: str = "<config>", log=_stderr) -> dict:
    """Run (or resume) the study (or, with ``tune.outer_folds``, the per-outer-fold studies) of ``cfg.tune``
    and write their outputs; returns a summary dict (per study under ``studies``)."""
    from fers_dist.tune import search_space as ss
    from fers_dist.tune import study as st
    from fers_dist.tune.objective import OBJECTIVES
    from fers_dist.tune.outputs import write_outputs

    t = cfg.tune
    cfg = resolve_paths(cfg.with_overrides({"model.variant": t.variant}))  # trials chdir: no relative path
    ss.check_space(cfg, source)
    feasible = ss.check_feasible(cfg, source)
    if feasible < 1:
        log(f"tune: about {1 - feasible:.0%} of the space breaks a config rule; such points are recorded as "
            f"FAILED trials (stop_reason=invalid_config) and drawn again")
    metrics = [m for m, _ in OBJECTIVES[t.objective]]
    modes = [m for _, m in OBJECTIVES[t.objective]]
    epochs = trial_epochs(cfg)
    out = out or f"{cfg.cv.storage.rstrip('/')}/tune-{t.study}"
    if "://" not in out:
        Path(out).mkdir(parents=True, exist_ok=True)
    storage_url = t.storage or st.default_storage(out)
    check_data(cfg)
    storage = st.open_storage(storage_url)
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    studies = []
    for k, name in study_plan(cfg):
        cfg_k = cfg.with_overrides({"tune.outer_fold": k, "tune.study": name, "tune.outer_folds": None})
        study = st.open_study(storage, name, cfg_k, epochs, directions, force=force, log=log)
        stale = st.fail_interrupted(study)
        if stale:
            log(f"tune: {name}: {stale} trial(s) left running by an interrupted run are marked FAILED "
                f"(stop_reason=interrupted)")
        done = st.counted(study)
        entry = {"fold": k, "study": name, "cfg": cfg_k, "optuna": study, "counted_before": done,
                 "remaining": max(0, t.trials - done)}
        if entry["remaining"]:
            if st.enqueue_baseline(study, ss.baseline(cfg)):
                log(f"tune: {name}: enqueued the config's own values (the baseline) as the next trial")
            log(f"tune: study {name!r} has {done} finished trial(s); running {entry['remaining']} more")
        else:
            log(f"tune: study {name!r} already has {done} finished trial(s) (>= {t.trials}); nothing to run")
        studies.append(entry)
    summary = {"study": t.study, "storage": storage_url, "out": out, "studies": []}
    todo = [e for e in studies if e["remaining"]]
    if todo:
        summary["ray"] = _run_trials(cfg, todo, storage, epochs, metrics, modes, out, address, log)
    nested = t.outer_folds is not None
    for e in studies:
        e_out = f"{out.rstrip('/')}/outer{e['fold']}" if nested else out
        if nested and "://" not in e_out:
            Path(e_out).mkdir(parents=True, exist_ok=True)
        row = {"study": e["study"], "outer_fold": e["fold"], "counted_before": e["counted_before"],
               "counted": st.counted(e["optuna"]), "out": e_out}
        row.update(write_outputs(e["optuna"], e["cfg"], e_out, metrics, log))
        summary["studies"].append(row)
    if not nested:  # one study: its figures at the top level, as before
        summary.update({k: v for k, v in summary["studies"][0].items() if k not in ("study", "out")})
    summary["counted"] = min(r["counted"] for r in summary["studies"])
    if evaluate_best:
        best = [(r["outer_fold"], r["written"]["best"]) for r in summary["studies"] if r.get("best_trial") is not None]
        if best:
            summary["evaluate_best"] = evaluate_best_configs(best, address, log, nested)
    return summary


def _run_trials(cfg: Config, studies: list[dict], storage, epochs: int, metrics: list[str], modes: list[str],
                out: str, address: str | None, log) -> dict:
    """One Ray Tune run over every study's missing trials (``tune/studies.py`` dispatches them)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from fers_dist.cv.capacity import plan_capacity, scaled
    from fers_dist.cv.resources import (
        alive_nodes,
        check_device,
        check_gpu_memory,
        free_resources,
        max_batch,
        ray_session,
    )
    from fers_dist.tune import study as st
    from fers_dist.tune.searcher import FersOptunaSearch, ProgressCallback, RecordingASHA, tune_trial
    from fers_dist.tune.studies import StudyASHA, StudySearch

    t, multi = cfg.tune, len(metrics) > 1
    n = sum(e["remaining"] for e in studies)
    check_device(cfg)
    with ray_session(address):
        resources = trial_resources(cfg)
        check_gpu_memory(cfg, alive_nodes(), resources["gpu"], max_batch(cfg),
                         "tune.gpus_per_trial" if t.gpus_per_trial is not None else "cv.gpus_per_run", log,
                         tuning=True)
        cap = plan_capacity(cfg.cv, free_resources())  # what the autoscaler can add counts (cv/capacity.py)
        max_conc = concurrency(resources, cap.plan, t.max_concurrent)
        use_asha = t.pruner == "asha" and not multi
        if t.pruner == "asha" and multi:
            log("tune: ASHA is not used for multi-objective studies (a stopped trial would sit on the Pareto "
                "front with a truncated score); every trial runs all epochs")
        asha = {e["fold"]: RecordingASHA(time_attr="training_iteration", max_t=epochs,
                                         grace_period=min(t.grace_period, epochs),
                                         reduction_factor=t.reduction_factor) for e in studies} if use_asha else {}
        searchers = {}
        for e in studies:
            searchers[e["fold"]] = (FersOptunaSearch(
                base_cfg=cfg, epochs=epochs, scheduler=asha.get(e["fold"]), space=_distributions(cfg),
                metric=metrics if multi else metrics[0], mode=modes if multi else modes[0],
                sampler=make_sampler(t.sampler, cfg.train.seed * 7919 + len(e["optuna"].trials) + e["fold"], multi),
                study_name=e["study"], storage=storage), e["remaining"])
            e["run_index"] = st.record_run(e["optuna"], {"trials": e["remaining"], "max_concurrent": max_conc,
                                                         "resources": resources, "pruner": "asha" if asha else "none"})
        searcher = StudySearch(searchers)
        scheduler = StudyASHA(asha) if asha else None
        devices = resources["gpu"] if resources["gpu"] > 0 else resources["cpu"]
        trainable = tune.with_resources(
            tune.with_parameters(tune_trial, base=_worker_config(cfg), outer_fold=t.outer_fold,
                                 inner_folds=t.inner_folds, epochs=epochs, objective=t.objective,
                                 devices_held=devices),
            resources)
        single = {} if multi else {"metric": metrics[0], "mode": modes[0]}
        ray_root = f"{out.rstrip('/')}/ray" if "://" in out else str(Path(out).resolve() / "ray")
        run_name = f"{t.study}-run{studies[0]['run_index']}"
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_conc),
                                        scheduler=scheduler, num_samples=n, reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname, **single),
            run_config=tune.RunConfig(name=run_name, storage_path=ray_root, verbose=0,
                                      callbacks=[ProgressCallback(n, metrics[0], modes[0])]),
        )
        what = studies[0]["study"] if len(studies) == 1 else f"{len(studies)} studies (one per outer fold)"
        log(f"tune: {what}: {n} trial(s), {max_conc} at a time, {resources} each, {epochs} epochs x "
            f"{t.inner_folds} inner folds, sampler {t.sampler}, pruner {'asha' if asha else 'none'}")
        t0 = time.perf_counter()
        bundle = {"CPU": resources["cpu"], "GPU": resources["gpu"]}
        with scaled(cap, [bundle] * min(max_conc, n), cfg.cv.resource_timeout_s, f"{n} tuning trials", log):
            grid = tuner.fit()
        fit_s = time.perf_counter() - t0
        errors = [r.error for r in grid if r.error is not None]
        for e in errors[:3]:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            log(f"tune: a trial failed: {type(e).__name__}: {last}")
        return {"ray_trials": len(grid), "errors": len(errors), "rejected_points": searcher.rejected,
                "asha_stopped": len(scheduler.stopped_early) if scheduler else 0, "max_concurrent": max_conc,
                "fit_s": fit_s, "experiment": f"{ray_root}/{run_name}"}


def _worker_config(cfg: Config) -> dict:
    """The base config the trials get (its paths already resolved on the driver)."""
    return cfg.model_dump(mode="json")


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # short: the params are in the study, not in path names


def _distributions(cfg: Config) -> dict:
    from fers_dist.tune.search_space import distributions

    return distributions(cfg.tune.space)


def evaluate_best_configs(best: list[tuple[int, str]], address: str | None, log, nested: bool) -> dict:
    """Test each study's best config on the ONE outer fold whose subjects that study never saw (its own
    ``tune.outer_fold``), through the normal ``fers cv``, tagged "tuned", all in one CV grid, so the tuned
    and the paper's runs sit side by side in the same experiment's folds.parquet. Every row's config
    records the study (``tune.study``) and trial (``tune.source_trial``) it came from."""
    from fers_dist.cv.cli import Run, run_cv

    tuned = {k: load_config(path) for k, path in best}
    runs = [Run(c.tune.dataset, c.tune.variant, k, cfg=c) for k, c in tuned.items()]
    if not nested:
        (k, path), = best
        log(f"tune: --evaluate-best: {path} on outer fold {k} only: the one fold whose subjects the study never "
            f"saw (its trials trained and validated on the other folds); use --outer-folds to test every fold")
    else:
        log(f"tune: --evaluate-best: each study's best config on its own outer fold ({len(runs)} runs, tag tuned)")
    frame = run_cv(next(iter(tuned.values())), runs, tag="tuned", address=address)
    keys = {(r.dataset, r.variant, r.fold, r.cfg.hash()) for r in runs}
    mine = frame[[(d, v, f, h) in keys for d, v, f, h in zip(frame["dataset"], frame["variant"], frame["fold"],
                                                             frame["config_hash"])]] if len(frame) else frame
    mine = mine[mine["tag"] == "tuned"] if len(mine) else mine
    done = mine[mine["status"] == "finished"] if len(mine) else mine
    return {"runs": len(mine), "finished": len(done), "folds": sorted(int(f) for f in done["fold"]) if len(done) else [],
            "mean_accuracy": float(done["accuracy"].mean()) if len(done) else None}
