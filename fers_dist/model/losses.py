"""The paper's losses, one function per equation (Sec. III-C).

    L = L_cls + λ1 L_GAN + λ2 L_rec + λ3 L_cyc + λ4 L_idt        eq. 10

The squared norms of eq. 7-9 are taken as means over elements (mean squared error), so the λ values
do not depend on the image or feature size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TERMS = ("cls", "adv", "rec", "cyc", "idt")
GAN_KINDS = ("bce", "lsgan")


def cls_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """eq. 5: cross-entropy of the expression logits against the integer labels."""
    return F.cross_entropy(logits, labels)


def gan_loss(pred: Tensor, is_real: bool, kind: str = "bce") -> Tensor:
    """eq. 6: the standard log loss on D's logits (``bce``), or least squares to 1/0 (``lsgan``).

    The generator calls it with ``is_real=True`` on D(fake) (the non-saturating form)."""
    target = torch.full_like(pred, 1.0 if is_real else 0.0)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(pred, target)
    if kind == "lsgan":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss.gan: unknown kind {kind!r}, expected one of {GAN_KINDS}")


def rec_loss(fake: Tensor, target_image: Tensor) -> Tensor:
    """eq. 7: ||G(z^t, I) - I^t||^2, I^t a real image of the same subject with the target expression."""
    return F.mse_loss(fake, target_image)


def cyc_loss(cycled: Tensor, image: Tensor) -> Tensor:
    """eq. 8: ||G(z, G(z^t, I)) - I||^2, z the true label of I."""
    return F.mse_loss(cycled, image)


def idt_loss(feat_fake: Tensor, feat_target: Tensor) -> Tensor:
    """eq. 9: ||f_LCNN(G(z^t, I)) - f_LCNN(I^t)||^2 over the (frozen) LightCNN features."""
    return F.mse_loss(feat_fake, feat_target)


def total_loss(terms: dict[str, Tensor], lam: dict[str, float]) -> Tensor:
    """eq. 10. ``terms`` holds any of cls, adv, rec, cyc, idt (variants without FES pass only cls);
    ``lam`` holds the weight of every term present besides cls (adv: λ1, rec: λ2, cyc: λ3, idt: λ4).
    A term whose weight is 0 is left out, so it may be skipped upstream."""
    unknown = sorted(set(terms) - set(TERMS)) + sorted(set(lam) - set(TERMS))
    if unknown:
        raise ValueError(f"total_loss: unknown term(s) {unknown}, expected keys from {TERMS}")
    if not terms:
        raise ValueError("total_loss: no loss terms given")
    total: Tensor | None = None
    for name, value in terms.items():
        if name != "cls" and name not in lam:
            raise ValueError(f"total_loss: no weight for term {name!r} in lam")
        weight = lam.get(name, 1.0)
        if weight == 0:
            continue
        part = value if weight == 1.0 else weight * value
        total = part if total is None else total + part
    return total if total is not None else torch.zeros((), device=next(iter(terms.values())).device)


def lambda_idt(epoch: int, epochs: int, start: float, end: float) -> float:
    """λ4 ramp: linear from ``start`` at epoch 0 to ``end`` at epoch ``epochs - 1`` (clamped outside).

    With a single epoch the ramp has no length and λ4 stays at ``start``."""
    if epochs < 1:
        raise ValueError(f"lambda_idt: epochs must be >= 1, got {epochs}")
    if epochs == 1:
        return float(start)
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return float(start + (end - start) * t)
