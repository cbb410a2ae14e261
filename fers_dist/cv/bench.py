"""`fers bench cv`: the same small CV grid (synthetic CK+, the demo model) run twice — through Ray
(`run_cv`: Tune grid of Train runs) and serially in plain PyTorch (`fit_fold` in a loop) — printing both wall
times, the concurrency, the efficiency serial / (Ray x concurrency) and the per-run overhead in seconds."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers-per-run", type=int, default=0, help="0: Train local mode; >=1 real workers")
    p.add_argument("--variants", default="no_mtl,original")
    p.add_argument("--folds", type=int, default=4, help="folds 0..N-1 of the 10")
    p.add_argument("--epochs", type=int, default=12, help="epochs per run (longer folds amortise start-up)")
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--cpus-per-run", type=float, default=1.0)
    p.add_argument("--workdir", help="keep data and results here (default: a temporary folder)")


def bench(args: argparse.Namespace) -> dict:
    import ray

    from fers_dist.config import DEMO_YAML, load_config
    from fers_dist.cv.cli import plan_runs, run_cv
    from fers_dist.cv.resources import free_resources, plan_resources
    from fers_dist.data.loader import load_faces
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize
    from fers_dist.train.fold import fit_fold

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fers-bench-cv-"))
    variants = args.variants.split(",")
    cfg = load_config(DEMO_YAML, {
        "data.root": str(work / "data"), "cv.storage": str(work / "results"), "cv.datasets": ["ckplus"],
        "cv.variants": variants, "cv.folds": list(range(args.folds)), "train.epochs": args.epochs,
        "cv.workers_per_run": args.workers_per_run, "cv.cpus_per_run": args.cpus_per_run,
        "cv.experiment": f"bench-w{args.workers_per_run}-{int(time.time())}"})
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        if not (work / "data" / "ckplus" / "faces.parquet").exists():
            synthesize("ckplus", work / "raw", subjects=args.subjects, seed=0, size=160, progress=False)
            prepare("ckplus", work / "raw", work / "data", size=cfg.data.aligned_size, log=lambda *a: None)
        runs = plan_runs(cfg)
        concurrency = plan_resources(cfg.cv, free_resources(), len(runs)).max_concurrent
        t0 = time.perf_counter()
        frame = run_cv(cfg, runs)
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    import torch

    torch.set_num_threads(max(1, int(args.cpus_per_run)))  # same CPU share as one Ray run
    faces = load_faces(cfg.data.root, "ckplus")
    t0 = time.perf_counter()
    for r in runs:
        fit_fold(cfg.with_overrides({"model.variant": r.variant}), faces, r.fold, log=lambda m: None)
    serial_s = time.perf_counter() - t0
    return {"bench": "cv", "workers_per_run": args.workers_per_run, "runs": len(runs),
            "finished": int((frame["status"] == "finished").sum()), "epochs": args.epochs,
            "ray_wall_s": round(ray_s, 1), "serial_wall_s": round(serial_s, 1), "concurrency": concurrency,
            "efficiency": round(serial_s / (ray_s * concurrency), 3),
            "overhead_per_run_s": round((ray_s * concurrency - serial_s) / len(runs), 1)}
