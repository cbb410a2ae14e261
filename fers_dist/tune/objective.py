"""The Ray-free part of a tuning trial: nested CV on the outer fold's TRAINING subjects only.

:class:`NestedCV` drops the outer test fold first (:func:`outer_training_side`; the test faces never
exist inside the objective), carves ``k`` subject-disjoint inner (train, validation) splits from what is
left, builds one :class:`~fers_dist.train.trainer.Trainer` per inner fold and runs them in LOCKSTEP:
epoch e of every inner fold, then one report with the mean inner-validation accuracy at epoch e, so a
scheduler (ASHA) can stop a weak trial on epochs.

Objectives (``tune.objective``):

- ``fer``: maximise ``inner_val_accuracy`` (mean over the inner folds).
- ``fer+fes``: also maximise ``fes_realism`` (Pareto front), measured at the last epoch with the paper's
  Table V protocol inside each inner fold (``fers_dist.train.fes_eval.fes_eval_fold``): an independent
  recogniser (``no_mtl``, trained with L_cls on the inner fold's REAL training faces, with the BASE
  config, so it is the same judge for every trial) classifies every target expression synthesised for
  every inner-validation face; the score is its accuracy. The judge (and the identity network) is
  trained once per inner fold per worker process and cached. ``fes_identity_cosine`` is recorded too.
- ``fer-fast``: also minimise ``device_hours`` = trial wall time x devices held (GPUs per trial, or
  CPUs per trial on a CPU-only run): two objectives, so the Pareto front shows what accuracy each
  budget buys, rather than one accuracy/hour ratio that a useless one-epoch trial would win.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from fers_dist.config import Config
from fers_dist.data.loader import FaceSet, inner_folds, split_fold
from fers_dist.errors import FersError
from fers_dist.train.evaluate import accuracy, recompute_bn_stats
from fers_dist.train.fold import resolve_device
from fers_dist.train.speed import use_amp
from fers_dist.train.trainer import Trainer

OBJECTIVES: dict[str, list[tuple[str, str]]] = {  # objective -> [(metric, mode)]
    "fer": [("inner_val_accuracy", "max")],
    "fer+fes": [("inner_val_accuracy", "max"), ("fes_realism", "max")],
    "fer-fast": [("inner_val_accuracy", "max"), ("device_hours", "min")],
}


def outer_training_side(faces: FaceSet, outer_fold: int) -> FaceSet:
    """The faces of every outer fold but ``outer_fold``: the ONLY data a tuning trial receives."""
    train_idx, _ = split_fold(faces, outer_fold)
    side = faces.subset(train_idx)
    if bool((side.folds == outer_fold).any()):  # a real check, not an assert: it must survive python -O
        raise RuntimeError(f"outer test fold {outer_fold} leaked into the tuning data")
    return side


def inner_splits(side: FaceSet, k: int, seed: int) -> list[tuple[FaceSet, FaceSet]]:
    """``k`` subject-disjoint (inner train, inner validation) FaceSets carved from ``side``; their ``folds``
    hold the INNER fold of each face (so ``split_fold(inner_train + inner_val, f)`` is inner fold f)."""
    if side.n_subjects() < k:
        raise FersError(f"tune.inner_folds: {k} inner folds need at least {k} training subjects, the outer "
                        f"fold's training side has {side.n_subjects()}")
    splits = inner_folds(side, torch.arange(len(side)), k, seed)
    inner = torch.empty(len(side), dtype=torch.int64)
    for f, (_, va) in enumerate(splits):
        inner[va] = f
    side = replace(side, folds=inner.to(side.folds.device))
    out = []
    for tr, va in splits:
        train, val = side.subset(tr), side.subset(va)
        shared = set(train.subjects.tolist()) & set(val.subjects.tolist())
        if shared or not len(val):
            raise RuntimeError(f"inner split is not subject-disjoint or is empty (shared: {sorted(shared)})")
        out.append((train, val))
    return out


_JUDGES: dict[tuple, dict] = {}  # per process: (inner fold, judge config, epochs) -> fes_eval_fold cache


def _judge_cache(key: tuple) -> dict:
    if key not in _JUDGES:
        if len(_JUDGES) > 16:
            _JUDGES.clear()
        _JUDGES[key] = {}
    return _JUDGES[key]


class NestedCV:
    """One trial's objective: ``k`` inner folds trained in lockstep on the outer training side."""

    def __init__(self, cfg: Config, faces: FaceSet, *, outer_fold: int, k: int, epochs: int,
                 objective: str = "fer", devices_held: float = 1.0, fes_cfg: Config | None = None,
                 log: Callable[[str], None] = lambda m: None):
        if objective not in OBJECTIVES:
            raise FersError(f"tune.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.cfg, self.epochs, self.objective, self.devices_held = cfg, epochs, objective, devices_held
        self.t0, self.fes_cfg, self.log, self.outer_fold = time.perf_counter(), fes_cfg or cfg, log, outer_fold
        self.device = device = resolve_device(cfg.train.device)
        self.amp = use_amp(cfg, device)
        seed = cfg.train.seed * 1000 + outer_fold
        side = outer_training_side(faces, outer_fold)
        self.subjects = sorted(side.subject_names[i] for i in side.subjects.unique().tolist())  # all it may see
        self.splits = inner_splits(side, k, seed)
        self.trainers: list[Trainer] = []
        self.vals: list[FaceSet] = []
        for f, (train, val) in enumerate(self.splits):
            torch.manual_seed(seed * 100 + f)  # the same model init for every trial: common random numbers
            g = torch.Generator(device=device).manual_seed(seed * 100 + f)
            trainer = Trainer(cfg, train.to(device), g, epochs=epochs, log=log)
            if objective == "fer+fes" and not getattr(trainer.model, "has_fes", False):
                raise FersError(f"tune.objective: fer+fes needs a variant with a synthesis branch, "
                                f"{cfg.model.variant} has none")
            trainer.model.train()
            self.trainers.append(trainer)
            self.vals.append(val.to(device))

    def epoch(self, e: int) -> dict:
        """Epoch ``e`` of every inner fold, then the metrics the scheduler and the searcher see."""
        crop, accs, losses = self.cfg.model.input_size, [], []
        for trainer, val in zip(self.trainers, self.vals):
            losses.append(trainer.run_epoch(e)["loss"])
            if self.cfg.tune.precise_bn:  # from the inner TRAINING faces only
                recompute_bn_stats(trainer.model, trainer.train_set, crop, amp=self.amp)
            accs.append(accuracy(trainer.model, val, crop, self.amp))
            trainer.model.train()
        wall = time.perf_counter() - self.t0
        m = {"epoch": e, "epochs_trained": e + 1, "inner_val_accuracy": sum(accs) / len(accs),
             "train_loss": sum(losses) / len(losses), "wall_s": wall,
             "device_hours": wall / 3600 * self.devices_held}
        m.update({f"inner_val_accuracy_f{f}": a for f, a in enumerate(accs)})
        if self.objective == "fer+fes" and e == self.epochs - 1:
            fes = [self.fes_eval(f) for f in range(len(self.trainers))]
            m["fes_realism"] = sum(r["accuracy"] for r in fes) / len(fes)
            m["fes_identity_cosine"] = sum(r["identity_cosine"] for r in fes) / len(fes)
        return m

    def fes_eval(self, f: int) -> dict:
        """Table V inside inner fold ``f``: the cached real-data judge rates this trial's synthesis."""
        from fers_dist.train.fes_eval import fes_eval_fold

        train, val = self.splits[f]
        inner = FaceSet(images=torch.cat([train.images, val.images]), labels=torch.cat([train.labels, val.labels]),
                        subjects=torch.cat([train.subjects, val.subjects]), folds=torch.cat([train.folds, val.folds]),
                        class_names=val.class_names, subject_names=val.subject_names, dataset=val.dataset)
        key = (val.dataset, self.outer_fold, len(self.splits), f, self.fes_cfg.hash(), self.epochs, str(self.device))
        return fes_eval_fold(self.fes_cfg, inner, f, self.trainers[f].model, recogniser_epochs=self.epochs,
                             identity="auto", identity_faces=32, device=str(self.device),
                             cache=_judge_cache(key), log=self.log)

    def run(self, report: Callable[[dict], None] | None = None) -> dict:
        """All epochs in lockstep; ``report(metrics)`` after each. Returns the last metrics."""
        m: dict = {}
        for e in range(self.epochs):
            m = self.epoch(e)
            if report:
                report(m)
        return m
