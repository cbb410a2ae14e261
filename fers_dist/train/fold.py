"""Fit ONE fold of ONE variant and evaluate it on its held-out test fold. Pure PyTorch, no Ray.

``fit_fold(cfg, data, fold, report=..., checkpoint_dir=...)`` trains on the other folds and evaluates the
FINAL epoch on the test fold (never the best test epoch). An optional inner validation split carved from
the training subjects (``train.inner_val_fraction``) may drive early stopping. Interrupted runs resume
from ``checkpoint_dir`` and end with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fers_dist.config import Config
from fers_dist.data.loader import FaceSet, holdout_split, load_faces, split_fold
from fers_dist.errors import FersError
from fers_dist.model import architecture, build_model
from fers_dist.train.checkpoint import check_stamp, load_weights
from fers_dist.train.evaluate import evaluate
from fers_dist.train.fes_da import synthesize_balanced
from fers_dist.train.pretrain import load_pretrained, pretrained_uri
from fers_dist.train.speed import set_alloc_conf, use_amp
from fers_dist.train.trainer import Report, Trainer


@dataclass
class FoldResult:
    dataset: str
    variant: str
    fold: int
    seed: int
    config_hash: str
    accuracy: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]
    class_names: list[str]
    n_test_images: int
    n_test_subjects: int
    n_train_images: int
    n_train_subjects: int
    epochs_run: int
    identity: str  # lightcnn9 | subject_encoder | none
    lam_idt_used: bool  # False when identity=none (λ4 = 0)
    wall_s: float
    device: str
    pretrained_from: str = ""  # train.init_from's model (BU-4DFE pre-training) the run started from
    d_real_pair: str = ""  # the discriminator's real pair (loss.real_pair); "" without a discriminator
    architecture: dict = field(default_factory=dict)  # model.fersnet.architecture: encoder shape, parameters
    gate_means: dict[str, float] = field(default_factory=dict)
    gate_maps: dict[str, list] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA where available, unless ``FERS_DEVICE`` names the device every ``auto`` means (the test
    suite sets ``FERS_DEVICE=cpu`` so it runs the same on a GPU machine)."""
    if name == "auto":
        forced = os.environ.get("FERS_DEVICE")
        if forced:
            return resolve_device(forced)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FersError(f"train.device: {name!r} requested but CUDA is not available on this machine")
    return dev


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fit_fold(cfg: Config, data: FaceSet | str | Path, fold: int, report: Report | None = None,
             checkpoint_dir: str | Path | None = None, init_from: str | Path | None = None,
             device: str | None = None, pretrained: str | Path | None = None,
             log: Callable[[str], None] = _stderr, save_now: Callable[[], bool] | None = None) -> FoldResult:
    """Train ``cfg.model.variant`` on every fold but ``fold`` of ``data`` and evaluate on ``fold``.

    ``data``: a FaceSet, or a prepared dataset (``<root>/<dataset>`` or its ``faces.parquet``).
    ``report(metrics, checkpoint_path_or_None)`` is called after every epoch.
    ``checkpoint_dir``: where ``main.pt`` (and ``fes_da.pt``) are written every
    ``train.checkpoint_every`` epochs; an existing checkpoint there is resumed.
    ``init_from``: for ``fes_da``, the ``original`` run's ``main.pt`` for the same fold, reused instead of
    training the original model again.
    ``device``: overrides ``train.device`` (the Ray layer passes the device Ray assigned).
    ``pretrained``: a local copy of the model ``train.init_from`` names; a fresh run starts from it (a resumed
    run continues from its own checkpoint).
    Checkpoints are stamped with ``cfg.hash()``; one made under another config is refused, never resumed.
    ``save_now``: polled once per epoch; true saves a checkpoint now (a preemption notice, ``Trainer.fit``).
    """
    t0 = time.perf_counter()
    set_alloc_conf(cfg)  # takes effect if CUDA's allocator has not started in this process yet
    faces = data if isinstance(data, FaceSet) else load_faces(data)
    train_idx, test_idx = split_fold(faces, fold)  # clear errors before anything heavy
    if faces.images.shape[1] != cfg.model.in_channels:
        raise FersError(f"{faces.dataset}: the prepared faces have {faces.images.shape[1]} channel(s) but "
                        f"data.channels is {cfg.data.channels}: prepare again with --channels {cfg.data.channels}")
    device = resolve_device(device or cfg.train.device)
    seed = cfg.train.seed * 1000 + fold
    torch.manual_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    val = None
    if cfg.train.inner_val_fraction > 0:
        train_idx, val_idx = holdout_split(faces, train_idx, cfg.train.inner_val_fraction, seed)
        val = faces.subset(val_idx).to(device)
    train, test = faces.subset(train_idx).to(device), faces.subset(test_idx).to(device)
    ckdir = Path(checkpoint_dir) if checkpoint_dir else None
    if ckdir:
        ckdir.mkdir(parents=True, exist_ok=True)

    variant = cfg.model.variant
    base_cfg = cfg.with_overrides({"model.variant": "original"}) if variant == "fes_da" else cfg
    amp = use_amp(cfg, device)
    if variant == "fes_da" and init_from is not None:
        check_stamp(init_from, cfg.hash())  # variant is not in the hash: original and fes_da share it
        model = build_model(base_cfg.model, faces.num_classes).to(device)
        model.load_state_dict(load_weights(init_from, "model"))
        log(f"fes_da: reusing the original model from {init_from}")
        epochs_run, history, uses_idt = cfg.train.epochs, [], cfg.identity.backbone != "none"
    else:
        trainer = Trainer(base_cfg, train, g, log=log)
        if pretrained and not (ckdir and (ckdir / "main.pt").exists()):
            load_pretrained(trainer.model, pretrained, cfg, log)
        epochs_run = trainer.fit(ckdir / "main.pt" if ckdir else None, report, val, config_hash=cfg.hash(),
                                 save_now=save_now)
        model, history, uses_idt = trainer.model, trainer.history, trainer.identity is not None
    if variant == "fes_da":
        balanced = synthesize_balanced(model, train, cfg.model.input_size, amp)
        ft = Trainer(base_cfg, balanced, g, model=model, objective="cls", epochs=cfg.train.fes_da_epochs,
                     lr=cfg.train.fes_da_lr, log=log)
        ft_report = (lambda m, saved: report({**m, "phase": "fes_da"}, saved)) if report else None
        epochs_run += ft.fit(ckdir / "fes_da.pt" if ckdir else None, ft_report, val, config_hash=cfg.hash(),
                             save_now=save_now)
        history = history + [dict(h, phase="fes_da") for h in ft.history]

    metrics = evaluate(model, test, cfg.model.input_size, amp=amp)
    return FoldResult(
        dataset=faces.dataset, variant=variant, fold=fold, seed=cfg.train.seed, config_hash=cfg.hash(),
        class_names=list(faces.class_names), n_train_images=len(train), n_train_subjects=train.n_subjects(),
        epochs_run=epochs_run, identity=cfg.identity.backbone if uses_idt else "none",
        lam_idt_used=uses_idt, wall_s=time.perf_counter() - t0,
        d_real_pair=cfg.loss.real_pair if getattr(model, "has_fes", False) and cfg.loss.lam_adv > 0 else "",
        architecture=architecture(base_cfg.model, faces.num_classes), pretrained_from=pretrained_uri(cfg) or "",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        history=history, **metrics,
    )
