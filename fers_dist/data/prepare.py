"""Prepare a dataset: read a raw dataset folder, then decode, align and PNG-encode every face with Ray
Data ``map_batches`` (an actor pool for the model aligners and GPUs, tasks otherwise), and write one
Parquet file with identity-independent folds and a manifest.

Output (the loader's contract), under ``<out>/<dataset>/``:

- ``faces.parquet``: one row per ACCEPTED face; columns ``image`` (binary, PNG of a size x size uint8
  grayscale face), ``path`` (string, relative to the root; ``file.avi#<frame>`` for video frames),
  ``dataset``, ``subject``, ``sequence`` (strings), ``frame`` (int32), ``label`` (int8, 0-based over
  the manifest's class_names), ``label_name`` (string), ``fold`` (int8, 0..n_folds-1). Rows are
  sorted by subject, sequence, frame, path.
- ``manifest.json``: class names, counts, rejected files with reasons, skips, options, folds, the
  content hash and the Table I comparison. ``rejected.parquet`` repeats the rejections as a table.

A dataset is built in a temporary folder beside the target and swapped in only when complete; an
unchanged input (same content hash) is a no-op unless ``--force``. Only this module (with cv/, tune/
and submit.py) imports ray, and only inside functions.

On a multi-node cluster the raw root must be on storage every node sees at the same path (the
Ray workers read the image files); aligned faces come back to the driver, which writes the single file.
The driver holds the aligned faces in memory while it sorts and writes them (about 6 KB a face at
110x110: some 350 MB for all of BU-4DFE).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fers_dist.data.align import AlignBatch, align_batch_task, batch_schemas
from fers_dist.errors import DataError, FersError

FORMAT_VERSION = 1
FACES_COLUMNS = ("image", "path", "dataset", "subject", "sequence", "frame", "label", "label_name", "fold")


def _schemas():
    """(pipeline input, aligned rows, faces.parquet) Arrow schemas."""
    import pyarrow as pa

    inputs, aligned = batch_schemas()
    faces = pa.schema([*(f for f in aligned if f.name != "reason"), pa.field("fold", pa.int8())])
    return inputs, aligned, faces


def input_table(records, root: str | Path):
    """Records -> the pipeline's input table (absolute source path, landmarks as float32 bytes)."""
    import pyarrow as pa

    root = Path(root).resolve()
    cols = {
        "src": [str(root / r.path) for r in records],
        "video_frame": [-1 if r.video_frame is None else r.video_frame for r in records],
        "landmarks": [b"" if r.landmarks is None else np.asarray(r.landmarks, np.float32).tobytes() for r in records],
        "path": [r.key for r in records], "dataset": [r.dataset for r in records],
        "subject": [r.subject for r in records], "sequence": [r.sequence for r in records],
        "frame": [r.frame for r in records], "label": [r.label for r in records],
        "label_name": [r.label_name for r in records],
    }
    return pa.table(cols, schema=_schemas()[0])


