"""``fers bench prepare``: images/s of the Ray Data prepare pipeline against a single-process loop
doing the same decode + align + PNG encode on the same records, as a ratio in one run.

Faces are synthesised into a temporary folder first (not timed) and read with the real layout
reader. Ray is started before the timed part (its start-up is reported separately); the workers'
start-up IS timed, as is collecting the results on the driver. With ``--repeats`` (default 3) the two
paths run alternately (so both see the same load on a shared machine) and the best time of each is
reported, with every run and the 1-minute load average before and after each pair. The first Ray run
of a session is reported on its own (``speedup_first_run``): it also starts Ray Data's helper actors
and imports ``ray.data`` and OpenCV into the workers. With ``--compute tasks`` later runs find both
(as a job's second and later datasets do: ``fers demo`` prepares two); pool actors are new processes
for every dataset, and a new Ray job gets new workers.

On Linux each run also says where the CPU went (``fers_dist.cpustat``): the driver, the map workers,
Ray Data's helper actors, Ray's daemons and anything else on the machine. Given several ``--images``
sizes, it fits ``ray_s = fixed + per_image * n`` and ``serial_s = per_image * n`` over the best runs
and reports the size at which the Ray path reaches 1.5x and 2x.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SCALING_SIZE = (960, 400)  # pixels of the --plot figure


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fers_dist.data.prepare import COMPUTE

    p.add_argument("--images", type=int, nargs="+", default=[2000],
                   help="faces to prepare; several sizes (e.g. 1000 2000 4000) also fit the break-even size")
    p.add_argument("--layout", default="ckplus", choices=("ckplus", "oulu", "mmi", "bu4dfe"))
    p.add_argument("--aligner", default="landmarks", choices=("landmarks", "dlib", "center", "fan"),
                   help="landmarks reads the synthetic landmarks files")
    p.add_argument("--dlib-upsample", type=int, default=0, help="dlib: detector upsampling (0 suits 640x490)")
    p.add_argument("--image-size", type=int, default=640,
                   help="synthetic frame width; height follows the layout (CK+: 640x490, as the real frames)")
    p.add_argument("--size", type=int, default=110, help="aligned face size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--compute", choices=COMPUTE, default="auto",
                   help="Ray Data compute, as in fers prepare (auto: actors for fan/dlib, tasks otherwise)")
    p.add_argument("--actors", type=int, help="aligner actors or concurrent tasks (default: one per CPU)")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating timed runs of each path; the best is reported, and the first apart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", help="keep the synthetic faces in DIR (reused when it already holds enough)")
    p.add_argument("--plot", metavar="PNG", help="with several --images sizes: save the scaling plot here")


def _records(args, folder: str, n: int):
    from fers_dist.data.layouts import get_dataset
    from fers_dist.data.synthetic import synthesize

    if args.raw and Path(folder).is_dir() and any(Path(folder).iterdir()):
        records = get_dataset(args.layout).read(folder).records
        if len(records) >= n:
            return records[:n]
    per_subject = 13 if args.layout == "ckplus" else 18  # faces per subject with 3-frame sequences
    subjects = max(2, -(-n * 9 // (8 * per_subject)))
    while True:  # 3-frame sequences: every drawn frame is used (CK+ still draws unlabelled sequences)
        synthesize(args.layout, folder, subjects, seed=args.seed, size=args.image_size, frames=(3, 3))
        records = get_dataset(args.layout).read(folder).records
        if len(records) >= n:
            return records[:n]
        subjects = subjects * 2


def _timed(fn) -> tuple[float, object, dict]:
    """(wall seconds, fn's result, where the CPU went meanwhile)."""
    from fers_dist.cpustat import CPUAccount

    with CPUAccount() as acc:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    return wall, out, acc.summary()


def _same_outcome(serial, par, n: int) -> int:
    """Both paths returned every record and rejected the same faces; returns how many were rejected."""
    outcome = {}
    for name, out in (("serial", serial), ("ray", par)):
        if out.num_rows != n:
            raise RuntimeError(f"bench prepare: the {name} path returned {out.num_rows} rows for {n} records")
        outcome[name] = dict(zip(out["path"].to_pylist(), (bool(r) for r in out["reason"].to_pylist())))
    if outcome["serial"] != outcome["ray"]:
        raise RuntimeError("bench prepare: the serial and Ray paths rejected different faces")
    return sum(outcome["serial"].values())


def _one_size(records, folder: str, common: dict, ray_kw: dict, repeats: int) -> dict:
    from fers_dist.data import prepare as prep
    from fers_dist.data.align import align_serial

    table = prep.input_table(records, folder)
    runs = {"serial": [], "ray": []}
    loads = [os.getloadavg()[0]]
    for _ in range(repeats):  # alternate the paths so both see the same (shared-machine) load
        runs["serial"].append(_timed(lambda: align_serial(table, **common, progress=True)))
        runs["ray"].append(_timed(lambda: prep.align_with_ray(table, **common, **ray_kw)))
        loads.append(os.getloadavg()[0])
    n = len(records)
    rejected = _same_outcome(runs["serial"][-1][1], runs["ray"][-1][1], n)
    serial_s = min(t for t, _, _ in runs["serial"])
    ray_s = min(t for t, _, _ in runs["ray"])
    for name in ("serial", "ray"):
        for i, (t, _, cpu) in enumerate(runs[name]):
            if cpu:
                print(f"{n} faces, {name} run {i + 1}: {t:.2f} s wall; CPU-s "
                      + ", ".join(f"{k} {v}" for k, v in cpu.items()), file=sys.stderr)
    return {
        "images": n, "serial_s": round(serial_s, 2), "serial_images_per_s": round(n / serial_s, 1),
        "ray_s": round(ray_s, 2), "ray_images_per_s": round(n / ray_s, 1),
        "speedup": round(serial_s / ray_s, 2),
        "speedup_first_run": round(runs["serial"][0][0] / runs["ray"][0][0], 2),
        "serial_runs_s": [round(t, 2) for t, _, _ in runs["serial"]],
        "ray_runs_s": [round(t, 2) for t, _, _ in runs["ray"]],
        "serial_cpu_s": [cpu for _, _, cpu in runs["serial"]], "ray_cpu_s": [cpu for _, _, cpu in runs["ray"]],
        "rejected": rejected, "load_avg_1min": [round(v, 2) for v in loads],
    }


def break_even(sizes: list[int], serial_s: list[float], ray_s: list[float]) -> dict:
    """Fit ``serial_s = c*n`` and ``ray_s = a + b*n`` (least squares) and solve ``c*n / (a + b*n) = r``
    for r = 1.5 and 2: ``n = r*a / (c - r*b)``, or None when the Ray path never gets there
    (``c / b``, its speed-up on unlimited images, is below r)."""
    import numpy as np

    n = np.asarray(sizes, float)
    c = float(np.dot(n, serial_s) / np.dot(n, n))
    b, a = (float(v) for v in np.polyfit(n, np.asarray(ray_s, float), 1))
    out = {"serial_ms_per_image": round(c * 1e3, 3), "ray_fixed_s": round(a, 2),
           "ray_ms_per_image": round(b * 1e3, 3), "speedup_unlimited": round(c / b, 2) if b > 0 else None}
    for r, key in ((1.5, "images_for_1.5x"), (2.0, "images_for_2x")):
        gap = c - r * b  # > 0: each extra image gains on the serial loop at ratio r
        out[key] = None if gap <= 1e-6 * c else 0 if a <= 1e-6 else int(np.ceil(r * a / gap))
    return out


def bench(args: argparse.Namespace) -> dict:
    from fers_dist.data import prepare as prep
    from fers_dist.errors import FersError

    sizes = sorted(set(args.images))
    if sizes[0] < 1:
        raise FersError(f"prepare: --images must be positive, got {sizes[0]}")
    if args.repeats < 1:
        raise FersError(f"prepare: --repeats must be at least 1, got {args.repeats}")
    if args.plot and len(sizes) < 2:
        raise FersError("prepare: --plot needs at least two --images sizes (e.g. --images 1000 2000 4000)")
    with tempfile.TemporaryDirectory(prefix="fers-bench-prepare-") as tmp:
        folder = args.raw or tmp
        print(f"synthetic {args.layout} faces in {folder} (not timed) ...", file=sys.stderr)
        records = _records(args, folder, sizes[-1])
        opts = {"upsample": args.dlib_upsample} if args.aligner == "dlib" else {}
        common = {"aligner": args.aligner, "size": args.size, "batch_size": args.batch_size, "aligner_opts": opts}
        t0 = time.perf_counter()
        ray, started = prep.start_ray()
        ray_init_s = time.perf_counter() - t0
        try:
            actors = prep.pool_size(ray, None, args.actors)
            ray_kw = {"actors": args.actors, "compute": args.compute}
            per_size = [_one_size(records[:n], folder, common, ray_kw, args.repeats) for n in sizes]
        finally:
            if started:
                ray.shutdown()
    head = {
        "bench": "prepare", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.system()})",
        "layout": args.layout, "aligner": args.aligner, "image_size": args.image_size,
        "aligned_size": args.size, "batch_size": args.batch_size, "actors": actors, "repeats": args.repeats,
        "compute": prep.resolve_compute(args.compute, args.aligner, None),
        "ray_init_s": round(ray_init_s, 2),
    }
    if len(sizes) == 1:
        return {**head, **per_size[0]}
    serial_s, ray_s = [r["serial_s"] for r in per_size], [r["ray_s"] for r in per_size]
    fit = break_even(sizes, serial_s, ray_s)
    if args.plot:
        title = (f"fers bench prepare: {args.aligner} aligner, {actors} {head['compute']}, {head['machine']}, "
                 f"best of {args.repeats}")
        scaling_plot(sizes, serial_s, ray_s, fit, title, args.plot)
        print(f"scaling plot: {args.plot}", file=sys.stderr)
    return {**head, "sizes": per_size, "fit": fit}


