"""LightCNN-9 (Wu et al., "A Light CNN for Deep Face Representation with Noisy Labels"), the paper's
identity network "model B" for L_idt (eq. 9): gray 128x128 input in [0, 1] -> 256-d feature.

The module tree reproduces the official ``network_9layers`` so that its released checkpoint
(``LightCNN_9Layers_checkpoint.pth.tar``) loads unchanged. State-dict keys:

    features.0.filter.*                mfm conv 5x5, 1 -> 48
    features.{2,4,6,7}.conv_a.filter.* group: mfm 1x1 (c -> c), then
    features.{2,4,6,7}.conv.filter.*          mfm 3x3 (c -> c')      48->96, 96->192, 192->128, 128->128
    fc1.filter.*                       mfm linear 8*8*128 -> 256
    fc2.*                              linear 256 -> num_classes (79077 for the released model)

(indices 1, 3, 5, 8 are the parameter-free max pools).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fers_dist.errors import FersError

INPUT_SIZE = 128
FEATURE_DIM = 256
OFFICIAL_CLASSES = 79077


class MFM(nn.Module):
    """Max-feature-map: a conv (or linear) to 2 x cout channels, then the elementwise max of the halves."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1,
                 linear: bool = False):
        super().__init__()
        self.out_channels = cout
        self.filter = nn.Linear(cin, 2 * cout) if linear else nn.Conv2d(cin, 2 * cout, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.filter(x).split(self.out_channels, dim=1)
        return torch.max(a, b)


class Group(nn.Module):
    """A 1x1 MFM conv (``conv_a``) followed by a k x k MFM conv (``conv``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv_a = MFM(cin, cin, 1, 1, 0)
        self.conv = MFM(cin, cout, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.conv_a(x))


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


class LightCNN9(nn.Module):
    """LightCNN-9. ``forward(x) -> (logits, feature256)`` like the official model; ``features(x)``
    gives the 256-d identity feature alone. ``width`` scales every channel count (1.0 = official;
    smaller values are for the subject encoder trained from scratch)."""

    def __init__(self, num_classes: int = OFFICIAL_CLASSES, width: float = 1.0):
        super().__init__()
        c = [max(1, round(n * width)) for n in (48, 96, 192, 128)]
        trunk = nn.Sequential(
            MFM(1, c[0], 5, 1, 2), _pool(),
            Group(c[0], c[1]), _pool(),
            Group(c[1], c[2]), _pool(),
            Group(c[2], c[3]), Group(c[3], c[3]), _pool(),
        )
        # Registered as "features" for the official key names. The ``features`` method below shadows
        # attribute access (and add_module refuses the name), so the trunk goes into _modules directly
        # and is reached through ``self.trunk``.
        self._modules["features"] = trunk
        self.fc1 = MFM(c[3] * (INPUT_SIZE // 16) ** 2, FEATURE_DIM, linear=True)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)

    @property
    def trunk(self) -> nn.Sequential:
        return self._modules["features"]

    def features(self, x: Tensor) -> Tensor:
        """Gray [B, 1, 128, 128] in [0, 1] -> identity feature [B, 256]."""
        return self.fc1(self.trunk(x).flatten(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.features(x)
        return self.fc2(F.dropout(feat, training=self.training)), feat


def luma(images: Tensor) -> Tensor:
    """RGB images [B, 3, H, W] (any value range) -> their ITU-R BT.601 luma [B, 1, H, W]."""
    return (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def to_lightcnn_input(images: Tensor) -> Tensor:
    """Images in [-1, 1] with 1 or 3 (RGB) channels -> gray [B, 1, 128, 128] in [0, 1] (bilinear)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got {list(images.shape)}")
    gray = ((luma(images) if images.shape[1] == 3 else images) + 1) / 2
    if gray.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        gray = F.interpolate(gray, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return gray


# -- loading the released checkpoint ------------------------------------------------------------
_EXPECTED = "a LightCNN-9 state dict with keys features.0.filter.weight, fc1.filter.weight, fc2.weight, ..."


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint not found"
        raise FersError(f"{path}: LightCNN-9 {what} (identity.checkpoint must name the official "
                        f"LightCNN_9Layers_checkpoint.pth.tar)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling, zip and legacy-format errors all mean "not a checkpoint")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise FersError(f"{path}: cannot read LightCNN-9 checkpoint ({type(e).__name__}: {reason}); "
                        f"expected {_EXPECTED}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FersError(f"{path}: expected {_EXPECTED} (optionally under 'state_dict'); "
                        f"got {type(obj).__name__}{' with keys ' + _keys(obj) if isinstance(obj, dict) else ''}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _keys(d: dict, n: int = 4) -> str:
    keys = [str(k) for k in d]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def _check_compatible(path: Path, state: dict[str, Tensor], model: LightCNN9) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc2.")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith("fc2.")]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(s)})"
             for k, s in expected.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        if wrong:
            got = "wrong shapes: " + "; ".join(wrong[:2])
        elif missing:
            got = "missing " + ", ".join(missing[:3]) + f"; file has keys {_keys(state)}"
        else:
            got = "unexpected keys " + ", ".join(unexpected[:3])
        raise FersError(f"{path}: expected {_EXPECTED}; got {got}")


def load_lightcnn9(path: str | os.PathLike) -> LightCNN9:
    """The released LightCNN-9, frozen (eval mode, no gradients). Accepts the official checkpoint
    (``{'state_dict': {'module.features...': ...}, 'epoch': ..., 'arch': ...}``) or a bare state dict;
    fc2 may have any class count (only features and fc1 are used). Bad files raise FersError."""
    path = Path(path)
    state = _read_state_dict(path)
    fc2 = state.get("fc2.weight")
    num_classes = fc2.shape[0] if fc2 is not None and fc2.dim() == 2 else OFFICIAL_CLASSES
    with torch.device("meta"):  # shapes only: the real tensors come from the file
        probe = LightCNN9(num_classes)
    _check_compatible(path, state, probe)
    model = LightCNN9(num_classes)
    fc2_ok = all(k in state and state[k].shape == v.shape for k, v in model.fc2.state_dict(prefix="fc2.").items())
    if not fc2_ok:
        state = {k: v for k, v in state.items() if not k.startswith("fc2.")}
    model.load_state_dict(state, strict=fc2_ok)
    model.eval().requires_grad_(False)
    return model