def start_ray(address: str | None = None, *, quiet: bool = False):
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray without its dashboard, unless Ray is
    already up in this process. ``quiet``: a local Ray keeps its log set-up and the workers' output to
    itself. Returns (ray, started); the caller shuts Ray down when ``started``. The one place fers-dist
    connects to Ray (``fers_dist.cv.resources.ray_session`` wraps it for a block)."""
    import ray

    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
    else:
        ray.init(address=address, include_dashboard=False,
                 **({"configure_logging": False, "log_to_driver": False} if quiet else {}))
    return ray, True


def pool_size(ray, num_gpus: float | None, actors: int | None) -> int:
    res = ray.cluster_resources()
    n = max(1, int(res.get("CPU", 1)))
    if num_gpus:
        have = res.get("GPU", 0)
        if have < num_gpus:
            raise FersError(f"--num-gpus {num_gpus}: each aligner actor asks for {num_gpus} GPU but the Ray "
                            f"cluster has {have:g} GPUs")
        n = min(n, int(have // num_gpus))
    return max(1, min(actors, n) if actors else n)


COMPUTE = ("auto", "tasks", "actors")
MODEL_ALIGNERS = ("fan", "dlib")  # aligners with a model to load once per process


def resolve_compute(compute: str, aligner: str, num_gpus: float | None) -> str:
    """``auto``: a pool of actors for the model aligners and for GPUs (each actor loads its model
    once and holds its device); tasks for ``landmarks``/``center``, which have nothing to load."""
    if compute not in COMPUTE:
        raise FersError(f"--compute: expected one of {', '.join(COMPUTE)}, got {compute!r}")
    if compute != "auto":
        return compute
    return "actors" if num_gpus or aligner in MODEL_ALIGNERS else "tasks"


def align_with_ray(table, aligner: str, size: int, aligner_opts: dict | None = None, batch_size: int = 64,
                   num_gpus: float | None = None, actors: int | None = None, compute: str = "auto"):
    """records table -> aligned table through ``map_batches``, on an actor pool (one actor per CPU by
    default, or per ``num_gpus`` share of a GPU; each loads its aligner once) or as tasks (Ray reuses
    their worker processes, so only a session's first dataset pays for their imports; see
    docs/BENCHMARKS.md). Ray must be initialised. Results are collected on the driver, which writes the
    single Parquet file."""
    import pyarrow as pa
    import ray

    mode = resolve_compute(compute, aligner, num_gpus)
    n = pool_size(ray, num_gpus, actors)
    gpu = {"num_gpus": num_gpus} if num_gpus else {}
    # from_items builds the (small: paths and landmarks) blocks on the driver; from_arrow would spawn
    # a remote metadata task per block, which costs seconds of worker start-up on a small machine.
    n_blocks = max(n * 2, -(-table.num_rows // (batch_size * 2)))
    ds = ray.data.from_items(table.to_pylist(), override_num_blocks=n_blocks)
    common = dict(batch_size=batch_size, batch_format="pyarrow", num_cpus=1, **gpu)
    if mode == "actors":
        ds = ds.map_batches(AlignBatch, fn_constructor_kwargs={
            "aligner": aligner, "size": size, "aligner_opts": aligner_opts, "threads": 1},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n, initial_size=n), **common)
    else:  # no size cap: Ray core queues the tasks, and a freed CPU takes the next one at once
        ds = ds.map_batches(align_batch_task, fn_kwargs={"aligner": aligner, "size": size,
                                                         "aligner_opts": aligner_opts},
                            compute=ray.data.TaskPoolStrategy(size=actors), **common)
    # One operator: nothing to reserve CPUs for. The reservation also caps the operator at one task
    # until Ray Data's autoscaling coordinator first reports the cluster (about 1 s per dataset).
    ds.context.op_resource_reservation_enabled = False
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables([p.cast(_schemas()[1]) for p in parts]) if parts else _schemas()[1].empty_table()


def consolidate(aligned, dataset: str, n_folds: int, seed: int):
    """aligned rows -> (faces table with folds, sorted; rejected [(path, reason)]; subject -> fold)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from fers_dist.data.folds import assign_folds

    ok = pc.equal(aligned["reason"], "")
    faces = aligned.filter(ok).drop_columns(["reason"])
    bad = aligned.filter(pc.invert(ok))
    rejected = list(zip(bad["path"].to_pylist(), bad["reason"].to_pylist()))
    if faces.num_rows == 0:
        first = f"; first: {rejected[0][0]}: {rejected[0][1]}" if rejected else ""
        raise DataError(f"{dataset}: no face could be aligned ({len(rejected)} rejected{first})")
    folds = assign_folds(faces["subject"].to_pylist(), faces["label"].to_pylist(), n_folds, dataset, seed)
    fold_col = pa.array([folds[s] for s in faces["subject"].to_pylist()], pa.int8())
    faces = faces.append_column("fold", fold_col).cast(_schemas()[2])
    faces = faces.sort_by([("subject", "ascending"), ("sequence", "ascending"), ("frame", "ascending"),
                           ("path", "ascending")])
    return faces, rejected, folds


