"""Evaluation of one fold's recogniser on its held-out test fold: accuracy, per-class accuracy, the
confusion matrix, and the mean ConvFLU gates (paper Fig. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fers_dist.data.loader import FaceSet, center_crop
from fers_dist.train.speed import autocast, batch_norms

GATE_NAMES = ("fer_r", "fer_z", "fes_r", "fes_z")  # r: leaky gate (eq. 1), z: memory gate (eq. 3)
GATE_MAP_SIZE = 12  # gate maps are stored pooled to at most 12x12 per position


def _gate(g, name: str) -> torch.Tensor:
    return g[name] if isinstance(g, dict) else getattr(g, name)


@torch.no_grad()
def evaluate(model: torch.nn.Module, faces: FaceSet, crop: int, batch_size: int = 256,
             amp: bool = False) -> dict:
    """Centre-crop test evaluation of ``model`` (in eval mode) on every face of ``faces``."""
    was_training = model.training
    model.eval()
    device = faces.images.device
    E = faces.num_classes
    preds, gate_sums = [], None
    for start in range(0, len(faces), batch_size):
        x = center_crop(faces.images[start:start + batch_size], crop)
        with autocast(device, amp):
            out = model(x)
        preds.append(out.logits.float().argmax(1))
        if out.gates:
            sums = [{n: _pool(_gate(g, n)).sum(0) for n in GATE_NAMES} for g in out.gates]
            gate_sums = sums if gate_sums is None else [
                {n: a[n] + b[n] for n in GATE_NAMES} for a, b in zip(gate_sums, sums)]
    model.train(was_training)
    pred = torch.cat(preds)
    y = faces.labels
    confusion = torch.bincount(y * E + pred, minlength=E * E).view(E, E).cpu()
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    per_class[confusion.sum(1) == 0] = float("nan")
    result = {
        "accuracy": float(confusion.diag().sum() / confusion.sum()),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
        "n_test_images": len(faces),
        "n_test_subjects": faces.n_subjects(),
        "gate_means": {},
        "gate_maps": {},
    }
    for i, sums in enumerate(gate_sums or [], start=1):
        for n in GATE_NAMES:
            m = (sums[n] / len(faces)).float().cpu()  # [h, w], mean over images and channels
            result["gate_means"][f"{n}{i}"] = float(m.mean())
            result["gate_maps"][f"{n}{i}"] = m.tolist()
    return result


def _pool(gate: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h', w'] channel mean, pooled to at most GATE_MAP_SIZE."""
    m = gate.float().mean(1, keepdim=True)
    if m.shape[-1] > GATE_MAP_SIZE:
        m = F.adaptive_avg_pool2d(m, GATE_MAP_SIZE)
    return m[:, 0]


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, faces: FaceSet, crop: int, batch_size: int = 256,
                       amp: bool = False) -> None:
    """Replace BatchNorm's running statistics with the exact statistics of ``faces`` (centre crops, as the
    recogniser sees at test time), one forward pass, no gradient ("precise BN", Wu & Johnson 2021).

    After a few epochs the running averages (momentum 0.1) still hold much of their initial values, and
    an eval-mode model then predicts one class for every face: a short run (a tuning trial's early epochs,
    which ASHA judges) would score chance whatever it learned. Pass TRAINING faces only."""
    norms = batch_norms(model)
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    device = faces.images.device
    for start in range(0, len(faces), batch_size):
        with autocast(device, amp):
            model(center_crop(faces.images[start:start + batch_size], crop))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def accuracy(model: torch.nn.Module, faces: FaceSet, crop: int, amp: bool = False) -> float:
    """Just the accuracy (inner validation during training); no gates, no confusion."""
    return evaluate(model, faces, crop, amp=amp)["accuracy"]
