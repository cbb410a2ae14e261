"""Cross-validation on Ray: datasets x variants x folds, each a Ray Train run of ``fit_fold`` launched
from a Tune grid, packed onto the cluster, resumable, with one folds.parquet row per finished run.

  fers cv --config jobs/configs/paper.yaml --datasets ckplus,oulu,mmi \\
          --variants no_mtl,no_convflu,original,fes_da --folds all --storage PATH_OR_URI

Runs embedded Ray on a laptop, or joins a cluster via --address / RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace

from fers_dist.config import DATASETS, VARIANTS, Config, add_set_argument, load_config
from fers_dist.errors import FersError
from fers_dist.paths import resolve_paths
from fers_dist.train.pretrain import check_pretrained, default_tag, pretrained_uri


@dataclass(frozen=True)
class Run:
    dataset: str
    variant: str
    fold: int
    seed: int | None = None  # cv.seeds: this repeat's train.seed (None: the config's own)
    cfg: Config | None = field(default=None, compare=False, repr=False)  # its own config (a tuned fold), else the grid's
    tag: str | None = None  # its rows' tag, else run_cv's (a demo's showcase run beside the grid, in one Tune run)

    def config(self, grid: Config) -> Config:
        base = self.cfg or grid
        return base if self.seed is None or self.seed == base.train.seed else base.with_overrides({"train.seed": self.seed})

    def run_config(self, grid: Config) -> Config:
        """The config this run trains under: its :meth:`config` with its variant."""
        return self.config(grid).with_overrides({"model.variant": self.variant})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config over the paper defaults (jobs/configs/paper.yaml)")
    p.add_argument("--datasets", help=f"comma list from {','.join(DATASETS)} (default: cv.datasets)")
    p.add_argument("--variants", help=f"comma list from {','.join(VARIANTS)} (default: cv.variants)")
    p.add_argument("--folds", help="'all' or a comma list of fold indices (default: cv.folds)")
    p.add_argument("--storage", help="results root: local path or s3:// / gs:// URI (default: cv.storage)")
    p.add_argument("--data-root", help="prepared data root holding <dataset>/faces.parquet (default: data.root)")
    p.add_argument("--experiment", help="experiment name (default: cv.experiment)")
    p.add_argument("--resume", metavar="NAME", help="resume experiment NAME: re-run only unfinished runs")
    p.add_argument("--tag", help="row tag, e.g. 'tuned' for runs with tuned λ (default: 'pretrained' with "
                                 "train.init_from, else 'paper')")
    p.add_argument("--workers-per-run", type=int, help="override cv.workers_per_run (0 = local mode)")
    p.add_argument("--gpus-per-run", type=float, help="override cv.gpus_per_run (0.25 packs 4 per GPU)")
    p.add_argument("--cpus-per-run", type=float, help="override cv.cpus_per_run (split across the run's workers)")
    p.add_argument("--max-gpus", type=float, help="cv.max_gpus: the most GPUs the cluster can grow to (default: "
                                                  "the autoscaler's config)")
    p.add_argument("--shared-filesystem", action="store_true", default=None,
                   help="cv.shared_filesystem: the local paths (data root, storage) hold the same files on every "
                        "node (NFS, a per-node copy of the read-only data, or one machine)")
    p.add_argument("--mlflow", metavar="URI", help="cv.tracking.mlflow: log every fold run to this MLflow server")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimates; start nothing")
    p.add_argument("--images-per-s", type=float,
                   help="--dry-run: measured training images/s per GPU (fers bench train) instead of the projection")
    p.add_argument("--bench", metavar="FILE", help="--dry-run: throughput measured by `fers bench gpu --out FILE` "
                                                   "(the figure matching this config) instead of the projection")
    p.add_argument("--gpus", type=float, help="--dry-run: plan for this many GPUs (default: 1, 8 and 64)")
    p.add_argument("--cluster", metavar="FILE", help="--dry-run: plan for this launcher config (cluster/aws.yaml): "
                                                     "it starts at min_workers and grows to max_workers")
    p.add_argument("--node-start-min", type=float, default=5.0,
                   help="--dry-run --cluster: minutes a new node takes to join (default 5)")
    add_set_argument(p)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict = {}
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    if args.datasets:
        overrides["cv.datasets"] = split(args.datasets)
    if args.variants:
        overrides["cv.variants"] = split(args.variants)
    if args.folds:
        overrides["cv.folds"] = "all" if args.folds == "all" else [_int(f, "--folds") for f in split(args.folds)]
    for flag, key in (("storage", "cv.storage"), ("data_root", "data.root"), ("experiment", "cv.experiment"),
                      ("resume", "cv.experiment"), ("workers_per_run", "cv.workers_per_run"),
                      ("gpus_per_run", "cv.gpus_per_run"), ("cpus_per_run", "cv.cpus_per_run"), ("max_gpus", "cv.max_gpus"),
                      ("shared_filesystem", "cv.shared_filesystem"), ("mlflow", "cv.tracking.mlflow")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return load_config(args.config, overrides, getattr(args, "sets", None))


def _int(s: str, flag: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise FersError(f"{flag}: {s!r} is not a fold index") from None


def plan_runs(cfg: Config) -> list[Run]:
    """Every run, with each fes_da run's original run for the same fold (FES-DA starts from it)."""
    folds = range(cfg.data.n_folds) if cfg.cv.folds == "all" else cfg.cv.folds
    bad = [f for f in folds if not 0 <= f < cfg.data.n_folds]
    if bad:
        raise FersError(f"cv.folds: {bad} out of range 0..{cfg.data.n_folds - 1} (data.n_folds={cfg.data.n_folds})")
    variants = list(dict.fromkeys(cfg.cv.variants))
    if "fes_da" in variants and "original" not in variants:
        variants.insert(variants.index("fes_da"), "original")
    seeds = list(dict.fromkeys(cfg.cv.seeds)) if cfg.cv.seeds else [cfg.train.seed]
    return [Run(d, v, f, s) for d in dict.fromkeys(cfg.cv.datasets) for v in variants for f in folds for s in seeds]


