"""Conditional PatchGAN discriminator (pix2pix's NLayerDiscriminator), paper Sec. III-C.

It sees (label, image): the one-hot label is tiled over H x W and concatenated to the image channels.
Each output logit judges one overlapping patch of the input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fers_dist.config import ConfigError, ModelConfig


def _down(cin: int, cout: int, stride: int, norm: bool) -> list[nn.Module]:
    """conv 4x4 pad 1 -> [BatchNorm] -> LeakyReLU(0.2), as in pix2pix."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, stride, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def patch_size(input_size: int, layers: int) -> int:
    """Side of the patch-logit map: ``layers`` stride-2 convs, then two stride-1 4x4 convs."""
    size = input_size
    for _ in range(layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2


class PatchDiscriminator(nn.Module):
    """``cfg.disc_layers`` stride-2 convs with ``cfg.disc_width`` base filters (doubling, capped at 8x)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if patch_size(cfg.input_size, cfg.disc_layers) < 1:
            raise ConfigError(
                f"model.disc_layers: {cfg.disc_layers} stride-2 layers leave no patch of a "
                f"{cfg.input_size}x{cfg.input_size} input; use fewer layers or a larger model.input_size"
            )
        self.num_classes = num_classes
        nf = cfg.disc_width
        layers = _down(cfg.in_channels + num_classes, nf, 2, norm=False)
        mult = 1
        for n in range(1, cfg.disc_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.disc_layers else 1  # the last widening conv keeps the resolution
            layers += _down(nf * prev, nf * mult, stride, norm=True)
        layers.append(nn.Conv2d(nf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor, onehot: Tensor) -> Tensor:
        if onehot.shape != (image.shape[0], self.num_classes):
            raise ValueError(
                f"onehot must have shape [batch={image.shape[0]}, num_classes={self.num_classes}], "
                f"got {list(onehot.shape)}"
            )
        label_map = onehot[:, :, None, None].to(image.dtype).expand(-1, -1, *image.shape[2:])
        return self.net(torch.cat([image, label_map], dim=1))
