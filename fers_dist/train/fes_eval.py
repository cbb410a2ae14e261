"""The paper's Table V protocol on one fold: an independent recogniser (``no_mtl``, L_cls only) trained on
the fold's REAL training faces, every target expression synthesised for every test face by the FERSNet
generator, and the recogniser's accuracy on those synthesised faces (paper: CK+ 97.04, Oulu-CASIA
81.52), plus identity preservation (``identity_score``). Plain PyTorch; ``fers fes-eval``
(``fers_dist.report.fes_eval``) runs it over an experiment's checkpoints and the λ study's FES objective
inside each inner fold.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fers_dist.errors import FersError

RECOGNISER_SEED_OFFSET = 7919  # the recogniser's RNG stream differs from the fold run's
BASIC_SIX = ("anger", "disgust", "fear", "happy", "sadness", "surprise")  # Table V's targets (CK+: no contempt)
TARGET_SETS = ("basic6", "all")


def target_classes(class_names, targets: str = "basic6") -> list[int]:
    """The target expressions Table V synthesises: the six basic emotions (the paper's protocol; CK+'s
    contempt is left out), or every class of the dataset. A label set that names none of the six (a custom
    dataset) is synthesised whole under ``basic6`` too."""
    if targets not in TARGET_SETS:
        raise ValueError(f"targets: unknown target set {targets!r}, expected one of {TARGET_SETS}")
    every = list(range(len(class_names)))
    return every if targets == "all" else [i for i in every if class_names[i] in BASIC_SIX] or every


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_recogniser(cfg, train, fold: int, epochs: int | None = None, checkpoint: str | Path | None = None,
                     log=_stderr, index: int = 0):
    """The independent recogniser of Table V: ``no_mtl`` (FER branch alone) trained with L_cls on the
    fold's REAL training faces (``train``, a FaceSet on the device). Resumes from ``checkpoint``.
    ``index``: which of several recognisers of the fold (each from its own seed)."""
    import torch

    from fers_dist.train.trainer import Trainer

    rcfg = cfg.with_overrides({"model.variant": "no_mtl"})
    seed = cfg.train.seed * 1000 + fold + RECOGNISER_SEED_OFFSET * (index + 1)
    g = torch.Generator(device=train.images.device)
    g.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # its initial weights from its own seed, whatever ran before
        torch.manual_seed(seed)
        trainer = Trainer(rcfg, train, g, objective="cls", epochs=epochs or cfg.train.epochs, log=log)
    trainer.fit(checkpoint)
    return trainer.model.eval()


def nth_checkpoint(checkpoint: str | Path | None, index: int) -> Path | None:
    """Recogniser ``index``'s checkpoint: ``checkpoint`` itself for the first, ``<stem>-r<index>.pt`` after."""
    if checkpoint is None or index == 0:
        return checkpoint
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-r{index}{path.suffix}")


def _predict(model, images, crop: int, amp: bool = False, batch_size: int = 256):
    import torch

    from fers_dist.data.loader import center_crop
    from fers_dist.train.speed import autocast

    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, amp):
        return torch.cat([model(center_crop(images[i:i + batch_size].to(device), crop)).logits.argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


def fes_eval_fold(cfg, data, fold: int, generator, *, recogniser_epochs: int | None = None,
                  recogniser_checkpoint: str | Path | None = None, identity: str = "auto",
                  identity_faces: int | None = None, device: str | None = None, cache: dict | None = None,
                  targets: str = "basic6", recognisers: int = 1, log=_stderr) -> dict:
    """Table V protocol on one fold.

    ``cfg``: the run's Config; ``data``: a FaceSet or a prepared dataset path; ``generator``: the FERSNet
    (an nn.Module, or a checkpoint path holding its ``model`` weights). The recogniser is trained for
    ``recogniser_epochs`` (default ``train.epochs``), resuming from ``recogniser_checkpoint``; pass the same
    ``cache`` dict for every generator evaluated on this fold and it is trained once (so is the identity
    network). ``identity``: auto, dlib or lightcnn; ``identity_faces``: use only this many test faces
    (spread evenly) for identity. ``targets``: ``basic6`` (the paper: the six basic emotions, so CK+ leaves
    contempt out) or ``all``; every test face is a source either way. ``recognisers``: how many independent
    recognisers (each from its own seed) score the faces; the accuracies are their mean (one recogniser's
    figure moves by up to ±1x chance between seeds on the demo's data), ``accuracy_cross_each`` lists them.
    Returns accuracy on the synthesised faces (``accuracy``; ``accuracy_cross`` leaves out each face's own
    expression), per-class accuracy by target, the confusion matrix, the recogniser's accuracy on the real
    test faces, and ``identity_cosine`` with ``identity_method`` (``identity_cosine_other``: the same
    measure against other subjects' synthesised faces, the level a real identity match must exceed).
    """
    import torch

    from fers_dist.data.loader import FaceSet, load_faces, split_fold
    from fers_dist.model import build_model
    from fers_dist.train.checkpoint import load_weights
    from fers_dist.train.fold import resolve_device
    from fers_dist.train.identity_score import identity_similarity, lightcnn_network
    from fers_dist.train.speed import use_amp
    from fers_dist.train.synthesis import centre_uint8, synthesise_all

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
    if recognisers < 1:
        raise FersError(f"recognisers: {recognisers}; Table V needs at least one recogniser")
    recs = cache.setdefault("recognisers", [])
    for i in range(len(recs), recognisers):
        recs.append(train_recogniser(cfg, train, fold, epochs, nth_checkpoint(recogniser_checkpoint, i), log, i))
    recs = [r.to(dev).eval() for r in recs[:recognisers]]

    amp = use_amp(cfg, dev)
    synth = synthesise_all(generator, test.images, crop, E, amp=amp)  # [N, E, C, crop, crop] uint8
    n = len(test)
    target = torch.arange(E).repeat(n)
    own = test.labels.cpu().repeat_interleave(E)
    chosen = torch.tensor(target_classes(faces.class_names, targets))
    keep = torch.isin(target, chosen)
    flat = synth.flatten(0, 1)[keep]
    target, own = target[keep], own[keep]
    preds = torch.stack([_predict(r, flat, crop, amp) for r in recs])  # [recognisers, faces]
    confusion = sum(torch.bincount(target * E + p, minlength=E * E) for p in preds).view(E, E)
    per_class = (confusion.diag().float() / confusion.sum(1).float()).tolist()  # NaN: a target left out
    cross = target != own
    hits = (preds == target).float()
    cross_each = hits[:, cross].mean(1).tolist() if cross.any() else [float("nan")] * len(recs)
    real_hits = torch.stack([_predict(r, test.images, crop, amp) for r in recs]) == test.labels.cpu()

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
                                identity, lightcnn, amp)
    return {
        "dataset": faces.dataset, "fold": fold, "accuracy": float(hits.mean()),
        "accuracy_cross": sum(cross_each) / len(cross_each), "accuracy_cross_each": cross_each,
        "recognisers": len(recs),
        "per_class_accuracy": per_class, "confusion": confusion.tolist(), "class_names": list(faces.class_names),
        "targets": targets, "target_names": [faces.class_names[i] for i in chosen.tolist()],
        "n_source_images": n, "n_synth_images": int(target.numel()),
        "recogniser_real_accuracy": float(real_hits.float().mean()),
        "recogniser_epochs": int(epochs), **ident, "wall_s": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
