"""``fers bench prepare``: images/s of the Ray Data prepare pipeline against a single-process loop
doing the same decode + align + PNG encode on the same records, as a ratio in one run.

Faces are synthesised into a temporary folder first (not timed) and read with the real layout
reader. Ray is started before the timed part (its start-up is reported separately); the actor pool's
start-up IS timed, as is collecting the results on the driver. With ``--repeats`` the two paths run
alternately (so both see the same load on a shared machine) and the best time of each is reported,
with every run and the 1-minute load average before and after each pair.
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=2000, help="faces to prepare (at least this many are drawn)")
    p.add_argument("--layout", default="ckplus", choices=("ckplus", "oulu", "mmi", "bu4dfe"))
    p.add_argument("--aligner", default="landmarks", choices=("landmarks", "dlib", "center", "fan"),
                   help="landmarks reads the synthetic landmarks files")
    p.add_argument("--dlib-upsample", type=int, default=0, help="dlib: detector upsampling (0 suits 640x490)")
    p.add_argument("--image-size", type=int, default=640,
                   help="synthetic frame width; height follows the layout (CK+: 640x490, as the real frames)")
    p.add_argument("--size", type=int, default=110, help="aligned face size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--actors", type=int, help="aligner actors (default: one per CPU)")
    p.add_argument("--repeats", type=int, default=1, help="alternating timed runs of each path; best reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", help="keep the synthetic faces in DIR (reused when it already holds enough)")


def _records(args, folder: str):
    from fers_dist.data.layouts import get_dataset
    from fers_dist.data.synthetic import synthesize

    if args.raw and Path(folder).is_dir() and any(Path(folder).iterdir()):
        records = get_dataset(args.layout).read(folder).records
        if len(records) >= args.images:
            return records[: args.images]
    per_subject = 13 if args.layout == "ckplus" else 18  # faces per subject with 3-frame sequences
    subjects = max(2, -(-args.images * 9 // (8 * per_subject)))
    while True:  # 3-frame sequences: every drawn frame is used (CK+ still draws unlabelled sequences)
        synthesize(args.layout, folder, subjects, seed=args.seed, size=args.image_size, frames=(3, 3))
        records = get_dataset(args.layout).read(folder).records
        if len(records) >= args.images:
            return records[: args.images]
        subjects = subjects * 2


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(args: argparse.Namespace) -> dict:
    from fers_dist.data import prepare as prep
    from fers_dist.data.align import align_serial

    with tempfile.TemporaryDirectory(prefix="fers-bench-prepare-") as tmp:
        folder = args.raw or tmp
        print(f"synthetic {args.layout} faces in {folder} (not timed) ...", file=sys.stderr)
        records = _records(args, folder)
        table = prep.input_table(records, folder)
        opts = {"upsample": args.dlib_upsample} if args.aligner == "dlib" else {}
        common = dict(aligner=args.aligner, size=args.size, batch_size=args.batch_size, aligner_opts=opts)
        t0 = time.perf_counter()
        ray, started = prep.start_ray()
        ray_init_s = time.perf_counter() - t0
        try:
            actors = prep.pool_size(ray, None, args.actors)
            # Alternate the two paths so both see the same (shared-machine) load; keep the best of each.
            serial_times, ray_times, loads = [], [], [os.getloadavg()[0]]
            for _ in range(args.repeats):
                t, serial = _timed(lambda: align_serial(table, **common, progress=True))
                serial_times.append(t)
                t, par = _timed(lambda: prep.align_with_ray(table, **common, actors=actors))
                ray_times.append(t)
                loads.append(os.getloadavg()[0])
        finally:
            if started:
                ray.shutdown()
        serial_s, ray_s = min(serial_times), min(ray_times)
    n = len(records)
    outcome = {}
    for name, out in (("serial", serial), ("ray", par)):
        if out.num_rows != n:
            raise RuntimeError(f"bench prepare: the {name} path returned {out.num_rows} rows for {n} records")
        outcome[name] = dict(zip(out["path"].to_pylist(), (bool(r) for r in out["reason"].to_pylist())))
    if outcome["serial"] != outcome["ray"]:
        raise RuntimeError("bench prepare: the serial and Ray paths rejected different faces")
    return {
        "bench": "prepare", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.system()})",
        "layout": args.layout, "aligner": args.aligner, "images": n, "image_size": args.image_size,
        "aligned_size": args.size, "batch_size": args.batch_size, "actors": actors, "repeats": args.repeats,
        "serial_s": round(serial_s, 2), "serial_images_per_s": round(n / serial_s, 1),
        "ray_s": round(ray_s, 2), "ray_images_per_s": round(n / ray_s, 1),
        "speedup": round(serial_s / ray_s, 2), "ray_init_s": round(ray_init_s, 2),
        "serial_runs_s": [round(t, 2) for t in serial_times], "ray_runs_s": [round(t, 2) for t in ray_times],
        "rejected": sum(outcome["serial"].values()), "load_avg_1min": [round(v, 2) for v in loads],
    }