def content_hash(dataset: str, result, options: dict) -> str:
    """sha256 of the input files (paths and bytes), what the reader rejected or skipped, and the options."""
    blob = json.dumps({"format": FORMAT_VERSION, "dataset": dataset, "options": options,
                       "inputs": sorted(result.inputs.items()), "rejected": sorted(result.rejected),
                       "skipped": sorted(result.skipped.items())}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_manifest(spec, result, faces, rejected, folds, options: dict, digest: str) -> dict:
    subjects = faces["subject"].to_pylist()
    per_subject = Counter(subjects)
    per_class = Counter(faces["label_name"].to_pylist())
    fold_images = Counter(faces["fold"].to_pylist())
    return {
        "format_version": FORMAT_VERSION, "dataset": spec.name, "class_names": list(spec.class_names),
        "n_images": faces.num_rows, "n_subjects": len(per_subject),
        "n_sequences": len(set(faces["sequence"].to_pylist())),
        "counts_per_class": {n: per_class.get(n, 0) for n in spec.class_names},
        "counts_per_subject": dict(sorted(per_subject.items())),
        "single_image_subjects": sorted(s for s, c in per_subject.items() if c == 1),
        "rejected": [{"path": p, "reason": r} for p, r in rejected], "n_rejected": len(rejected),
        "skipped": result.skipped, **options, "subject_folds": dict(sorted(folds.items())),
        "fold_images": {str(f): fold_images.get(f, 0) for f in range(options["n_folds"])},
        "content_hash": digest, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "table1": {**result.report.to_dict(), "accepted_images_per_class": dict(per_class)},
        "columns": list(FACES_COLUMNS),
    }


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the complete ``tmp`` folder; the old dataset is removed only afterwards."""
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(parent: Path, dataset: str, max_age_s: float = 86400) -> None:
    """Remove what interrupted builds left: old copies, and temporary folders older than a day."""
    for p in parent.glob(f".{dataset}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{dataset}.tmp-*"):
        if time.time() - p.stat().st_mtime > max_age_s:
            shutil.rmtree(p, ignore_errors=True)


def _write_dataset(folder: Path, faces, rejected, manifest: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq


    folder.mkdir(parents=True)
    pq.write_table(faces, folder / "faces.parquet", row_group_size=1024, compression={
        c: ("none" if c == "image" else "zstd") for c in faces.column_names})
    paths, reasons = (list(x) for x in zip(*rejected)) if rejected else ([], [])
    pq.write_table(pa.table({"path": pa.array(paths, pa.string()), "reason": pa.array(reasons, pa.string())}),
                   folder / "rejected.parquet")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # the folder swap is atomic


def prepare(dataset: str, root: str | Path, out: str | Path, aligner: str = "landmarks", size: int = 110,
            n_folds: int = 10, fold_seed: int = 0, num_gpus: float | None = None, actors: int | None = None,
            batch_size: int = 64, force: bool = False, reader_opts: dict | None = None,
            aligner_opts: dict | None = None, compute: str = "auto", channels: int = 1, log=print) -> dict:
    """Build ``<out>/<dataset>/faces.parquet`` + ``manifest.json``; returns the manifest (with
    ``status``: ``built`` or ``up-to-date``). ``channels``: 1 stores gray faces, 3 colour (data.channels)."""
    from fers_dist.data.layouts import get_dataset

    aligner_opts = {**(aligner_opts or {}), "channels": channels}
    if aligner_opts.get("hub_dir"):  # Ray workers run in their own folders: no relative path survives
        aligner_opts["hub_dir"] = str(Path(aligner_opts["hub_dir"]).expanduser().resolve())
    if aligner == "fan" and aligner_opts.get("device", "auto") == "auto":
        aligner_opts["device"] = "cuda" if num_gpus else "cpu"  # an actor holding no GPU never touches CUDA

    spec = get_dataset(dataset)
    if not 2 <= n_folds <= 127:
        raise DataError(f"n_folds: must be in 2..127 (stored as int8), got {n_folds}")
    mode = resolve_compute(compute, aligner, num_gpus)
    result = spec.read(root, **(reader_opts or {}))
    if not result.records:
        raise DataError(f"{root}: no labelled {dataset} faces found (skipped: {result.skipped or 'none'}; "
                        f"rejected: {len(result.rejected)})")
    opts = {k: v for k, v in (aligner_opts or {}).items() if k not in ("hub_dir", "device")}
    options = {"aligner": aligner, "aligner_options": opts, "size": size, "n_folds": n_folds,
               "fold_seed": fold_seed, "reader_options": reader_opts or {}}
    digest = content_hash(dataset, result, options)
    target = Path(out) / dataset
    old = target / "manifest.json"
    if not force and old.is_file() and (target / "faces.parquet").is_file():
        try:
            manifest = json.loads(old.read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("content_hash") == digest:
            log(f"{dataset}: {target} is up to date (content hash {digest[:12]}); use --force to rebuild")
            return {**manifest, "status": "up-to-date"}
    from fers_dist.data.align import preflight

    preflight(aligner, **(aligner_opts or {}))
    log(str(result.report))
    ray, started = start_ray()
    try:
        t0 = time.perf_counter()
        aligned = align_with_ray(input_table(result.records, root), aligner, size, aligner_opts, batch_size,
                                 num_gpus, actors, mode)
        seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    faces, rejected, folds = consolidate(aligned, dataset, n_folds, fold_seed)
    rejected = list(result.rejected) + rejected
    manifest = build_manifest(spec, result, faces, rejected, folds, options, digest)
    manifest["pipeline_seconds"] = round(seconds, 2)
    manifest["pipeline_compute"] = mode
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{dataset}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(tmp, faces, rejected, manifest)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _clean_stale(target.parent, dataset)
    log(f"{dataset}: {manifest['n_images']} faces of {manifest['n_subjects']} subjects in {n_folds} folds -> "
        f"{target / 'faces.parquet'} ({len(rejected)} rejected, {sum(result.skipped.values())} skipped; "
        f"see manifest.json)")
    if manifest["single_image_subjects"]:
        log(f"{dataset}: subjects with a single image: {', '.join(manifest['single_image_subjects'])}")
    return {**manifest, "status": "built"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fers_dist.config import ALIGNERS, DATASETS

    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--root", required=True, help="the dataset folder exactly as distributed")
    p.add_argument("--out", help="data root receiving <dataset>/faces.parquet (default: config data.root)")
    p.add_argument("--aligner", choices=ALIGNERS, help="default: config data.aligner")
    p.add_argument("--size", type=int, help="aligned face size in pixels (default: config data.aligned_size)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1: gray faces, 3: colour, e.g. Oulu-CASIA VL "
                                                                "(default: config data.channels)")
    p.add_argument("--num-gpus", type=float, help="GPUs per aligner actor (fractions pack actors on a GPU)")
    p.add_argument("--compute", choices=COMPUTE, default="auto",
                   help="auto (default): an actor pool for fan/dlib and with --num-gpus (each actor loads its "
                        "model once), tasks for landmarks/center (Ray reuses their warm worker processes)")
    p.add_argument("--actors", type=int, help="most aligner actors, or concurrent tasks (default: one per CPU, "
                                              "or per GPU share)")
    p.add_argument("--batch-size", type=int, default=64, help="images per map_batches call")
    p.add_argument("--n-folds", type=int, help="default: config data.n_folds")
    p.add_argument("--fold-seed", type=int, help="default: config data.fold_seed")
    p.add_argument("--config", help="YAML config (data section supplies the defaults)")
    p.add_argument("--force", action="store_true", help="rebuild even if the input is unchanged")
    p.add_argument("--modality", default="VL", help="Oulu-CASIA: VL (visible) or NI (near-infrared)")
    p.add_argument("--lighting", default="Strong", help="Oulu-CASIA: Strong, Weak or Dark")
    p.add_argument("--mmi-emotion-map", help="MMI: emotion codes, e.g. 1=anger,2=disgust,3=fear,...")
    p.add_argument("--fan-hub-dir", help="fan: torch hub folder holding checkpoints/ with the FAN weights")
    p.add_argument("--fan-device", default="auto", help="fan: auto, cpu, cuda")
    p.add_argument("--dlib-upsample", type=int, default=1, help="dlib: detector upsampling (0 is 4x faster)")


def run(args: argparse.Namespace) -> int:
    from fers_dist.config import load_config

    data = load_config(args.config).data
    reader_opts: dict = {}
    if args.dataset == "oulu":
        reader_opts = {"modality": args.modality, "lighting": args.lighting}
    elif args.dataset == "mmi" and args.mmi_emotion_map:
        from fers_dist.data.layouts.mmi import parse_emotion_map

        reader_opts = {"emotion_map": parse_emotion_map(args.mmi_emotion_map)}
    aligner = args.aligner or data.aligner
    aligner_opts = ({"hub_dir": args.fan_hub_dir, "device": args.fan_device} if aligner == "fan" else
                    {"upsample": args.dlib_upsample} if aligner == "dlib" else {})
    prepare(args.dataset, args.root, args.out or data.root, aligner=aligner, size=args.size or data.aligned_size,
            n_folds=args.n_folds or data.n_folds,
            fold_seed=data.fold_seed if args.fold_seed is None else args.fold_seed,
            num_gpus=args.num_gpus, actors=args.actors, batch_size=args.batch_size, force=args.force,
            compute=args.compute, reader_opts=reader_opts, aligner_opts=aligner_opts,
            channels=args.channels or data.channels)
    return 0
