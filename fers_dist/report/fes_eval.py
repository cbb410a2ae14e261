"""FES evaluation, the paper's Table V protocol: for each (dataset, fold) with an ``original`` (or
``fes_da``) checkpoint, train an independent recogniser on that fold's REAL training faces only,
synthesise every target expression for every test face with the FERSNet checkpoint, and report the
recogniser's accuracy on the synthesised faces (paper: CK+ 97.04, Oulu-CASIA 81.52), plus identity
preservation (cosine similarity of source and synthesised face; dlib embedding where installed and it
finds the face, else LightCNN-9 features).

Writes ``EXPERIMENT_DIR/fes_eval.parquet`` and ``fes_eval.csv`` (one row per run and fold, replaced on
rerun), which ``fers report`` includes. ``fes_eval_fold`` is the reusable single-fold entry point.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from fers_dist.errors import FersError

KEY = ["dataset", "variant", "fold", "config_hash", "tag"]
RECOGNISER_SEED_OFFSET = 7919  # the recogniser's RNG stream differs from the fold run's


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_recogniser(cfg, train, fold: int, epochs: int | None = None, checkpoint: str | Path | None = None,
                     log=_stderr):
    """The independent recogniser of Table V: ``no_mtl`` (FER branch alone) trained with L_cls on the
    fold's REAL training faces (``train``, a FaceSet on the device). Resumes from ``checkpoint``."""
    import torch

    from fers_dist.train.trainer import Trainer

    rcfg = cfg.with_overrides({"model.variant": "no_mtl"})
    g = torch.Generator(device=train.images.device)
    g.manual_seed(cfg.train.seed * 1000 + fold + RECOGNISER_SEED_OFFSET)
    trainer = Trainer(rcfg, train, g, objective="cls", epochs=epochs or cfg.train.epochs, log=log)
    trainer.fit(checkpoint)
    return trainer.model.eval()


def _predict(model, images, crop: int, batch_size: int = 256):
    import torch

    from fers_dist.data.loader import center_crop

    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(center_crop(images[i:i + batch_size].to(device), crop)).logits.argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


def fes_eval_fold(cfg, data, fold: int, generator, *, recogniser_epochs: int | None = None,
                  recogniser_checkpoint: str | Path | None = None, identity: str = "auto",
                  identity_faces: int | None = None, device: str | None = None, cache: dict | None = None,
                  log=_stderr) -> dict:
    """Table V protocol on one fold.

    ``cfg``: the run's Config; ``data``: a FaceSet or a prepared dataset path; ``generator``: the FERSNet
    (an nn.Module, or a checkpoint path holding its ``model`` weights). The recogniser is trained for
    ``recogniser_epochs`` (default ``train.epochs``), resuming from ``recogniser_checkpoint``; pass the same
    ``cache`` dict for every generator evaluated on this fold and it is trained once (so is the identity
    network). ``identity``: auto, dlib or lightcnn; ``identity_faces``: use only this many test faces
    (spread evenly) for identity.
    Returns accuracy on the synthesised faces (``accuracy``; ``accuracy_cross`` leaves out each face's own
    expression), per-class accuracy by target, the confusion matrix, the recogniser's accuracy on the real
    test faces, and ``identity_cosine`` with ``identity_method`` (``identity_cosine_other``: the same
    measure against other subjects' synthesised faces, the level a real identity match must exceed).
    """
    import torch

    from fers_dist.data.loader import FaceSet, load_faces, split_fold
    from fers_dist.model import build_model
    from fers_dist.report.identity import identity_similarity, lightcnn_network
    from fers_dist.report.runs import centre_uint8, synthesise_all
    from fers_dist.train.checkpoint import load_weights
    from fers_dist.train.fold import resolve_device

    t0 = time.perf_counter()
    faces = data if isinstance(data, FaceSet) else load_faces(data)
    train_idx, test_idx = split_fold(faces, fold)
    dev = resolve_device(device or cfg.train.device)
    E, crop = faces.num_classes, cfg.model.input_size
    train, test = faces.subset(train_idx).to(dev), faces.subset(test_idx)
    if not isinstance(generator, torch.nn.Module):
        model = build_model(cfg.model.model_copy(update={"variant": "original"}), E)
        model.load_state_dict(load_weights(generator, "model"))
        generator = model
    generator = generator.to(dev).eval()
    epochs = recogniser_epochs or cfg.train.epochs
    cache = {} if cache is None else cache
    if "recogniser" not in cache:
        cache["recogniser"] = train_recogniser(cfg, train, fold, epochs, recogniser_checkpoint, log)
    recogniser = cache["recogniser"].to(dev).eval()

    synth = synthesise_all(generator, test.images, crop, E)  # [N, E, C, crop, crop] uint8
    n = len(test)
    target = torch.arange(E).repeat(n)
    own = test.labels.cpu().repeat_interleave(E)
    pred = _predict(recogniser, synth.flatten(0, 1), crop)
    confusion = torch.bincount(target * E + pred, minlength=E * E).view(E, E)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    cross = target != own
    real_pred = _predict(recogniser, test.images, crop)

    pick = torch.arange(n)
    if identity_faces and identity_faces < n:
        pick = torch.linspace(0, n - 1, identity_faces).round().long().unique()

    def lightcnn():
        if "identity" not in cache:
            g = torch.Generator(device=dev)
            g.manual_seed(cfg.train.seed * 1000 + fold)
            cache["identity"] = lightcnn_network(cfg, train, g, log)
        return cache["identity"]

    ident = identity_similarity(centre_uint8(test.images[pick], crop), synth[pick], test.subjects[pick].cpu(),
                                identity, lightcnn)
    return {
        "dataset": faces.dataset, "fold": fold, "accuracy": float((pred == target).float().mean()),
        "accuracy_cross": float((pred[cross] == target[cross]).float().mean()) if cross.any() else float("nan"),
        "per_class_accuracy": per_class, "confusion": confusion.tolist(), "class_names": list(faces.class_names),
        "n_source_images": n, "n_synth_images": int(target.numel()),
        "recogniser_real_accuracy": float((real_pred == test.labels.cpu()).float().mean()),
        "recogniser_epochs": int(epochs), **ident, "wall_s": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }


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
    for col in ("per_class_accuracy", "confusion", "class_names"):
        flat[col] = [json.dumps(_plain(v)) for v in flat[col]]
    atomic_write_text(exp_dir / "fes_eval.csv", flat.to_csv(index=False))
    return exp_dir / FES_FILE