def scaling_plot(sizes: list[int], serial_s: list[float], ray_s: list[float], fit: dict, title: str,
                 path: str | Path) -> Path:
    """``fers bench prepare`` over several sizes, ``SCALING_SIZE`` pixels: wall time of each path (left)
    and the Ray path's speed-up (right), measured points with the fitted lines and the 1.5x target."""
    import numpy as np

    from fers_dist.plotting import figure, save_png

    fig = figure(SCALING_SIZE)
    left, right = fig.subplots(1, 2)
    n = np.linspace(0, max(max(sizes), fit.get("images_for_1.5x") or 0) * 1.1, 200)
    c, a, b = fit["serial_ms_per_image"] / 1e3, fit["ray_fixed_s"], fit["ray_ms_per_image"] / 1e3
    left.plot(sizes, serial_s, "o", color="tab:gray", label=f"single-process loop ({c * 1e3:.2f} ms/face)")
    left.plot(n, c * n, "-", color="tab:gray", lw=1)
    left.plot(sizes, ray_s, "s", color="tab:blue", label=f"Ray Data ({a:.1f} s + {b * 1e3:.2f} ms/face)")
    left.plot(n, a + b * n, "-", color="tab:blue", lw=1)
    left.set(xlabel="faces", ylabel="wall seconds (best run)", xlim=(0, n[-1]), ylim=(0, None))
    left.legend(loc="upper left", fontsize=8)
    right.plot(sizes, np.asarray(serial_s) / np.asarray(ray_s), "s", color="tab:blue", label="measured")
    m = n[1:]
    right.plot(m, c * m / (a + b * m), "-", color="tab:blue", lw=1, label="fit")
    right.axhline(1.5, ls="--", color="tab:red", lw=1, label="1.5x target")
    right.axhline(1.0, ls=":", color="black", lw=0.8)
    if fit.get("images_for_1.5x"):
        right.axvline(fit["images_for_1.5x"], ls=":", color="tab:red", lw=0.8)
    top = max(2.1, (fit["speedup_unlimited"] or 0) * 1.05)
    right.set(xlabel="faces", ylabel="speed-up (serial / Ray)", xlim=(0, n[-1]), ylim=(0, top))
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
