"""``fers train``: ONE fold of ONE variant on one dataset, in plain PyTorch (no Ray) -- the debugging path.

  fers train --config jobs/configs/demo.yaml --data data --dataset ckplus --fold 3 --variant original

Trains on every other fold, evaluates the final epoch on the test fold, and prints a progress bar per
epoch on stderr and, as the last line on stdout, the result as JSON with the fields of a folds.parquet row
(``accuracy`` among them). Checkpoints go to ``--out`` (default ``runs/<run>-<config hash>``); running the
same command again resumes from them, and a changed config trains in a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fers_dist.config import DATASETS, VARIANTS, add_set_argument, load_config
from fers_dist.paths import resolve_paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config over the paper defaults (e.g. jobs/configs/demo.yaml)")
    p.add_argument("--data", help="prepared data root holding <dataset>/faces.parquet (default: data.root)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--fold", type=int, default=0, help="the held-out test fold")
    p.add_argument("--variant", choices=VARIANTS, help="default: model.variant")
    p.add_argument("--out", help="checkpoints and result.json (default: runs/<run>-<config hash>)")
    p.add_argument("--tag", help="the row's tag (default: 'pretrained' with train.init_from, else 'paper')")
    p.add_argument("--mlflow", metavar="URI", help="log the run to this MLflow server (cv.tracking.mlflow)")
    add_set_argument(p)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fers_dist.io import atomic_write_text
    from fers_dist.provenance import provenance
    from fers_dist.results import result_row, run_key, run_name
    from fers_dist.storage import download, is_uri
    from fers_dist.tracking import log_epoch, log_result, track_fold
    from fers_dist.train.fold import fit_fold, resolve_device
    from fers_dist.train.pretrain import check_pretrained, default_tag, pretrained_uri

    flags = {"data.root": args.data, "model.variant": args.variant, "cv.tracking.mlflow": args.mlflow}
    cfg = resolve_paths(load_config(args.config, {k: v for k, v in flags.items() if v is not None}, args.sets))
    variant, tag = cfg.model.variant, args.tag or default_tag(cfg)
    pretrained = pretrained_uri(cfg)
    if pretrained:
        check_pretrained(cfg)
        pretrained = str(download(pretrained)) if is_uri(pretrained) else pretrained
    name = run_name(args.dataset, variant, args.fold, tag, cfg.train.seed)
    key = run_key(args.dataset, variant, args.fold, tag, cfg.hash(), cfg.train.seed)
    out = Path(args.out or Path("runs") / key)
    epochs = cfg.train.epochs + (cfg.train.fes_da_epochs if variant == "fes_da" else 0)
    bar = tqdm(total=epochs, desc=name, unit="epoch", file=sys.stderr)

    try:
        with track_fold(cfg.cv.tracking.mlflow, cfg, args.dataset, args.fold, tag, name, key) as mlflow:
            def report(metrics: dict, saved: str | None) -> None:
                if mlflow:
                    log_epoch(mlflow, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}",
                                acc=f"{metrics.get('train_accuracy', float('nan')):.3f}")

            result = fit_fold(cfg, Path(cfg.data.root) / args.dataset, args.fold, report=report,
                              checkpoint_dir=out, pretrained=pretrained,
                              log=lambda m: tqdm.write(m, file=sys.stderr))
            if mlflow:
                log_result(mlflow, result)
        bar.update(epochs - bar.n)  # epochs a resumed run did not train again
    finally:
        bar.close()  # ends the bar's line, so an error prints on its own
    row = result_row(result, experiment=cfg.cv.experiment, tag=tag, checkpoint_uri=str(out.resolve()),
                     config=cfg.model_dump(mode="json"))
    row.update(provenance(str(resolve_device(cfg.train.device))))
    row = json.loads(json.dumps(row), parse_constant=lambda c: None)  # NaN (an empty class) -> null: strict JSON
    atomic_write_text(out / "result.json", json.dumps(row, indent=1) + "\n")
    print(f"{name}: test accuracy {100 * result.accuracy:.2f}% on fold {args.fold} ({result.n_test_images} faces); "
          f"checkpoints and result.json in {out}", file=sys.stderr)
    print(json.dumps(row))
    return 0
