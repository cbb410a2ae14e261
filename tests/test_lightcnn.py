"""LightCNN-9: the official key names and shapes, loading official-format checkpoints, and the clear
errors for missing, corrupt and mismatched files."""

from __future__ import annotations

import argparse

import pytest
import torch

from fers_dist.errors import FersError
from fers_dist.model.lightcnn import LightCNN9, load_lightcnn9, to_lightcnn_input

# The released network_9layers checkpoint, written out by hand: (key, shape) of every weight.
OFFICIAL_SHAPES = {
    "features.0.filter.weight": (96, 1, 5, 5),
    "features.2.conv_a.filter.weight": (96, 48, 1, 1),
    "features.2.conv.filter.weight": (192, 48, 3, 3),
    "features.4.conv_a.filter.weight": (192, 96, 1, 1),
    "features.4.conv.filter.weight": (384, 96, 3, 3),
    "features.6.conv_a.filter.weight": (384, 192, 1, 1),
    "features.6.conv.filter.weight": (256, 192, 3, 3),
    "features.7.conv_a.filter.weight": (256, 128, 1, 1),
    "features.7.conv.filter.weight": (256, 128, 3, 3),
    "fc1.filter.weight": (512, 8 * 8 * 128),
    "fc2.weight": (79077, 256),
}


def test_official_key_names_and_shapes():
    with torch.device("meta"):
        state = LightCNN9().state_dict()
    weights = {k: tuple(v.shape) for k, v in state.items() if k.endswith("weight")}
    assert weights == OFFICIAL_SHAPES
    assert {k.removesuffix(".bias") for k in state if k.endswith("bias")} == {
        k.removesuffix(".weight") for k in OFFICIAL_SHAPES
    }


def _official_checkpoint(model: LightCNN9) -> dict:
    """What the official train.py saves: DataParallel ("module.") keys under 'state_dict'."""
    return {"epoch": 80, "arch": "LightCNN-9", "prec1": 99.1,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return LightCNN9(num_classes=12).eval()


@pytest.fixture(scope="module")
def faces():
    return torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(1))


def test_loads_official_format_checkpoint(tmp_path, source, faces):
    path = tmp_path / "LightCNN_9Layers_checkpoint.pth.tar"
    torch.save(_official_checkpoint(source), path)
    model = load_lightcnn9(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    feat = model.features(faces)
    assert feat.shape == (2, 256)
    torch.testing.assert_close(feat, source.features(faces))
    logits, feat2 = model(faces)
    assert logits.shape == (2, 12)
    torch.testing.assert_close(feat2, feat)


def test_loads_bare_state_dict_without_fc2(tmp_path, source, faces):
    path = tmp_path / "bare.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc2.")}, path)
    torch.testing.assert_close(load_lightcnn9(path).features(faces), source.features(faces))


def _error_for(path) -> str:
    with pytest.raises(FersError) as info:
        load_lightcnn9(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _error_for(tmp_path / "nope.pth.tar")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth.tar"
    path.write_bytes(b"\x00not a checkpoint" * 64)
    assert "expected a LightCNN-9 state dict" in _error_for(path)


def test_wrong_shapes(tmp_path):
    path = tmp_path / "half.pth.tar"
    torch.save(_official_checkpoint(LightCNN9(num_classes=3, width=0.5)), path)
    msg = _error_for(path)
    assert "wrong shapes" in msg and "features.0.filter.weight" in msg


def test_other_network(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    assert "missing features.0.filter.weight" in _error_for(path)


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"state_dict": argparse.Namespace(a=1)}, path)  # not loadable with weights_only=True
    assert "cannot read" in _error_for(path)


def test_to_lightcnn_input_gray_and_rgb():
    gray = to_lightcnn_input(torch.full((2, 1, 96, 96), -1.0))
    assert gray.shape == (2, 1, 128, 128) and gray.max() == 0
    assert to_lightcnn_input(torch.ones(1, 1, 96, 96)).min() == 1
    rgb = torch.stack([torch.full((96, 96), v) for v in (1.0, -1.0, 0.0)])[None]
    want = (0.299 * 1 + 0.587 * -1 + 0.114 * 0 + 1) / 2
    torch.testing.assert_close(to_lightcnn_input(rgb), torch.full((1, 1, 128, 128), want))
    with pytest.raises(ValueError, match="1 or 3"):
        to_lightcnn_input(torch.zeros(1, 2, 96, 96))
