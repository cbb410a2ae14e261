"""``fers pretrain``: FERSNet pre-trained on BU-4DFE (6 classes, every subject) as ONE Ray Train run, data
parallel over ``cv.workers_per_run`` workers (BU-4DFE is the one large set: 60,600 frames).

  fers prepare --dataset bu4dfe --root BU4DFE --out data
  fers pretrain --config jobs/configs/paper.yaml
  fers cv --config jobs/configs/paper.yaml --set train.init_from=pretrained    # rows tagged 'pretrained'

The model lands at ``<cv.storage>/pretrained/<variant>-<hash>/main.pt`` (``hash``: the config's, with
``train.init_from`` unset) beside ``summary.json``, and a CV experiment with ``train.init_from: pretrained``
starts every fold from it (``fers_dist.train.pretrain``). Running the command again resumes an interrupted
pre-training from its checkpoint, and does nothing once ``summary.json`` is there (``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fers_dist.config import add_set_argument, load_config, parse_config
from fers_dist.errors import FersError
from fers_dist.train.pretrain import PRETRAIN_DATASET, pretrain_config, pretrained_uri


def pretrain_func(config: dict) -> None:
    """Ray Train per-worker function: pre-train (plain PyTorch) and report every epoch through Ray."""
    import ray.train

    from fers_dist.cv.fold_run import _local_checkpoints, _ray_device
    from fers_dist.io import atomic_write_text
    from fers_dist.storage import is_uri, upload
    from fers_dist.train.pretrain import fit_pretrain
    from fers_dist.train.speed import cap_process_memory, set_alloc_conf

    cfg = parse_config(config["cfg"], source="pretrain config")
    set_alloc_conf(cfg)
    device = _ray_device(cfg.train.device, local_mode=False)
    cap_process_memory(device, cfg.cv.gpus_per_run / config["workers"])
    rank, home = ray.train.get_context().get_world_rank(), config["home"]
    with _local_checkpoints(home, "pretrain") as ckdir:  # on object storage: a scratch copy, removed at the end
        log = (lambda m: print(f"fers pretrain: {m}", file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)

        def report(metrics: dict, saved: str | None) -> None:
            if saved and is_uri(home) and rank == 0:
                upload(saved, f"{home}/main.pt")
            log(f"epoch {metrics['epoch'] + 1}/{config['epochs']} loss {metrics['loss']:.4f} "
                f"train accuracy {metrics['train_accuracy']:.3f} ({metrics['images_per_s']:.0f} images/s)")
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

        summary = fit_pretrain(cfg, Path(cfg.data.root) / PRETRAIN_DATASET, ckdir, report, device, log)
        if rank == 0:  # Train V2 keeps metrics only with checkpoints: the summary travels as a file
            local = ckdir / "summary.json"
            atomic_write_text(local, json.dumps(summary, indent=1) + "\n")
            if is_uri(home):
                upload(local, f"{home}/summary.json")


def run_pretrain(cfg, address: str | None = None, force: bool = False, log=print) -> dict:
    """Pre-train ``cfg``'s model on BU-4DFE as one Ray Train run; returns the summary (also in summary.json)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from fers_dist.cv.resources import alive_nodes, check_fits_one_node, check_placeable, ray_session
    from fers_dist.data.loader import parquet_path
    from fers_dist.paths import resolve_paths
    from fers_dist.storage import download, exists, is_uri

    cfg = resolve_paths(pretrain_config(cfg))
    home = pretrained_uri(cfg.with_overrides({"train.init_from": "pretrained"})).rsplit("/", 1)[0]
    if not force and exists(f"{home}/summary.json"):
        summary = json.loads(download(f"{home}/summary.json").read_text())
        log(f"fers pretrain: {home} is done ({summary['epochs']} epochs); --force trains it again")
        return summary
    data = parquet_path(cfg.data.root, PRETRAIN_DATASET)
    if not is_uri(cfg.data.root) and not data.exists():
        raise FersError(f"{data}: no prepared BU-4DFE (run: fers prepare --dataset bu4dfe --root RAW_BU4DFE "
                        f"--out {cfg.data.root})")
    if force:  # the old model and its summary go, so an interrupted retrain is never taken for a finished one
        from fers_dist.storage import filesystem

        for name in ("summary.json", "main.pt"):
            if exists(f"{home}/{name}"):
                fs, path = filesystem(f"{home}/{name}")
                fs.delete_file(path)
    workers = max(1, cfg.cv.workers_per_run)
    worker = {"CPU": cfg.cv.cpus_per_run / workers, **({"GPU": cfg.cv.gpus_per_run / workers}
                                                       if cfg.cv.gpus_per_run else {})}
    epochs = cfg.train.pretrain_epochs or cfg.train.epochs
    with ray_session(address):  # not quiet: rank 0's epoch lines are the progress a user sees
        nodes = alive_nodes()
        check_placeable(cfg, len(nodes))
        check_fits_one_node(cfg.cv.model_copy(update={"workers_per_run": workers}), nodes)
        log(f"fers pretrain: {cfg.model.variant} on BU-4DFE, {epochs} epochs, {workers} worker(s) -> {home}")
        use_gpu = "GPU" in worker
        result = TorchTrainer(
            pretrain_func,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "home": home, "workers": workers,
                               "epochs": epochs},
            torch_config=TorchConfig(backend="nccl" if use_gpu and cfg.train.device != "cpu" else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker=worker, placement_strategy="STRICT_PACK"),
            run_config=ray.train.RunConfig(
                name=f"pretrain-{home.rsplit('/', 1)[1]}", storage_path=f"{cfg.cv.storage.rstrip('/')}/pretrained/train",
                failure_config=ray.train.FailureConfig(max_failures=cfg.cv.max_failures)),
        ).fit()
    if result.error:
        raise FersError(f"fers pretrain: the Ray Train run failed: {result.error}")
    summary = json.loads(download(f"{home}/summary.json").read_text())
    log(f"fers pretrain: {summary['epochs']} epochs on {summary['n_images']} faces of {summary['n_subjects']} "
        f"subjects, train accuracy {summary['train_accuracy']:.3f}, {summary['wall_s']:.0f} s -> {home}/main.pt")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config over the paper defaults (the CV config that will start from it)")
    p.add_argument("--data-root", help="prepared data root holding bu4dfe/faces.parquet (default: data.root)")
    p.add_argument("--storage", help="results root: local path or s3:// URI (default: cv.storage)")
    p.add_argument("--variant", choices=["original", "no_convflu", "no_mtl"], help="default: model.variant")
    p.add_argument("--workers", type=int, help="data-parallel Ray Train workers (default: cv.workers_per_run, "
                                               "at least 1)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)")
    p.add_argument("--force", action="store_true", help="train again even if this config's model exists")
    add_set_argument(p)


def run(args: argparse.Namespace) -> int:
    flags = {"data.root": args.data_root, "cv.storage": args.storage, "model.variant": args.variant,
             "cv.workers_per_run": args.workers}
    cfg = load_config(args.config, {k: v for k, v in flags.items() if v is not None}, args.sets)
    print(json.dumps(run_pretrain(cfg, args.address, args.force, log=lambda m: print(m, file=sys.stderr))))
    return 0
