"""``fers cv --dry-run``: the plan without starting Ray — number of runs, GPU-hours, packing, wall clock.

Throughput, in this order: ``--images-per-s``; ``--bench FILE``, the JSON of ``fers bench gpu --out FILE``
(the figure that matches the config: packed runs' total when ``cv.gpus_per_run`` < 1, else one run, bf16 or
fp32, eager or compiled); else a PROJECTION from counted FLOPs: 0.442 TFLOP per training image (fers bench
model, width 256, 96x96) at 35% MFU of an H100's 989 dense bf16 TFLOP/s = 783 images/s. The plan says which.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from fers_dist.config import Config, num_classes
from fers_dist.errors import FersError

PROJECTED_IMAGES_PER_S = 0.35 * 989e12 / 0.442e12  # ≈ 783, see module docstring
PAPER_IMAGES = {"ckplus": 981, "oulu": 1440, "mmi": 624, "bu4dfe": 60600}  # Table I


def dataset_images(cfg: Config, dataset: str) -> tuple[int, str]:
    manifest = Path(cfg.data.root) / dataset / "manifest.json"
    if manifest.exists():
        return int(json.loads(manifest.read_text())["n_images"]), "prepared manifest"
    return PAPER_IMAGES[dataset], "paper Table I"


def run_hours(cfg: Config, dataset: str, variant: str, images_per_s: float) -> float:
    n, _ = dataset_images(cfg, dataset)
    n_train = n * (cfg.data.n_folds - 1) / cfg.data.n_folds
    seen = 0.0 if variant == "fes_da" else cfg.train.epochs * n_train  # fes_da reuses original's run
    if variant == "fes_da":
        seen += cfg.train.fes_da_epochs * n_train * num_classes(dataset) / 3  # cls-only steps cost ~1/3
    if variant == "no_mtl":
        seen /= 2.2  # counted: 0.202 vs 0.442 TFLOP per training image
    return seen / images_per_s / 3600


def run_memory(cfg: Config, datasets: list[str], batch: int, models: int = 1):
    """The estimated CUDA memory of one run process (``train/memory.py``) on the largest of ``datasets``."""
    from fers_dist.train.memory import estimate_memory

    n_images = max(dataset_images(cfg, d)[0] for d in datasets)
    return estimate_memory(cfg, n_images, max(num_classes(d) for d in datasets), "cuda", batch_size=batch,
                           models=models)


def bench_throughput(cfg: Config, path: str) -> tuple[float, str]:
    """Training images/s per GPU from a ``fers bench gpu --out`` JSON, for this config."""
    try:
        bench = json.loads(Path(path).read_text())
        summary, sections = bench["summary"], bench["sections"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FersError(f"--bench {path}: not a fers bench gpu JSON ({type(e).__name__}: {e})") from None
    if cfg.cv.gpus_per_run < 1 and summary.get("packed_total_images_per_s"):
        key, what = "packed_total_images_per_s", f"{sections['packed']['processes']} packed runs, total"
    else:
        name = "step_bf16" if cfg.train.amp else "step_fp32"
        name += "_compiled" if cfg.train.compile and cfg.train.amp else ""
        key, what = f"{name}_images_per_s", name.replace("_", " ")
    if not summary.get(key):
        raise FersError(f"--bench {path}: has no {key} figure (that section was skipped or failed)")
    card = sections.get("step_bf16", {}).get("device", bench.get("device", "?"))
    note = "" if bench.get("scale") == "paper" else f", {bench.get('scale')} scale, NOT the paper's"
    return float(summary[key]), f"measured by fers bench gpu on {card} ({what}{note})"


def print_plan(cfg: Config, runs: list, images_per_s: float | None = None, gpus: float | None = None,
               bench: str | None = None) -> dict:
    ips, source = PROJECTED_IMAGES_PER_S, "projected from counted FLOPs at 35% MFU: no GPU figure given (--bench)"
    if images_per_s:
        ips, source = images_per_s, "measured (--images-per-s)"
    elif bench:
        ips, source = bench_throughput(cfg, bench)
    per = {(r.dataset, r.variant, r.fold, r.seed): run_hours(cfg, r.dataset, r.variant, ips) for r in runs}
    per_gpu = max(1, math.floor(1 / cfg.cv.gpus_per_run + 1e-9)) if cfg.cv.gpus_per_run else 1
    seeds = list(dict.fromkeys(r.seed for r in runs))
    print(f"experiment {cfg.cv.experiment}: {len(runs)} runs "
          f"({', '.join(f'{k} x{v}' for k, v in Counter(r.dataset for r in runs).items())}; "
          f"variants {', '.join(dict.fromkeys(r.variant for r in runs))}"
          + (f"; {len(seeds)} seeds {', '.join(map(str, seeds))} each" if len(seeds) > 1 else "") + ")")
    for ds in dict.fromkeys(r.dataset for r in runs):
        n, src = dataset_images(cfg, ds)
        print(f"  {ds}: {n} images ({src}), {cfg.data.n_folds} folds, {cfg.train.epochs} epochs")
    print(f"throughput: {ips:.0f} training images/s per full GPU ({source})")
    out = {"runs": len(runs), "run_hours": sum(per.values())}
    for n_gpus in ([gpus] if gpus else [1, 8, 64]):
        share = min(per_gpu, math.ceil(len(runs) / n_gpus))  # runs actually sharing one GPU
        slots = int(n_gpus * share)
        # runs sharing a GPU each get 1/share of it, so a packed run takes share times longer
        waves = math.ceil(len(runs) / slots)
        wall = max(sum(per.values()) / n_gpus, max(per.values()) * share) if runs else 0
        print(f"  {n_gpus:>3} GPU(s): {slots} concurrent runs ({share} per GPU), ~{waves} waves, "
              f"wall clock ≈ {wall:.2f} h, {sum(per.values()):.1f} GPU-hours")
        out[f"wall_h_{n_gpus}"] = wall
    print(f"paper's sequential cost: ~5 h per model on a GTX 1080 Ti -> ~{len(runs) * 5} GPU-hours")
    if cfg.cv.gpus_per_run > 0 and runs:
        w = max(1, cfg.cv.workers_per_run)
        est = run_memory(cfg, list(dict.fromkeys(r.dataset for r in runs)), cfg.train.batch_size // w)
        share = f"{cfg.cv.gpus_per_run / w:g} GPU" + (f" = {cfg.cv.gpus_per_run / w * cfg.cv.gpu_memory_gb:.0f} GB"
                                                        if cfg.cv.gpu_memory_gb else "")
        print(f"memory per run process: {est.line()}, estimated; its share: {share}")
        out["memory_estimate_gb"] = est.total_gb
    return out
