"""`fers fes-eval` (paper Table V protocol) end to end on the REAL tiny experiment of report_fixtures.py."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch
from report_fixtures import copy_experiment, tiny_experiment  # noqa: F401  (session fixture)

from fers_dist.cli import main
from fers_dist.errors import FersError
from fers_dist.report import fes_eval as fes_mod
from fers_dist.report.cli import build_report
from fers_dist.train import fes_eval as fes_core
from fers_dist.train.identity_score import cosine_scores, identity_similarity


def test_fes_eval_cli_end_to_end_then_in_the_report(tiny_experiment, tmp_path):  # noqa: F811
    exp = copy_experiment(tiny_experiment, tmp_path / "exp")
    rc = main(["fes-eval", str(exp), "--folds", "0", "--recogniser-epochs", "2", "--identity-faces", "3",
               "--device", "cpu"])
    assert rc == 0
    res = pd.read_parquet(exp / "fes_eval.parquet").set_index("variant")
    assert sorted(res.index) == ["fes_da", "original"]  # fold 0 has both checkpoints
    faces = tiny_experiment["faces"]
    n_test, E = int((faces.folds == 0).sum()), faces.num_classes
    for variant, r in res.iterrows():
        assert r["n_source_images"] == n_test and r["n_synth_images"] == n_test * (E - 1)  # no contempt target
        conf = np.array([np.asarray(row) for row in r["confusion"]])
        contempt = list(faces.class_names).index("contempt")
        assert conf.sum() == n_test * (E - 1) and conf[contempt].sum() == 0
        assert (np.delete(conf, contempt, 0).sum(1) == n_test).all()  # every basic target, every test face
        assert r["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
        assert 0 <= r["recogniser_real_accuracy"] <= 1
        assert r["identity_method"] in ("dlib", "subject_encoder") and r["identity_pairs"] > 0
        assert r["checkpoint"].endswith("fes_da.pt" if variant == "fes_da" else "main.pt")
    # one recogniser per fold, shared by both checkpoints (same real-image recogniser, same real accuracy)
    assert len(list((exp / "fes_eval").glob("recogniser-*.pt"))) == 1
    assert res.loc["original", "recogniser_real_accuracy"] == res.loc["fes_da", "recogniser_real_accuracy"]
    assert (exp / "fes_eval.csv").read_text().count("\n") == 3
    report = build_report(exp, synthesis=False)
    table = pd.read_csv(report["out"] / "tables" / "table5_fes.csv").set_index("label")
    assert table.loc["original", "accuracy"] == pytest.approx(100 * res.loc["original", "accuracy"])
    assert table.loc["original", "paper"] == 97.04
    assert "Table V: FES" in (report["out"] / "tables" / "paper_vs_ours.md").read_text()


def test_recogniser_sees_only_the_real_training_faces_of_the_fold(tiny_experiment, monkeypatch):  # noqa: F811
    seen = []
    real = fes_core.train_recogniser

    def spy(cfg, train, fold, *args, **kwargs):
        seen.append(train)
        return real(cfg, train, fold, *args, **kwargs)

    monkeypatch.setattr(fes_core, "train_recogniser", spy)
    faces, cfg = tiny_experiment["faces"], tiny_experiment["cfg"].with_overrides({"identity.encoder_epochs": 1})
    ckpt = tiny_experiment["exp_dir"] / "checkpoints" / "ckplus-original-f1" / "main.pt"
    cache: dict = {}
    r = fes_core.fes_eval_fold(cfg, faces, 1, ckpt, recogniser_epochs=1, identity="lightcnn", identity_faces=6,
                              device="cpu", cache=cache, log=lambda m: None)
    again = fes_core.fes_eval_fold(cfg, faces, 1, ckpt, recogniser_epochs=1, identity="lightcnn", identity_faces=6,
                                  device="cpu", cache=cache, log=lambda m: None)
    assert len(seen) == 1  # the cache trains the recogniser once per fold
    train = seen[0]
    assert len(train) == int((faces.folds != 1).sum()) and not (train.folds == 1).any()
    test_subjects = set(faces.subjects[faces.folds == 1].tolist())
    assert not test_subjects & set(train.subjects.tolist())
    assert r["identity_method"] == "subject_encoder"  # identity.backbone=none: LightCNN-9 on train subjects
    assert r["identity_pairs"] == 6 * faces.num_classes
    assert again["accuracy"] == r["accuracy"] and again["identity_cosine"] == pytest.approx(r["identity_cosine"])
    n_test = int((faces.folds == 1).sum())  # Table V's six basic emotions: CK+'s contempt is not a target
    assert r["targets"] == "basic6" and "contempt" not in r["target_names"] and len(r["target_names"]) == 6
    assert r["n_synth_images"] == 6 * n_test and np.isnan(r["per_class_accuracy"][faces.class_names.index("contempt")])
    every = fes_core.fes_eval_fold(cfg, faces, 1, ckpt, recogniser_epochs=1, identity="lightcnn", identity_faces=6,
                                   device="cpu", cache=cache, targets="all", log=lambda m: None)
    assert every["n_synth_images"] == 7 * n_test and every["target_names"] == list(faces.class_names)
    with pytest.raises(ValueError, match="unknown target set 'seven'"):
        fes_core.fes_eval_fold(cfg, faces, 1, ckpt, recogniser_epochs=1, identity="lightcnn", device="cpu",
                               cache=cache, targets="seven", log=lambda m: None)


def test_several_recognisers_each_from_its_own_seed_and_their_mean(tiny_experiment, tmp_path):  # noqa: F811
    """``recognisers=2``: two recognisers, each with its own checkpoint and seed; Table V's accuracy is their
    mean, the first is the single-recogniser figure, and fewer than one is refused in one line."""
    faces, cfg = tiny_experiment["faces"], tiny_experiment["cfg"].with_overrides({"identity.encoder_epochs": 1})
    ckpt = tiny_experiment["exp_dir"] / "checkpoints" / "ckplus-original-f1" / "main.pt"
    kw = {"recogniser_epochs": 1, "identity": "lightcnn", "identity_faces": 2, "device": "cpu",
          "log": lambda m: None}
    one = fes_core.fes_eval_fold(cfg, faces, 1, ckpt, **kw)
    two = fes_core.fes_eval_fold(cfg, faces, 1, ckpt, recogniser_checkpoint=tmp_path / "rec.pt", recognisers=2, **kw)
    assert sorted(p.name for p in tmp_path.glob("rec*.pt")) == ["rec-r1.pt", "rec.pt"]
    a, b = two["accuracy_cross_each"]
    assert two["recognisers"] == 2 and two["accuracy_cross"] == pytest.approx((a + b) / 2)
    assert one["accuracy_cross_each"] == [pytest.approx(a)] and one["recognisers"] == 1
    first, second = (torch.load(p, weights_only=True) for p in (tmp_path / "rec.pt", tmp_path / "rec-r1.pt"))
    assert not torch.equal(*(next(iter(c["modules"]["model"].values())) for c in (first, second)))  # two seeds
    assert np.array(two["confusion"]).sum() == 2 * two["n_synth_images"]  # both recognisers' votes
    with pytest.raises(FersError, match="recognisers: 0"):
        fes_core.fes_eval_fold(cfg, faces, 1, ckpt, recognisers=0, **kw)
    with pytest.raises(SystemExit):
        parser = argparse.ArgumentParser()
        fes_mod.add_arguments(parser)
        parser.parse_args(["exp", "--recognisers", "0"])


def test_dlib_identity_scores_own_faces_above_other_subjects(tiny_experiment):  # noqa: F811
    faces = tiny_experiment["faces"]
    pick = torch.arange(0, len(faces), max(1, len(faces) // 6))[:6]
    src = faces.images[pick]
    synth = src[:, None].repeat(1, 2, 1, 1, 1)  # "synthesised" = the source itself: identity is perfect
    r = identity_similarity(src, synth, faces.subjects[pick], "dlib", lightcnn=None)
    assert r["identity_method"] == "dlib" and r["identity_pairs"] > 0
    assert r["identity_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["identity_cosine_other"] < r["identity_cosine"]


def test_table5_targets_are_the_six_basic_emotions_where_the_dataset_names_them():
    ck = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
    assert fes_core.target_classes(ck) == [0, 2, 3, 4, 5, 6] and fes_core.target_classes(ck, "all") == list(range(7))
    assert fes_core.target_classes(("c0", "c1", "c2")) == [0, 1, 2]  # a custom label set: every class


def test_cosine_scores_separate_own_and_other_subjects():
    src = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    syn = np.stack([src, -src], axis=1)  # per source: itself, then its opposite
    syn[2, 1] = np.nan  # a face the embedder did not find
    r = cosine_scores(src, syn, np.array([0, 1, 1]))
    assert r["identity_pairs"] == 5 and r["identity_cosine"] == pytest.approx((3 - 2) / 5)
    other = [src[i] @ syn[j, t] / np.linalg.norm(src[i]) / np.linalg.norm(syn[j, t])
             for i, j in [(0, 1), (0, 2), (1, 0), (2, 0)] for t in range(2) if not np.isnan(syn[j, t]).any()]
    assert r["identity_cosine_other"] == pytest.approx(np.mean(other))


def test_missing_checkpoint_is_a_clear_error_naming_the_path(tiny_experiment, tmp_path):  # noqa: F811
    gone = tmp_path / "gone"

    def edit(frame):
        frame.loc[(frame["variant"] == "original") & (frame["fold"] == 2), "checkpoint_uri"] = str(gone)
        return frame

    exp = copy_experiment(tiny_experiment, tmp_path / "exp", edit)
    args = argparse.ArgumentParser()
    fes_mod.add_arguments(args)
    with pytest.raises(FersError, match=str(gone / "main.pt")):
        fes_mod.run(args.parse_args([str(exp), "--recogniser-epochs", "1"]))
    assert not (exp / "fes_eval.parquet").exists()  # checked before any training
    with pytest.raises(FersError, match="no finished original/fes_da run matches"):
        fes_mod.run(args.parse_args([str(exp), "--datasets", "mmi"]))
