"""Honest tuned-vs-paper comparisons (issue 18): a tuned config is only ever tested on an outer fold whose
subjects no trial of its study saw. Per-outer-fold studies (nested CV) run side by side in one real Ray Tune
run, resume, and `--evaluate-best` tests study k's best config on fold k alone."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_tune import by_state, tiny_tune, write_faces  # noqa: F401  (tiny_tune is a fixture)

from fers_dist.tune.study import open_storage


def leaked_rows(rows: pd.DataFrame, cfg) -> list[tuple]:
    """Tuned rows whose TEST subjects appear in any trial of the study that produced their config."""
    import optuna

    faces = pq.read_table(f"{cfg.data.root}/{cfg.tune.dataset}/faces.parquet", columns=["subject", "fold"]).to_pandas()
    storage = open_storage(cfg.tune.storage)
    leaks = []
    for _, row in rows[rows["tag"] == "tuned"].iterrows():
        study = optuna.load_study(study_name=row["study"], storage=storage)
        seen = {s for t in study.trials for s in t.user_attrs.get("subjects", [])}
        assert seen, f"{row['study']}: trials record the subjects they saw"
        test = set(faces.loc[faces["fold"] == row["fold"], "subject"])
        if test & seen:
            leaks.append((row["study"], int(row["fold"])))
    return leaks


@pytest.mark.ray
@pytest.mark.slow
def test_per_outer_fold_studies_tune_side_by_side_resume_and_never_leak(ray_session, tiny_tune, tmp_path):  # noqa: F811
    from fers_dist.results import folds_uri, read_folds
    from fers_dist.tune.cli import run_tune

    cfg = tiny_tune.with_overrides({"tune.outer_folds": [1, 3], "train.epochs": 1, "cv.folds": "all"})
    out = tmp_path / "nested"
    summary = run_tune(cfg, out=str(out), evaluate_best=True)
    assert [r["study"] for r in summary["studies"]] == ["t-outer1", "t-outer3"]
    assert summary["ray"]["ray_trials"] == 4  # 2 studies x 2 trials in ONE Tune run
    storage = open_storage(cfg.tune.storage)
    import optuna

    for k in (1, 3):
        study = optuna.load_study(study_name=f"t-outer{k}", storage=storage)
        complete = by_state(study)["COMPLETE"]
        assert len(complete) == 2 and {t.user_attrs["outer_fold"] for t in complete} == {k}
        assert (out / f"outer{k}" / "best.yaml").exists() and (out / f"outer{k}" / "trials.parquet").exists()

    rows = read_folds(folds_uri(cfg.cv.storage, cfg.cv.experiment))
    tuned = rows[rows["tag"] == "tuned"]
    assert sorted(tuned["fold"]) == [1, 3]  # each study's config on its own outer fold, and only there
    assert dict(zip(tuned["fold"], tuned["study"])) == {1: "t-outer1", 3: "t-outer3"}
    for _, row in tuned.iterrows():
        study = optuna.load_study(study_name=row["study"], storage=storage)
        assert row["study_trial"] in {t.number for t in study.trials}
        assert json.loads(row["config"])["tune"]["source_trial"] == row["study_trial"]
    assert leaked_rows(rows, cfg) == []
    assert summary["evaluate_best"]["folds"] == [1, 3]

    # the old way (a study's config tested on every outer fold) is what the check above exists to catch
    old = rows[rows["tag"] == "tuned"].iloc[[0]].assign(fold=3)  # study t-outer1 tested on fold 3
    assert leaked_rows(old, cfg) == [("t-outer1", 3)]

    again = run_tune(cfg.with_overrides({"tune.trials": 3}), out=str(out))  # resumes both studies
    assert [r["counted_before"] for r in again["studies"]] == [2, 2] and again["counted"] == 3
    assert again["ray"]["ray_trials"] == 2


@pytest.mark.ray
def test_single_study_evaluates_only_the_fold_it_never_saw(ray_session, tiny_tune, tmp_path):  # noqa: F811
    from fers_dist.results import folds_uri, read_folds
    from fers_dist.tune.cli import run_tune

    cfg = tiny_tune.with_overrides({"tune.outer_fold": 2, "tune.trials": 1, "train.epochs": 1, "cv.folds": "all"})
    logged = []
    summary = run_tune(cfg, out=str(tmp_path / "single"), evaluate_best=True, log=logged.append)
    rows = read_folds(folds_uri(cfg.cv.storage, cfg.cv.experiment))
    assert rows[["fold", "tag", "study"]].values.tolist() == [[2, "tuned", "t"]]
    assert summary["evaluate_best"] == {**summary["evaluate_best"], "folds": [2], "finished": 1}
    assert any("on outer fold 2 only: the one fold whose subjects the study never saw" in m for m in logged)
    assert leaked_rows(rows, cfg) == []


def test_outer_folds_flag_and_bad_values(tmp_path, capsys):
    import argparse

    from fers_dist.cli import main
    from fers_dist.tune.cli import add_arguments, config_from_args, study_plan

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--outer-folds", "0,3", "--study", "lam"]))
    assert cfg.tune.outer_folds == [0, 3] and study_plan(cfg) == [(0, "lam-outer0"), (3, "lam-outer3")]
    cfg = config_from_args(p.parse_args(["--outer-folds", "all"]))
    assert [k for k, _ in study_plan(cfg)] == list(range(10))
    assert study_plan(config_from_args(p.parse_args(["--outer-fold", "4"]))) == [(4, "fersnet-lambdas")]
    assert main(["tune", "--outer-folds", "0,x"]) == 2
    assert capsys.readouterr().err.strip() == "fers tune: error: --outer-folds: '0,x' is not 'all' or a comma list of fold indices"
    write_faces(tmp_path / "data", n_folds=4)
    assert main(["tune", "--outer-folds", "1,7", "--data-root", str(tmp_path / "data"), "--dataset", "oulu",
                 "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fers tune: error: tune.outer_folds: 7 is out of range:") and err.endswith("has folds 0..3")


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_a_trial_through_real_ray_tune_and_optuna_records_it_pruned(ray_session, tiny_tune,  # noqa: F811
                                                                               tmp_path):
    """Real Ray Tune + ASHA (grace 1 epoch, halving) over 6 sequential trials of 3 epochs: at least one trial
    is stopped at a rung, and its Optuna trial is PRUNED with its last reported value, not COMPLETE."""
    import optuna

    from fers_dist.tune.cli import run_tune

    write_faces(tmp_path / "signal", signal=True)  # learnable faces: trials differ, no ties at chance
    cfg = tiny_tune.with_overrides({"data.root": str(tmp_path / "signal"),
                                    "tune.pruner": "asha", "tune.grace_period": 1, "tune.reduction_factor": 2,
                                    "tune.epochs": 3, "tune.trials": 6, "tune.max_concurrent": 1,
                                    "tune.study": "asha", "train.batch_size": 8,
                                    "tune.space": {"schedule.lr_start": {"type": "loguniform", "low": 1e-4,
                                                                         "high": 3e-2}}})
    summary = run_tune(cfg, out=str(tmp_path / "asha"))
    study = optuna.load_study(study_name="asha", storage=open_storage(cfg.tune.storage))
    states = by_state(study)
    pruned = states.get("PRUNED", [])
    assert summary["ray"]["asha_stopped"] == len(pruned) >= 1
    for t in pruned:
        assert t.user_attrs["stop_reason"] == "asha" and t.user_attrs["epochs_trained"] < 3
        last_step = max(t.intermediate_values)
        assert last_step == t.user_attrs["epochs_trained"]  # step = Tune iteration = epoch + 1: the last report
        assert t.value == pytest.approx(t.intermediate_values[last_step])
        folds = t.user_attrs["inner_val_accuracies"]  # the last report's per-fold scores, recorded apart
        assert t.value == pytest.approx(sum(folds) / len(folds))
    assert all(t.user_attrs["epochs_trained"] == 3 for t in states["COMPLETE"])


def test_tune_dry_run_prices_the_nested_protocol(capsys):
    """jobs/configs/tune.yaml with --outer-folds all on Oulu-CASIA (1440 images, paper Table I): every study
    trains 3 inner models, each on 2/3 of the 1296 outer-training faces, for 100 epochs x 50 trials."""
    from fers_dist.cli import main
    from fers_dist.cv.plan import PROJECTED_IMAGES_PER_S

    config = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "jobs/configs/tune.yaml")
    assert main(["tune", "--config", config, "--outer-folds", "all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    hours = 10 * 50 * 100 * (1440 * 9 / 10 * 2) / PROJECTED_IMAGES_PER_S / 3600
    assert "10 x 50 trials x 3 inner folds x 100 epochs = 150,000 model-epochs of ~864 images" in out
    assert f"without pruning: {hours:,.1f} GPU-hours" in out and "then --evaluate-best: 10 fold run(s)" in out
