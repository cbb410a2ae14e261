"""BU-4DFE pre-training (the paper's "FERSNet (BU-4DFE)" rows of Tables II-IV), Ray-free.

``fit_pretrain`` trains a variant on EVERY face of a prepared dataset (BU-4DFE: 6 classes, all subjects, no
test fold) with the same objective as a fold run; ``fers pretrain`` (``fers_dist.cv.pretrain``) runs it as
one Ray Train run, data parallel over ``cv.workers_per_run`` workers. A CV experiment with
``train.init_from: pretrained`` then starts every fold from that model (``load_pretrained``): everything is
loaded but the layers whose shape follows the class count (f_cls's output layer and f_tra's input layer,
re-initialised when the counts differ); the discriminator starts fresh.

The pre-trained model is tied to the config that asks for it: it lives at
``<cv.storage>/pretrained/<variant>-<hash>/main.pt``, ``<hash>`` being the hash of that config with
``train.init_from`` unset, and is stamped with it, so a fold never starts from another config's model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fers_dist.config import Config
from fers_dist.errors import FersError

PRETRAIN_DATASET = "bu4dfe"
PRETRAIN_SEED_OFFSET = 104729  # pre-training's RNG stream differs from every fold's


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pretrain_config(cfg: Config) -> Config:
    """The config pre-training runs under: the fold config without ``init_from`` (fes_da pre-trains as
    original, the model it fine-tunes)."""
    variant = "original" if cfg.model.variant == "fes_da" else cfg.model.variant
    return cfg.with_overrides({"train.init_from": None, "model.variant": variant})


def pretrain_key(cfg: Config) -> str:
    pcfg = pretrain_config(cfg)
    return f"{pcfg.model.variant}-{pcfg.hash()}"


def pretrained_uri(cfg: Config) -> str | None:
    """Where ``train.init_from`` points: ``pretrained`` -> this config's `fers pretrain` output."""
    init = cfg.train.init_from
    if init != "pretrained":
        return init
    return f"{cfg.cv.storage.rstrip('/')}/pretrained/{pretrain_key(cfg)}/main.pt"


def default_tag(cfg: Config) -> str:
    """The rows' tag: ``pretrained`` (the report's BU-4DFE slot) for runs starting from a pre-trained model."""
    from fers_dist.results import PRETRAINED_TAG

    return PRETRAINED_TAG if cfg.train.init_from else "paper"


def check_pretrained(cfg: Config) -> None:
    """On the driver, before any fold starts: the pre-trained model ``train.init_from`` names exists."""
    from fers_dist.storage import exists

    uri = pretrained_uri(cfg)
    if uri and not exists(uri):
        how = (f" (run: fers pretrain with this config, e.g. fers pretrain --config CONFIG --data-root "
               f"{cfg.data.root})" if cfg.train.init_from == "pretrained" else "")
        raise FersError(f"train.init_from: {cfg.train.init_from!r}: no pre-trained model at {uri}{how}")


def load_pretrained(model: torch.nn.Module, path: str | Path, cfg: Config, log: Callable[[str], None] = _stderr):
    """Load a pre-trained FERSNet into ``model``: every tensor whose shape matches; only the class-count
    layers may differ (re-initialised). A checkpoint from another config is refused."""
    from fers_dist.train.checkpoint import check_stamp, load_weights

    if cfg.train.init_from == "pretrained":
        check_stamp(path, pretrain_config(cfg).hash())
    state, own = load_weights(path, "model"), model.state_dict()
    fresh = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    wrong = [k for k in fresh if not k.startswith(("f_cls.fc2.", "f_tra.fc."))]
    if wrong or set(state) - set(own):
        raise FersError(f"{path}: the pre-trained model's architecture differs from this run's "
                        f"({', '.join((wrong or sorted(set(state) - set(own)))[:3])}…)")
    model.load_state_dict({**own, **{k: v for k, v in state.items() if k not in fresh}})
    log(f"initialised from the pre-trained model {path}" + (f" (re-initialised: {', '.join(fresh)})" if fresh else ""))


def fit_pretrain(cfg: Config, data, checkpoint_dir: str | Path | None = None, report=None,
                 device: str | None = None, log: Callable[[str], None] = _stderr) -> dict:
    """Train ``pretrain_config(cfg)`` on every face of ``data`` (a FaceSet or a prepared dataset folder) for
    ``train.pretrain_epochs`` (default ``train.epochs``); checkpoints in ``checkpoint_dir/main.pt`` resume."""
    from fers_dist.data.loader import FaceSet, load_faces
    from fers_dist.train.fold import resolve_device
    from fers_dist.train.speed import set_alloc_conf
    from fers_dist.train.trainer import Trainer

    t0 = time.perf_counter()
    pcfg = pretrain_config(cfg)
    set_alloc_conf(pcfg)
    faces = data if isinstance(data, FaceSet) else load_faces(data)
    dev = resolve_device(device or pcfg.train.device)
    g = torch.Generator(device=dev)
    g.manual_seed(pcfg.train.seed * 1000 + PRETRAIN_SEED_OFFSET)
    torch.manual_seed(pcfg.train.seed * 1000 + PRETRAIN_SEED_OFFSET)
    ckpt = None
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = Path(checkpoint_dir) / "main.pt"
    trainer = Trainer(pcfg, faces.to(dev), g, epochs=pcfg.train.pretrain_epochs or pcfg.train.epochs, log=log)
    epochs = trainer.fit(ckpt, report, config_hash=pcfg.hash())
    last = trainer.history[-1] if trainer.history else {}
    return {"dataset": faces.dataset, "variant": pcfg.model.variant, "config_hash": pcfg.hash(),
            "epochs": epochs, "train_accuracy": last.get("train_accuracy"), "loss": last.get("loss"),
            "n_images": len(faces), "n_subjects": faces.n_subjects(), "num_classes": faces.num_classes,
            "wall_s": time.perf_counter() - t0}
