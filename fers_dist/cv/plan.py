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


def _clusters(gpus: float | None, cluster: str | None, node_start_min: float) -> list[tuple[str, list]]:
    """(label, [(hour, GPUs from then on)]) per cluster to plan for: ``--cluster FILE`` (a launcher config:
    it starts with its head and min_workers, and grows to its ceiling once the nodes have started), else
    ``--gpus N``, else fixed clusters of 1, 8 and 64 GPUs."""
    if not cluster:
        return [(f"{n:>3g} GPU(s)", [(0.0, n)]) for n in ([gpus] if gpus else [1, 8, 64])]
    import yaml

    from fers_dist.cv.capacity import ceiling_from_launcher

    try:
        config = yaml.safe_load(Path(cluster).read_text())
        ceiling, _ = ceiling_from_launcher(config)
        types, head = config["available_node_types"], config["head_node_type"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise FersError(f"--cluster {cluster}: not a Ray cluster launcher config ({type(e).__name__}: {e})") from None
    start = sum(float(t.get("resources", {}).get("GPU", 0)) * (1 if k == head else int(t.get("min_workers", 0)))
                for k, t in types.items())
    most = ceiling.get("GPU", 0)
    if not most:
        raise FersError(f"--cluster {cluster}: its node types have no GPUs")
    return [(f"{most:g} GPU(s) ({Path(cluster).name}: {start:g} at start)", [(0.0, start), (node_start_min / 60, most)])]


def simulate(work: list[tuple[float, bool]], gpus_per_run: float, timeline: list[tuple[float, float]]
             ) -> tuple[float, int]:
    """Wall-clock hours and the most runs at once for ``work`` ((hours on a whole GPU, is fes_da) per run),
    packed as Ray packs: each run into the lowest-numbered card with room (fractional runs fill one card
    before the next; a run of n >= 1 GPUs takes n cards), a card's throughput shared by its runs, the GPUs
    of ``timeline`` ((from hour, GPUs)), and the fes_da wave only after the first wave has finished."""
    per_card = max(1, math.floor(1 / gpus_per_run + 1e-9)) if gpus_per_run < 1 else 1
    cards_per_run = max(1, math.ceil(gpus_per_run - 1e-9))
    waves = [[h for h, fes in work if not fes], [h for h, fes in work if fes]]
    t, peak, active = 0.0, 0, []  # active: [hours left, card]
    for queue in waves:  # the barrier: the next wave starts when this one is done
        queue = list(queue)
        while queue or active:
            units = int(max(n for at, n in timeline if at <= t + 1e-12) // cards_per_run)
            load = [sum(1 for _, c in active if c == u) for u in range(units)]
            for u in range(units):
                while queue and load[u] < per_card:
                    active.append([queue.pop(0), u])
                    load[u] += 1
            peak = max(peak, len(active))
            arrival = min((at for at, _ in timeline if at > t + 1e-12), default=math.inf)
            if not active and arrival == math.inf:
                raise FersError("the cluster has no GPUs to plan for (--gpus, --cluster)")
            step = min([left * load[c] for left, c in active], default=math.inf)
            if arrival - t <= step:  # nodes join first: land exactly on their hour
                step, t = arrival - t, arrival
            else:
                t += step
            for a in active:
                a[0] -= step / load[a[1]]
            active = [a for a in active if a[0] > 1e-9]
    return t, peak


def print_plan(cfg: Config, runs: list, images_per_s: float | None = None, gpus: float | None = None,
               bench: str | None = None, cluster: str | None = None, node_start_min: float = 5.0) -> dict:
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
    work = [(per[(r.dataset, r.variant, r.fold, r.seed)], r.variant == "fes_da") for r in runs]
    g = cfg.cv.gpus_per_run or 1.0  # a CPU run is priced as one GPU's worth of work
    for label, timeline in _clusters(gpus, cluster, node_start_min):
        wall, peak = simulate(work, g, timeline)
        print(f"  {label}: up to {peak} runs at once ({per_gpu} per GPU), wall clock ≈ {wall:.2f} h, "
              f"{sum(per.values()):.1f} GPU-hours")
        out[f"wall_h_{label.split(' ')[0]}"] = wall
    print("  (assumes: Ray fills one card with fractional runs before the next, a packed card's throughput is "
          "shared by its runs, fes_da starts only after every original has finished, runs start the moment a "
          "slot is free, no failures or preemptions" + (f", new nodes join {node_start_min:g} min after fers cv "
                                                      f"asks for them" if cluster else "") + ")")
    print(f"paper's sequential cost: ~5 h per model on a GTX 1080 Ti -> ~{len(runs) * 5} GPU-hours")
    if cfg.cv.gpus_per_run > 0 and runs:
        w = max(1, cfg.cv.workers_per_run)
        est = run_memory(cfg, list(dict.fromkeys(r.dataset for r in runs)), cfg.train.batch_size // w)
        share = f"{cfg.cv.gpus_per_run / w:g} GPU" + (f" = {cfg.cv.gpus_per_run / w * cfg.cv.gpu_memory_gb:.0f} GB"
                                                        if cfg.cv.gpu_memory_gb else "")
        print(f"memory per run process: {est.line()}, estimated; its share: {share}")
        out["memory_estimate_gb"] = est.total_gb
    return out
