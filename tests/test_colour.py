"""Colour (``data.channels: 3``) end to end: the synthetic Oulu-CASIA VL layout is colour, prepare keeps it
(Ray Data -> Parquet), the loader reads RGB, a fold trains and evaluates, FES-DA fine-tunes on colour
synthesised faces, LightCNN-9 sees gray by conversion, and Fig. 4's grid is drawn in colour."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fers_dist.config import ConfigError
from fers_dist.errors import FersError


@pytest.fixture(scope="module")
def colour_oulu(tmp_path_factory, ray_session):
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize

    base = tmp_path_factory.mktemp("colour")
    synthesize("oulu", base / "raw", subjects=10, seed=0, size=160, progress=False)
    prepare("oulu", base / "raw", base / "data", aligner="landmarks", size=40, channels=3, log=lambda *a: None)
    prepare("oulu", base / "raw", base / "gray", aligner="landmarks", size=40, log=lambda *a: None)
    return base


def test_prepare_keeps_colour_and_the_loader_reads_rgb(colour_oulu):
    from fers_dist.data.loader import load_faces

    blob = pq.read_table(colour_oulu / "data" / "oulu" / "faces.parquet", columns=["image"])["image"][0].as_py()
    bgr = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr.shape == (40, 40, 3)
    assert np.abs(bgr[..., 2].astype(int) - bgr[..., 0].astype(int)).mean() > 3  # not a gray copy
    faces, gray = load_faces(colour_oulu / "data" / "oulu"), load_faces(colour_oulu / "gray" / "oulu")
    assert faces.images.shape[1:] == (3, 40, 40) and gray.images.shape[1:] == (1, 40, 40)
    assert torch.equal(faces.images[0], torch.from_numpy(bgr[..., ::-1].transpose(2, 0, 1).copy()))  # RGB
    luma = (faces.images.float() * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1)
    assert (luma - gray.images[:, 0].float()).abs().mean() < 2  # the same faces, in colour


def test_a_colour_fold_trains_fes_da_synthesises_in_colour_and_the_grid_is_colour(colour_oulu, tiny_cfg, tmp_path):
    from fers_dist.data.loader import load_faces, split_fold
    from fers_dist.report.figures import synthesis_grid
    from fers_dist.train.fold import fit_fold
    from fers_dist.train.synthesis import centre_uint8, synthesise_all

    cfg = tiny_cfg.with_overrides({"data.channels": 3, "model.in_channels": 3, "model.variant": "fes_da",
                                   "identity.backbone": "subject_encoder", "identity.encoder_epochs": 1,
                                   "train.epochs": 1})
    faces = load_faces(colour_oulu / "data" / "oulu")
    res = fit_fold(cfg, faces, 0, checkpoint_dir=tmp_path / "ck", log=lambda m: None)
    assert 0 <= res.accuracy <= 1 and res.identity == "subject_encoder"  # LightCNN-9 read gray from colour
    assert [h.get("phase") for h in res.history] == [None, "fes_da"]
    assert all(np.isfinite(h["loss"]) for h in res.history)

    from fers_dist.model import build_model
    from fers_dist.train.checkpoint import load_weights

    model = build_model(cfg.model.model_copy(update={"variant": "original"}), faces.num_classes)
    model.load_state_dict(load_weights(tmp_path / "ck" / "main.pt", "model"))
    test = faces.subset(split_fold(faces, 0)[1])
    synth = synthesise_all(model, test.images[:2], 32, faces.num_classes)
    assert synth.shape == (2, 6, 3, 32, 32)
    png = synthesis_grid(centre_uint8(test.images[:2], 32).numpy(), synth.numpy(), ["a", "b"],
                         list(faces.class_names), "colour", tmp_path / "grid.png")
    grid = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert np.abs(grid[..., 2].astype(int) - grid[..., 0].astype(int)).max() > 30  # colour pixels on the page


def test_dlib_identity_scores_colour_faces_on_their_luma(colour_oulu):
    from fers_dist.data.loader import load_faces
    from fers_dist.train.identity_score import identity_similarity

    faces = load_faces(colour_oulu / "data" / "oulu")
    pick = torch.arange(0, len(faces), len(faces) // 18)[:18]  # dlib finds only some of these 40 px faces
    src = faces.images[pick]
    r = identity_similarity(src, src[:, None].repeat(1, 2, 1, 1, 1), faces.subjects[pick], "dlib", lightcnn=None)
    assert r["identity_method"] == "dlib" and r["identity_pairs"] > 0
    assert r["identity_cosine"] == pytest.approx(1.0, abs=1e-6) and r["identity_cosine_other"] < r["identity_cosine"]


def test_channels_must_match_the_model_and_the_prepared_faces(colour_oulu, tiny_cfg):
    from fers_dist.train.fold import fit_fold

    with pytest.raises(ConfigError, match=r"model.in_channels \(1\) must equal data.channels \(3\)"):
        tiny_cfg.with_overrides({"data.channels": 3})
    cfg = tiny_cfg.with_overrides({"data.channels": 3, "model.in_channels": 3})
    with pytest.raises(FersError, match="have 1 channel.* prepare again with --channels 3"):
        fit_fold(cfg, colour_oulu / "gray" / "oulu", 0, log=lambda m: None)