def _plain(v):
    """numpy arrays (as pyarrow lists come back) -> plain lists, for JSON."""
    return [_plain(x) for x in v] if hasattr(v, "__len__") and not isinstance(v, str) else (
        v.item() if hasattr(v, "item") else v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment_dir", metavar="EXPERIMENT_DIR", help="<storage>/<experiment>, holding folds.parquet")
    p.add_argument("--data-root", help="prepared faces (default: data.root of each run's config)")
    p.add_argument("--datasets", nargs="+", help="only these datasets (default: all in folds.parquet)")
    p.add_argument("--folds", nargs="+", type=int, help="only these folds (default: every finished one)")
    p.add_argument("--variants", nargs="+", default=["original", "fes_da"], choices=["original", "fes_da"],
                   help="whose checkpoints synthesise (fes_da uses its fine-tuned fes_da.pt)")
    p.add_argument("--recogniser-epochs", type=int, help="default: train.epochs of the run config")
    p.add_argument("--identity", choices=["auto", "dlib", "lightcnn"], default="auto",
                   help="identity embedding: dlib where installed and it finds the face, else LightCNN-9")
    p.add_argument("--identity-faces", type=int, help="test faces per fold used for identity (default: all)")
    p.add_argument("--device", help="auto, cpu, cuda (default: train.device of the run config)")


def select_rows(frame, datasets=None, folds=None, variants=("original", "fes_da")):
    rows = frame[(frame["status"] == "finished") & frame["variant"].isin(list(variants))]
    if datasets:
        rows = rows[rows["dataset"].isin(datasets)]
    if folds is not None:
        rows = rows[rows["fold"].isin(folds)]
    return rows.assign(_fes_da=rows["variant"] == "fes_da").sort_values(["dataset", "fold", "_fes_da"]).drop(
        columns="_fes_da")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fers_dist.report.experiment import load_rows
    from fers_dist.report.runs import generator_checkpoint, load_row_faces, row_config

    exp_dir = Path(args.experiment_dir)
    rows = select_rows(load_rows(exp_dir), args.datasets, args.folds, args.variants)
    if rows.empty:
        raise FersError(f"{exp_dir / 'folds.parquet'}: no finished {'/'.join(args.variants)} run matches "
                        f"--datasets {args.datasets or 'all'} --folds {args.folds or 'all'}")
    ckpts = [generator_checkpoint(r, exp_dir) for _, r in rows.iterrows()]  # every one exists, before any work
    faces, caches, out = {}, {}, []
    for (_, row), ckpt in zip(tqdm(list(rows.iterrows()), desc="fes-eval", unit="run", file=sys.stderr), ckpts):
        cfg = row_config(row)
        root = str(args.data_root or cfg.data.root)
        if (row["dataset"], root) not in faces:
            faces[(row["dataset"], root)] = load_row_faces(row, root)
        key = (row["dataset"], int(row["fold"]), row["config_hash"])  # one recogniser per fold and config
        epochs = args.recogniser_epochs or cfg.train.epochs
        rec_ckpt = (exp_dir / "fes_eval" /
                    f"recogniser-{row['dataset']}-f{row['fold']}-{row['config_hash']}-e{epochs}.pt")
        res = fes_eval_fold(cfg, faces[(row["dataset"], root)], int(row["fold"]), ckpt, recogniser_epochs=epochs,
                            recogniser_checkpoint=rec_ckpt, identity=args.identity,
                            identity_faces=args.identity_faces, device=args.device,
                            cache=caches.setdefault(key, {}))
        res.update(variant=row["variant"], config_hash=row["config_hash"], tag=row["tag"], checkpoint=str(ckpt),
                   finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_results(exp_dir, [res])
        out.append(res)
        print(f"{row['dataset']} {row['variant']} fold {row['fold']}: {100 * res['accuracy']:.2f}% on "
              f"{res['n_synth_images']} synthesised faces (recogniser on real test: "
              f"{100 * res['recogniser_real_accuracy']:.2f}%), identity cosine {res['identity_cosine']:.3f} "
              f"({res['identity_method']})")
    print(f"wrote {exp_dir / 'fes_eval.parquet'} and fes_eval.csv ({len(out)} runs)")
    return 0

