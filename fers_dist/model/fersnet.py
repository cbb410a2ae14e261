"""FERSNet (paper Sec. III, Fig. 2) and its Table VI ablation variants.

Read top to bottom: the building blocks, the heads (f_cls, f_tra, f_dec), the full two-branch model
with a bidirectional ConvFLU pair after each of the four encoder blocks, the two reduced variants, and
``build_model`` which picks one from ``cfg.variant``.

Spatial sizes for the paper's 96x96 input: 96 -> 48 -> 24 -> 12 -> 6 through the encoders, and
6 -> 12 -> 24 -> 48 -> 96 back through f_dec. Images are in [-1, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fers_dist.config import ModelConfig
from fers_dist.model.convflu import ConvFLU

N_BLOCKS = 4  # encoder blocks per branch, each halving H and W


# -- building blocks ----------------------------------------------------------------------------
def conv_block(cin: int, cout: int, convs: int = 2, kernel: int = 3) -> nn.Sequential:
    """``convs`` x [conv kernel x kernel, stride 1, same padding -> BatchNorm -> ReLU] (FERSNet: 2 x 3x3)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, kernel, 1, kernel // 2, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def encoder_block(cin: int, cout: int, convs: int = 2, kernel: int = 3) -> nn.Sequential:
    """FER block and FES encoder block: conv_block followed by maxpool 2x2 stride 2."""
    return nn.Sequential(conv_block(cin, cout, convs, kernel), nn.MaxPool2d(2, 2))


