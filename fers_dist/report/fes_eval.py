"""FES evaluation, the paper's Table V protocol: for each (dataset, fold) with an ``original`` (or
``fes_da``) checkpoint, train an independent recogniser on that fold's REAL training faces only,
synthesise every target expression for every test face with the FERSNet checkpoint, and report the
recogniser's accuracy on the synthesised faces (paper: CK+ 97.04, Oulu-CASIA 81.52), plus identity
preservation (cosine similarity of source and synthesised face; dlib embedding where installed and it
finds the face, else LightCNN-9 features).

Writes ``EXPERIMENT_DIR/fes_eval.parquet`` and ``fes_eval.csv`` (one row per run and fold, replaced on
rerun), which ``fers report`` includes. The protocol itself, one fold at a time, is
``fers_dist.train.fes_eval.fes_eval_fold`` (Ray-free; the λ study's FES objective runs it too).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from fers_dist.errors import FersError
from fers_dist.train.fes_eval import TARGET_SETS

KEY = ["dataset", "variant", "fold", "config_hash", "tag"]


def write_results(exp_dir: str | Path, rows: list[dict]) -> Path:
    """Add rows to ``fes_eval.parquet`` (a row with the same run key replaces the old one) and rewrite
    ``fes_eval.csv``; both atomically."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fers_dist.io import atomic_write_bytes, atomic_write_text
    from fers_dist.report.experiment import FES_FILE, load_fes

    exp_dir = Path(exp_dir)
    old = load_fes(exp_dir)
    frame = pd.concat([old, pd.DataFrame(rows)], ignore_index=True) if old is not None else pd.DataFrame(rows)
    frame = frame.drop_duplicates(subset=KEY, keep="last").sort_values(KEY[:3]).reset_index(drop=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    atomic_write_bytes(exp_dir / FES_FILE, buf.getvalue())
    flat = frame.copy()
    for col in ("per_class_accuracy", "confusion", "class_names", "accuracy_cross_each"):
        flat[col] = [json.dumps(_plain(v)) for v in flat[col]]
    atomic_write_text(exp_dir / "fes_eval.csv", flat.to_csv(index=False))
    return exp_dir / FES_FILE


def _plain(v):
    """numpy arrays (as pyarrow lists come back) -> plain lists, for JSON."""
    return [_plain(x) for x in v] if hasattr(v, "__len__") and not isinstance(v, str) else (
        v.item() if hasattr(v, "item") else v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment_dir", metavar="EXPERIMENT_DIR",
                   help="<storage>/<experiment>, holding folds.parquet: a folder or an s3:// / gs:// URI")
    p.add_argument("--data-root", help="prepared faces (default: data.root of each run's config)")
    p.add_argument("--datasets", nargs="+", help="only these datasets (default: all in folds.parquet)")
    p.add_argument("--folds", nargs="+", type=int, help="only these folds (default: every finished one)")
    p.add_argument("--variants", nargs="+", default=["original", "fes_da"], choices=["original", "fes_da"],
                   help="whose checkpoints synthesise (fes_da uses its fine-tuned fes_da.pt)")
    p.add_argument("--tags", nargs="+", help="only runs with these tags, e.g. showcase (default: every tag)")
    p.add_argument("--recogniser-epochs", type=int, help="default: train.epochs of the run config")
    p.add_argument("--recognisers", type=_positive, default=1,
                   help="independent recognisers per fold, each from its own seed; Table V reports their mean "
                        "(the paper: one)")
    p.add_argument("--identity", choices=["auto", "dlib", "lightcnn"], default="auto",
                   help="identity embedding: dlib where installed and it finds the face, else LightCNN-9")
    p.add_argument("--identity-faces", type=int, help="test faces per fold used for identity (default: all)")
    p.add_argument("--device", help="auto, cpu, cuda (default: train.device of the run config)")
    p.add_argument("--targets", choices=TARGET_SETS, default="basic6",
                   help="target expressions synthesised for every test face: basic6, the six basic emotions as "
                        "the paper scores Table V (CK+ leaves contempt out), or all classes")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def select_rows(frame, datasets=None, folds=None, variants=("original", "fes_da"), tags=None):
    rows = frame[(frame["status"] == "finished") & frame["variant"].isin(list(variants))]
    if datasets:
        rows = rows[rows["dataset"].isin(datasets)]
    if folds is not None:
        rows = rows[rows["fold"].isin(folds)]
    if tags:
        rows = rows[rows["tag"].isin(tags)]
    return rows.assign(_fes_da=rows["variant"] == "fes_da").sort_values(["dataset", "fold", "_fes_da"]).drop(
        columns="_fes_da")


def run(args: argparse.Namespace) -> int:
    out = evaluate(args.experiment_dir, **{k: getattr(args, k) for k in EVAL_OPTIONS})
    print(f"wrote {str(args.experiment_dir).rstrip('/')}/fes_eval.parquet and fes_eval.csv ({len(out)} runs)")
    return 0


EVAL_OPTIONS = ("data_root", "datasets", "folds", "variants", "tags", "recogniser_epochs", "recognisers",
                "identity", "identity_faces", "device", "targets")


def evaluate(experiment_dir, data_root=None, datasets=None, folds=None, variants=("original", "fes_da"), tags=None,
             recogniser_epochs=None, recognisers=1, identity="auto", identity_faces=None, device=None,
             targets="basic6", log=print) -> list[dict]:
    """Table V for every selected run of ``experiment_dir`` (the options are ``fers fes-eval``'s flags);
    each result is added to fes_eval.parquet as soon as it is measured. Returns the result dicts."""
    from tqdm import tqdm

    from fers_dist.report.experiment import FES_FILE, fetch_experiment, load_rows
    from fers_dist.report.runs import generator_checkpoint, load_row_faces, row_config
    from fers_dist.storage import is_uri, upload
    from fers_dist.train.fes_eval import fes_eval_fold

    remote = str(experiment_dir).rstrip("/") if is_uri(str(experiment_dir)) else None
    exp_dir = fetch_experiment(remote) if remote else Path(experiment_dir)
    rows = select_rows(load_rows(exp_dir), datasets, folds, variants, tags)
    if rows.empty:
        raise FersError(f"{exp_dir / 'folds.parquet'}: no finished {'/'.join(variants)} run matches "
                        f"--datasets {datasets or 'all'} --folds {folds or 'all'} --tags {tags or 'all'}")
    ckpts = [generator_checkpoint(r, exp_dir) for _, r in rows.iterrows()]  # every one exists, before any work
    faces, caches, out = {}, {}, []
    for (_, row), ckpt in zip(tqdm(list(rows.iterrows()), desc="fes-eval", unit="run", file=sys.stderr), ckpts):
        cfg = row_config(row)
        root = str(data_root or cfg.data.root)
        if (row["dataset"], root) not in faces:
            faces[(row["dataset"], root)] = load_row_faces(row, root)
        key = (row["dataset"], int(row["fold"]), row["config_hash"])  # one recogniser per fold and config
        epochs = recogniser_epochs or cfg.train.epochs
        rec_ckpt = (exp_dir / "fes_eval" /
                    f"recogniser-{row['dataset']}-f{row['fold']}-{row['config_hash']}-e{epochs}.pt")
        res = fes_eval_fold(cfg, faces[(row["dataset"], root)], int(row["fold"]), ckpt, recogniser_epochs=epochs,
                            recogniser_checkpoint=rec_ckpt, identity=identity,
                            identity_faces=identity_faces, device=device,
                            cache=caches.setdefault(key, {}), targets=targets, recognisers=recognisers)
        res.update(variant=row["variant"], config_hash=row["config_hash"], tag=row["tag"], checkpoint=str(ckpt),
                   finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_results(exp_dir, [res])
        if remote:  # the results go back beside the experiment's folds.parquet
            for name in (FES_FILE, "fes_eval.csv"):
                upload(exp_dir / name, f"{remote}/{name}")
        out.append(res)
        each = (f" (mean of {recognisers} recognisers: "
                f"{', '.join(f'{100 * a:.1f}' for a in res['accuracy_cross_each'])})" if recognisers > 1 else "")
        log(f"{row['dataset']} {row['variant']} ({row['tag']}) fold {row['fold']}: cross-expression "
            f"{100 * res['accuracy_cross']:.2f}%{each} (chance {100 / len(res['class_names']):.2f}%), all targets "
            f"{100 * res['accuracy']:.2f}% on {res['n_synth_images']} synthesised faces (recogniser on real test: "
            f"{100 * res['recogniser_real_accuracy']:.2f}%), identity cosine {res['identity_cosine']:.3f} "
            f"({res['identity_method']})")
    return out

