"""Each loss of eq. 5-10 and the λ4 ramp against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from fers_dist.config import LossConfig
from fers_dist.model.losses import cls_loss, cyc_loss, gan_loss, idt_loss, lambda_idt, rec_loss, total_loss


def test_cls_loss_is_cross_entropy_eq5():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    want = [-(logits[i, labels[i]] - math.log(logits[i].exp().sum())) for i in range(2)]
    assert cls_loss(logits, labels).item() == pytest.approx(sum(want).item() / 2, rel=1e-6)


@pytest.mark.parametrize("is_real", [True, False])
def test_gan_loss_bce_is_standard_log_loss_eq6(is_real):
    pred = torch.tensor([[-1.5, 0.0], [0.7, 2.0]])
    p = torch.sigmoid(pred)
    want = -(p.log() if is_real else (1 - p).log()).mean()
    assert gan_loss(pred, is_real).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("is_real, target", [(True, 1.0), (False, 0.0)])
def test_gan_loss_lsgan_is_squared_distance_to_one_or_zero(is_real, target):
    pred = torch.tensor([0.2, -0.4, 1.5])
    want = sum((v - target) ** 2 for v in pred.tolist()) / 3
    assert gan_loss(pred, is_real, kind="lsgan").item() == pytest.approx(want, rel=1e-6)


def test_gan_loss_unknown_kind():
    with pytest.raises(ValueError, match="loss.gan"):
        gan_loss(torch.zeros(2), True, kind="hinge")


@pytest.mark.parametrize("fn", [rec_loss, cyc_loss, idt_loss], ids=["rec_eq7", "cyc_eq8", "idt_eq9"])
def test_squared_error_losses(fn):
    a = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    b = torch.tensor([[0.0, -1.0], [0.5, 2.0]])
    assert fn(a, b).item() == pytest.approx((1 + 1 + 0 + 4) / 4)


def test_total_loss_eq10_with_paper_weights():
    cfg = LossConfig()
    terms = {k: torch.tensor(v) for k, v in {"cls": 1.2, "adv": 0.7, "rec": 0.3, "cyc": 0.4, "idt": 2.0}.items()}
    lam = {"adv": cfg.lam_adv, "rec": cfg.lam_rec, "cyc": cfg.lam_cyc, "idt": 0.25}
    want = 1.2 + 0.3 * 0.7 + 1.0 * 0.3 + 0.5 * 0.4 + 0.25 * 2.0
    assert total_loss(terms, lam).item() == pytest.approx(want, rel=1e-6)


def test_total_loss_subsets_and_zero_weights():
    cls = torch.tensor(0.9)
    assert total_loss({"cls": cls}, {}).item() == pytest.approx(0.9)
    nan = torch.tensor(float("nan"))
    assert total_loss({"cls": cls, "idt": nan}, {"idt": 0.0}).item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no weight for term 'rec'"):
        total_loss({"cls": cls, "rec": cls}, {})
    with pytest.raises(ValueError, match="unknown term"):
        total_loss({"cls": cls, "style": cls}, {"style": 1.0})


def test_lambda_idt_ramp():
    assert lambda_idt(0, 500, 0.1, 0.5) == pytest.approx(0.1)
    assert lambda_idt(499, 500, 0.1, 0.5) == pytest.approx(0.5)
    assert lambda_idt(2, 5, 0.1, 0.5) == pytest.approx(0.3)  # halfway: epoch 2 of 0..4
    assert lambda_idt(10, 5, 0.1, 0.5) == pytest.approx(0.5)  # clamped after the end
    assert lambda_idt(0, 1, 0.1, 0.5) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="epochs"):
        lambda_idt(0, 0, 0.1, 0.5)