def check_inputs(cfg: Config, runs: list[Run]) -> None:
    """Clear errors before any run starts: missing Parquet folders, unwritable storage."""
    from fers_dist.data.loader import parquet_path
    from fers_dist.results import check_writable

    for ds in dict.fromkeys(r.dataset for r in runs):
        path = parquet_path(cfg.data.root, ds)
        if "://" not in cfg.data.root and not path.exists():
            raise FersError(f"{path}: no prepared {ds} dataset (run: fers prepare --dataset {ds} "
                            f"--root RAW_{ds.upper()} --out {cfg.data.root})")
    check_writable(cfg.cv.storage)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    runs = plan_runs(cfg)
    if args.dry_run:
        from fers_dist.cv.plan import print_plan

        print_plan(cfg, runs, args.images_per_s, args.gpus, args.bench, args.cluster, args.node_start_min)
        return 0
    frame = run_cv(cfg, runs, tag=args.tag, address=args.address)
    from fers_dist.cv.progress import summary_table

    print(summary_table(frame))
    return 0 if len(frame) and (frame["status"] == "finished").all() else 1


def run_cv(cfg: Config, runs: list[Run] | None = None, tag: str | None = None, address: str | None = None):
    """Run every unfinished run of ``cfg``'s grid (or ``runs``); returns the experiment's folds.parquet as a
    frame. ``tag`` (the rows' tag, where a Run names none): default ``pretrained`` for runs starting from
    ``train.init_from``, else ``paper``."""
    from fers_dist.cv.capacity import describe as ceiling_line
    from fers_dist.cv.capacity import driver_resources, plan_capacity, scaled
    from fers_dist.cv.resources import (
        alive_nodes,
        check_fits_one_node,
        check_gpu_memory,
        check_placeable,
        describe,
        free_resources,
        plan_resources,
        ray_session,
        run_bundles,
    )
    from fers_dist.results import folds_uri, read_folds

    cfg = resolve_paths(cfg)  # every path absolute on the driver: trials and workers chdir
    runs = runs if runs is not None else plan_runs(cfg)
    check_inputs(cfg, runs)
    for c in {pretrained_uri(c): c for c in (r.run_config(cfg) for r in runs)}.values():
        check_pretrained(c)  # before any run: each variant and seed starts from its own pre-trained model
    tag = tag or default_tag(cfg)
    storage, experiment = cfg.cv.storage, cfg.cv.experiment
    say = lambda m: print(m, file=sys.stderr, flush=True)
    with ray_session(address, quiet=True):
        nodes = alive_nodes()
        free = free_resources()
        cap = plan_capacity(cfg.cv, free)
        check_placeable(cfg, len(nodes) + (1 if cap.elastic else 0))
        check_fits_one_node(cfg.cv, nodes + cap.node_types)
        w = max(1, cfg.cv.workers_per_run)
        check_gpu_memory(cfg, nodes, cfg.cv.gpus_per_run / w, cfg.train.batch_size // w, "cv.gpus_per_run", log=say)
        done = _finished(read_folds(folds_uri(storage, experiment)))
        todo = [r for r in runs if (r.dataset, r.variant, r.fold, r.config(cfg).hash(), r.tag or tag) not in done]
        say(f"fers cv: {experiment}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run")
        res = plan_resources(cfg.cv, cap.plan, len(todo) or None)
        if res.workers:  # the driver (Tune trial + Train controller) on a node that is never preempted
            res = replace(res, trial={**res.trial, **driver_resources(cfg.cv, cap, nodes, say)})
        say(f"fers cv: {describe(res, cap.plan)}" + (f"; {ceiling_line(cap)}" if cap.ceiling else ""))
        first = [r for r in todo if r.variant != "fes_da"]
        second = [r for r in todo if r.variant == "fes_da"]
        with scaled(cap, run_bundles(res) * res.max_concurrent, cfg.cv.resource_timeout_s,
                    f"{len(todo)} runs at cv.gpus_per_run={cfg.cv.gpus_per_run:g}", say):
            for wave in (first, second):
                if wave:  # fes_da (second wave) reuses only originals that FINISHED under this config
                    _run_wave(cfg, wave, res, tag, _finished(read_folds(folds_uri(storage, experiment))))
        return read_folds(folds_uri(storage, experiment))


def _finished(frame) -> set[tuple]:
    """(dataset, variant, fold, config hash, tag) of every finished run."""
    if not len(frame):
        return set()
    done = frame[frame["status"] == "finished"]
    return set(zip(done["dataset"], done["variant"], done["fold"], done["config_hash"], done["tag"]))


def _trial_name(trial) -> str:
    """Trials (and their TensorBoard folders) are named by run: ``ckplus-original-f3``."""
    from fers_dist.results import run_name

    c = trial.config["run"]
    return run_name(c["dataset"], c["variant"], c["fold"], c["tag"], c["cfg"]["train"]["seed"])


def _run_wave(cfg: Config, wave: list[Run], res, tag: str, finished: set[tuple]) -> None:
    from ray import tune

    from fers_dist.cv.fold_run import checkpoint_home, fold_trial
    from fers_dist.cv.progress import ProgressTable, RowWriter
    from fers_dist.results import run_key
    from fers_dist.storage import exists

    storage, experiment = cfg.cv.storage, cfg.cv.experiment
    configs = []
    for r in wave:
        run_cfg, run_tag = r.run_config(cfg), r.tag or tag
        h = run_cfg.hash()
        init_from = None
        if r.variant == "fes_da" and (r.dataset, "original", r.fold, h, run_tag) in finished:
            # reuse the original model of the same fold and config (same hash), never a half-trained one
            home = checkpoint_home(storage, experiment, run_key(r.dataset, "original", r.fold, run_tag, h,
                                                                run_cfg.train.seed))
            main = f"{home}/main.pt"
            init_from = main if exists(main) else None
        configs.append({"dataset": r.dataset, "variant": r.variant, "fold": r.fold, "tag": run_tag,
                        "cfg": run_cfg.model_dump(mode="json"), "storage": storage, "experiment": experiment,
                        "workers": res.workers, "worker": res.worker, "max_failures": cfg.cv.max_failures,
                        "init_from": init_from})
    tuner = tune.Tuner(
        tune.with_resources(fold_trial, res.trial),
        param_space={"run": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=f"{storage.rstrip('/')}/{experiment}",
            # worker mode too: a lost driver (its node preempted) restarts, and the run resumes from its checkpoint
            failure_config=tune.FailureConfig(max_failures=cfg.cv.max_failures),
            callbacks=[RowWriter(storage, experiment), ProgressTable(len(wave))],
            verbose=0,
        ),
    )
    tuner.fit()
