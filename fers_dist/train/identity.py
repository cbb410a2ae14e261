"""Identity features f_LCNN for L_idt (eq. 9), chosen by ``identity.backbone``:

- ``lightcnn9``: the official LightCNN-9 ("model B") checkpoint from ``identity.checkpoint``, frozen;
- ``subject_encoder``: a LightCNN-9 trained first to tell the TRAINING subjects apart (it never sees a
  test subject), then frozen;
- ``none``: no identity loss; λ4 = 0 and the fold result records it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fers_dist.config import Config
from fers_dist.data.loader import FaceSet, apply_augmentation, rotation_table, sample_augmentation
from fers_dist.errors import FersError
from fers_dist.train.speed import autocast, nhwc, to_channels_last, use_amp


class IdentityFeatures(nn.Module):
    """Frozen f_LCNN: images in [-1, 1] -> 256-d features. The identity classifier (``fc2``: 79,077 ways
    for the released model, 20M parameters) is never used for features, so it is dropped."""

    def __init__(self, net: nn.Module, channels_last: bool = False):
        super().__init__()
        if hasattr(net, "fc2"):
            net.fc2 = nn.Identity()
        self.net = to_channels_last(net.eval().requires_grad_(False), channels_last)
        self.channels_last = channels_last

    def train(self, mode: bool = True):  # always stays in eval mode (frozen BN/dropout)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from fers_dist.model.lightcnn import to_lightcnn_input

        return self.net.features(nhwc(to_lightcnn_input(images), self.channels_last))


def build_identity(cfg: Config, train: FaceSet, generator: torch.Generator,
                   log=print) -> IdentityFeatures | None:
    """The identity network for this fold, on the training faces' device (None for ``none``)."""
    backbone = cfg.identity.backbone
    if backbone == "none":
        return None
    from fers_dist.model.lightcnn import load_lightcnn9

    device, nhwc_ = train.images.device, cfg.train.channels_last
    if backbone == "lightcnn9":
        if not cfg.identity.checkpoint:
            raise FersError("identity.checkpoint: a LightCNN-9 checkpoint path is required for "
                            "identity.backbone=lightcnn9 (or use subject_encoder / none)")
        return IdentityFeatures(load_lightcnn9(cfg.identity.checkpoint), nhwc_).to(device)  # fc2 dropped first
    return IdentityFeatures(train_subject_encoder(cfg, train, generator, log), nhwc_)


def train_subject_encoder(cfg: Config, train: FaceSet, generator: torch.Generator, log=print) -> nn.Module:
    """Train a LightCNN-9 to classify the training subjects' identities (train fold only)."""
    from fers_dist.model.lightcnn import LightCNN9, to_lightcnn_input

    device = train.images.device
    ids, target = torch.unique(train.subjects, return_inverse=True)
    if ids.numel() < 2:
        raise FersError("identity.backbone=subject_encoder needs at least 2 training subjects")
    net = LightCNN9(num_classes=ids.numel(), width=cfg.identity.encoder_width).to(device)
    to_channels_last(net, cfg.train.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    crop, bs = cfg.model.input_size, min(64, len(train))
    size, angles = train.images.shape[-1], rotation_table([0.0], device)
    amp = use_amp(cfg, device)
    for epoch in range(cfg.identity.encoder_epochs):
        perm = torch.randperm(len(train), generator=generator, device=device)
        total = torch.zeros((), device=device)
        for start in range(0, len(perm) - 1, bs):
            idx = perm[start:start + bs]
            aff = sample_augmentation(idx.numel(), size, crop, angles, True, generator, device)
            x = nhwc(to_lightcnn_input(apply_augmentation(train.images[idx], aff, crop)), cfg.train.channels_last)
            with autocast(device, amp):
                logits, _ = net(x)
            loss = F.cross_entropy(logits.float(), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        if epoch == cfg.identity.encoder_epochs - 1:
            log(f"subject encoder: {ids.numel()} training subjects, final loss "
                f"{float(total) / max(1, len(perm) // bs):.3f}")
    return net