def decoder_block(cin: int, cout: int) -> nn.Sequential:
    """f_dec block: deconv 2x2 stride 2 replaces the maxpool (upsampling first), then conv_block."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2), conv_block(cout, cout))


def encoder(cin: int, width: int, convs: int = 2, kernel: int = 3) -> nn.ModuleList:
    return nn.ModuleList(encoder_block(cin if i == 0 else width, width, convs, kernel) for i in range(N_BLOCKS))


def bottleneck_size(cfg: ModelConfig) -> int:
    """H = W of the encoder output (6 for the paper's 96x96 input)."""
    return cfg.input_size // 2**N_BLOCKS


# -- heads --------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """f_cls: 2 fully connected layers giving the E expression logits."""

    def __init__(self, width: int, size: int, hidden: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(width * size * size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, feat: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(feat.flatten(1))))


class TargetTransform(nn.Module):
    """f_tra: one-hot target expression -> a (width, size, size) map, the FES encoder output's size.

    FC to a width-d vector, then a deconv whose kernel covers the whole map (1x1 -> size x size).
    """

    def __init__(self, num_classes: int, width: int, size: int):
        super().__init__()
        self.fc = nn.Linear(num_classes, width)
        self.deconv = nn.ConvTranspose2d(width, width, kernel_size=size)

    def forward(self, onehot: Tensor) -> Tensor:
        v = torch.relu(self.fc(onehot))
        return torch.relu(self.deconv(v[:, :, None, None]))


class Decoder(nn.Module):
    """f_dec: 4 upsampling blocks (size -> 16 x size), then a conv to the image channels and tanh."""

    def __init__(self, cin: int, width: int, out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(*(decoder_block(cin if i == 0 else width, width) for i in range(N_BLOCKS)))
        self.to_image = nn.Conv2d(width, out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.to_image(self.blocks(x)))


def _check_target(target_onehot: Tensor, image: Tensor, num_classes: int) -> None:
    if target_onehot.shape != (image.shape[0], num_classes):
        raise ValueError(
            f"target_onehot must have shape [batch={image.shape[0]}, num_classes={num_classes}], "
            f"got {list(target_onehot.shape)}"
        )


# -- outputs ------------------------------------------------------------------------------------
class Gates(NamedTuple):
    """ConvFLU gates at one position: into FER (fer_*) and into FES (fes_*); r eq. 1, z eq. 3."""

    fer_r: Tensor
    fer_z: Tensor
    fes_r: Tensor
    fes_z: Tensor


class FERSOutput(NamedTuple):
    logits: Tensor  # [B, E]
    image: Tensor | None  # synthesised face in [-1, 1]; None without a target or without FES
    gates: list[Gates]  # one per ConvFLU position; empty for variants without ConvFLU


# -- the full model -----------------------------------------------------------------------------
class FERSNet(nn.Module):
    """Two branches (FER, FES encoder) linked by a ConvFLU pair after each block; f_cls on the FER
    side, f_tra + f_dec on the FES side. Variants ``original`` and ``fes_da``."""

    has_fes = True

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        w, size = cfg.width, bottleneck_size(cfg)
        self.width, self.num_classes = w, num_classes
        self.fer_blocks = encoder(cfg.in_channels, w)
        self.fes_blocks = encoder(cfg.in_channels, w)
        n_flu = 1 if cfg.share_convflu else N_BLOCKS
        self.flu_fer = nn.ModuleList(ConvFLU(w) for _ in range(n_flu))  # FES -> FER
        self.flu_fes = nn.ModuleList(ConvFLU(w) for _ in range(n_flu))  # FER -> FES
        self.f_cls = Classifier(w, size, cfg.cls_hidden, num_classes)
        self.f_tra = TargetTransform(num_classes, w, size)
        self.f_dec = Decoder(2 * w, w, cfg.in_channels)

    def forward(self, image: Tensor, target_onehot: Tensor | None = None) -> FERSOutput:
        fer = fes = image
        gates: list[Gates] = []
        for i in range(N_BLOCKS):
            fer, fes = self.fer_blocks[i](fer), self.fes_blocks[i](fes)
            j = i % len(self.flu_fer)  # 0 at every position when share_convflu
            new_fer, fer_r, fer_z = self.flu_fer[j](fer, fes)
            new_fes, fes_r, fes_z = self.flu_fes[j](fes, fer)
            fer, fes = new_fer, new_fes
            gates.append(Gates(fer_r, fer_z, fes_r, fes_z))
        logits = self.f_cls(fer)
        if target_onehot is None:
            return FERSOutput(logits, None, gates)
        _check_target(target_onehot, image, self.num_classes)
        fake = self.f_dec(torch.cat([fes, self.f_tra(target_onehot)], dim=1))
        return FERSOutput(logits, fake, gates)


# -- ablations (Table VI) -----------------------------------------------------------------------
class Capacity(NamedTuple):
    """A reduced variant's enlarged encoder: filters, convs per block, kernel size (FERSNet: w, 2, 3)."""

    width: int
    convs: int = 2
    kernel: int = 3


class FERNet(nn.Module):
    """``no_mtl``: the FER branch and f_cls alone, enlarged (no FES, no ConvFLU)."""

    has_fes = False

    def __init__(self, cfg: ModelConfig, num_classes: int, cap: Capacity):
        super().__init__()
        self.width, self.num_classes, self.capacity = cap.width, num_classes, cap
        self.fer_blocks = encoder(cfg.in_channels, cap.width, cap.convs, cap.kernel)
        self.f_cls = Classifier(cap.width, bottleneck_size(cfg), cfg.cls_hidden, num_classes)

    def forward(self, image: Tensor, target_onehot: Tensor | None = None) -> FERSOutput:
        feat = image
        for block in self.fer_blocks:
            feat = block(feat)
        return FERSOutput(self.f_cls(feat), None, [])


class SharedTrunkNet(nn.Module):
    """``no_convflu``: hard parameter sharing, one trunk of 4 blocks feeding f_cls and f_tra + f_dec,
    its trunk enlarged."""

    has_fes = True

    def __init__(self, cfg: ModelConfig, num_classes: int, cap: Capacity):
        super().__init__()
        size, width = bottleneck_size(cfg), cap.width
        self.width, self.num_classes, self.capacity = width, num_classes, cap
        self.trunk = encoder(cfg.in_channels, width, cap.convs, cap.kernel)
        self.f_cls = Classifier(width, size, cfg.cls_hidden, num_classes)
        self.f_tra = TargetTransform(num_classes, width, size)
        self.f_dec = Decoder(2 * width, width, cfg.in_channels)

    def forward(self, image: Tensor, target_onehot: Tensor | None = None) -> FERSOutput:
        feat = image
        for block in self.trunk:
            feat = block(feat)
        logits = self.f_cls(feat)
        if target_onehot is None:
            return FERSOutput(logits, None, [])
        _check_target(target_onehot, image, self.num_classes)
        return FERSOutput(logits, self.f_dec(torch.cat([feat, self.f_tra(target_onehot)], dim=1)), [])


# -- capacity matching --------------------------------------------------------------------------
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_params(build: Callable[[], nn.Module]) -> int:
    """Parameter count of a model built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return count_params(build())


def smallest_width(params_at: Callable[[int], int], target: int, start: int) -> int:
    """Smallest width >= start with params_at(width) >= target (params_at grows with width)."""
    hi = start
    while params_at(hi) < target:
        hi *= 2
    lo = start
    while lo < hi:
        mid = (lo + hi) // 2
        if params_at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


_REDUCED: dict[str, type[nn.Module]] = {"no_mtl": FERNet, "no_convflu": SharedTrunkNet}


DEPTH_KERNEL = 5  # capacity_match=depth: the paper enlarges "kernel size and network depth"


@functools.lru_cache(maxsize=64)
def _capacity_cached(variant: str, cfg_json: str, num_classes: int) -> Capacity:
    cfg = ModelConfig.model_validate_json(cfg_json)
    target = _meta_params(lambda: FERSNet(cfg, num_classes))
    cls = _REDUCED[variant]
    if cfg.capacity_match == "width":
        return Capacity(smallest_width(lambda w: _meta_params(lambda: cls(cfg, num_classes, Capacity(w))),
                                       target, cfg.width))
    cap = Capacity(cfg.width, 2, DEPTH_KERNEL)  # depth: 5x5 kernels, then one more conv per block until
    while _meta_params(functools.partial(cls, cfg, num_classes, cap)) < target:  # FERSNet's count is reached
        cap = cap._replace(convs=cap.convs + 1)
    return cap


def capacity(cfg: ModelConfig, num_classes: int, variant: str | None = None) -> Capacity:
    """The enlarged encoder at which a reduced variant has at least as many parameters as FERSNet
    (``model.capacity_match``: ``depth`` as the paper did, or ``width``)."""
    return _capacity_cached(variant or cfg.variant, cfg.model_dump_json(), num_classes)


def architecture(cfg: ModelConfig, num_classes: int) -> dict:
    """What ``build_model`` builds, for every result row: the encoder shape and the parameter counts."""
    fersnet = _meta_params(lambda: FERSNet(cfg, num_classes))
    if cfg.variant not in _REDUCED:
        return {"width": cfg.width, "convs_per_block": 2, "kernel": 3, "params": fersnet, "fersnet_params": fersnet}
    cap = capacity(cfg, num_classes)
    params = _meta_params(lambda: _REDUCED[cfg.variant](cfg, num_classes, cap))
    return {"capacity_match": cfg.capacity_match, "width": cap.width, "convs_per_block": cap.convs,
            "kernel": cap.kernel, "params": params, "fersnet_params": fersnet}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The generator for ``cfg.variant``; every variant returns FERSOutput from forward."""
    if cfg.variant in ("original", "fes_da"):
        return FERSNet(cfg, num_classes)
    if cfg.variant in _REDUCED:
        return _REDUCED[cfg.variant](cfg, num_classes, capacity(cfg, num_classes))
    raise ValueError(f"model.variant: unknown variant {cfg.variant!r}")
