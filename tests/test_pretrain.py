"""BU-4DFE pre-training (the paper's "FERSNet (BU-4DFE)" rows): ``fers pretrain`` as one Ray Train run on
synthetic data in the BU-4DFE layout, then ``train.init_from: pretrained`` for a CV experiment, whose rows
are tagged ``pretrained`` and fill the report's BU-4DFE slot. The loading rules are tested Ray-free."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fers_dist.cli import main
from fers_dist.config import Config
from fers_dist.errors import FersError
from fers_dist.model import build_model
from fers_dist.train.checkpoint import save_checkpoint
from fers_dist.train.pretrain import load_pretrained, pretrain_config, pretrained_uri


def _saved(tmp_path, cfg, num_classes: int, stamp: str | None = None, path=None):
    torch.manual_seed(1)
    model = build_model(cfg.model, num_classes)
    path = Path(path or tmp_path / "pre" / "main.pt")
    save_checkpoint(path, epoch=0, modules={"model": model}, generator=torch.Generator(), history=[],
                    extra={"config_hash": stamp or pretrain_config(cfg).hash()})
    return model, path


def test_pretrained_weights_load_and_only_the_class_count_layers_restart(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"train.init_from": "pretrained"})
    pre, path = _saved(tmp_path, cfg, 6)  # BU-4DFE: 6 classes
    torch.manual_seed(2)
    ck = build_model(cfg.model, 7)  # CK+: 7
    before = {k: v.clone() for k, v in ck.state_dict().items()}
    load_pretrained(ck, path, cfg, log=lambda m: None)
    fresh = {"f_cls.fc2.weight", "f_cls.fc2.bias", "f_tra.fc.weight"}
    for k, v in ck.state_dict().items():
        if k in fresh:
            assert torch.equal(v, before[k]), k  # re-initialised (kept this run's own init)
        else:
            assert torch.equal(v, pre.state_dict()[k]), k
    oulu = build_model(cfg.model, 6)  # same class count: everything is loaded
    load_pretrained(oulu, path, cfg, log=lambda m: None)
    assert all(torch.equal(v, pre.state_dict()[k]) for k, v in oulu.state_dict().items())


def test_a_pretrained_model_from_another_config_or_architecture_is_refused(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"train.init_from": "pretrained"})
    _, path = _saved(tmp_path, cfg, 6, stamp="0123456789ab")
    with pytest.raises(FersError, match="made under config 0123456789ab"):
        load_pretrained(build_model(cfg.model, 7), path, cfg, log=lambda m: None)
    _, path = _saved(tmp_path, cfg, 6)
    wider = cfg.with_overrides({"model.width": 12, "train.init_from": str(path)})  # an explicit path: no stamp
    with pytest.raises(FersError, match="architecture differs"):
        load_pretrained(build_model(wider.model, 7), path, wider, log=lambda m: None)


def test_pretrained_uri_follows_the_config_and_is_checked_before_any_run(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg.with_overrides({"train.init_from": "pretrained", "cv.storage": str(tmp_path)})
    uri = pretrained_uri(cfg)
    assert uri == f"{tmp_path}/pretrained/original-{pretrain_config(cfg).hash()}/main.pt"
    assert pretrained_uri(cfg.with_overrides({"model.variant": "fes_da"})) == uri  # fes_da fine-tunes original
    assert pretrained_uri(cfg.with_overrides({"loss.lam_adv": 0.1})) != uri  # another config, another model
    assert pretrained_uri(tiny_cfg) is None
    assert main(["train", "--dataset", "ckplus", "--set", "train.init_from=pretrained",
                 "--set", f"cv.storage={tmp_path}"]) == 2
    err, uri = capsys.readouterr().err.strip(), pretrained_uri(Config().with_overrides(
        {"train.init_from": "pretrained", "cv.storage": str(tmp_path)}))  # the command's config: the defaults
    assert err == f"fers train: error: train.init_from: 'pretrained': no pre-trained model at {uri} (run: fers " \
                  f"pretrain with this config, e.g. fers pretrain --config CONFIG --data-root {Path.cwd() / 'data'})"


@pytest.mark.ray
def test_cv_checks_each_variants_pretrained_model_before_any_run(tiny_cfg, prepared_data, tmp_path):
    from fers_dist.cv.cli import run_cv

    cfg = tiny_cfg.with_overrides({"train.init_from": "pretrained", "cv.storage": str(tmp_path / "res"),
                                   "data.root": str(prepared_data), "cv.datasets": ["ckplus"], "cv.folds": [0],
                                   "cv.variants": ["original", "fes_da", "no_mtl"], "cv.experiment": "chk"})
    _saved(tmp_path, cfg, 6, path=pretrained_uri(cfg))  # original's model, which fes_da shares; no_mtl has none
    no_mtl = pretrained_uri(cfg.with_overrides({"model.variant": "no_mtl"}))
    with pytest.raises(FersError, match=f"no pre-trained model at {no_mtl} "):
        run_cv(cfg)
    assert not (tmp_path / "res" / "chk").exists()  # refused before any run started


@pytest.mark.slow
@pytest.mark.ray
def test_pretrain_on_bu4dfe_then_cv_from_it_fills_the_reports_slot(demo_cfg, prepared_data, tmp_path, capsys,
                                                                  ray_session):
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize
    from fers_dist.report.cli import build_report

    synthesize("bu4dfe", tmp_path / "raw", subjects=6, seed=0, size=160, frames=(3, 4), progress=False)
    prepare("bu4dfe", tmp_path / "raw", tmp_path / "bu", aligner="landmarks", size=40, n_folds=2,
            log=lambda *a: None)  # pre-training uses every subject: the folds are never read
    common = ["--set", "train.epochs=2", "--set", "train.checkpoint_every=1", "--set", "identity.backbone=none",
              "--set", "train.pretrain_epochs=2", "--set", "cv.workers_per_run=1"]
    storage = tmp_path / "results"
    assert main(["pretrain", "--config", "jobs/configs/demo.yaml", "--data-root", str(tmp_path / "bu"),
                 "--storage", str(storage), *common]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dataset"] == "bu4dfe" and summary["num_classes"] == 6 and summary["epochs"] == 2
    assert summary["n_subjects"] == 6 and 0 <= summary["train_accuracy"] <= 1
    home = next((storage / "pretrained").glob("original-*"))
    assert (home / "main.pt").is_file() and json.loads((home / "summary.json").read_text()) == summary
    assert home.name == f"original-{summary['config_hash']}"

    assert main(["pretrain", "--config", "jobs/configs/demo.yaml", "--data-root", str(tmp_path / "bu"),
                 "--storage", str(storage), *common]) == 0  # done: nothing trains again
    assert "is done (2 epochs)" in capsys.readouterr().err

    assert main(["cv", "--config", "jobs/configs/demo.yaml", "--data-root", str(prepared_data), "--storage",
                 str(storage), "--experiment", "pre", "--datasets", "ckplus", "--variants", "original",
                 "--folds", "0", *common, "--set", "train.init_from=pretrained",
                 "--set", "cv.workers_per_run=0"]) == 0  # Train's local mode: the fold, not the worker, is tested
    rows = pd.read_parquet(storage / "pre" / "folds.parquet")
    assert list(rows["tag"]) == ["pretrained"] and list(rows["status"]) == ["finished"]
    assert rows["pretrained_from"].iloc[0] == str(home / "main.pt")
    table = pd.read_csv(build_report(storage / "pre", synthesis=False)["out"] / "tables" / "paper_vs_ours.csv")
    slot = table[table["comparison"] == "BU-4DFE pre-trained"].iloc[0]
    assert slot["paper"] == 97.85 and slot["ours_mean"] == pytest.approx(100 * rows["accuracy"].iloc[0])
