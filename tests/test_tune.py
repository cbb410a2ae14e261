"""fers tune: search-space checks, nested CV without outer-test leakage, honest trial states, persistent
and resumable studies (including a killed run), multi-objective outputs, and clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fers_dist.config import ConfigError, dump_config, load_config, parse_config
from fers_dist.errors import FersError
from fers_dist.tune import search_space as ss
from fers_dist.tune.study import open_storage

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"loss.lam_adv": 0.3, "loss.lam_rec": 1.0, "loss.lam_cyc": 0.5, "loss.lam_idt_start": 0.1,
         "loss.lam_idt_end": 0.5}


# -- helpers -----------------------------------------------------------------------------------
def write_faces(root: Path, dataset="oulu", n_subjects=12, size=40, n_folds=4, seed=0, signal=False) -> Path:
    """A tiny faces.parquet in the loader's format: every subject shows every expression once. ``signal``:
    each expression adds a bright block at its own place, so a model learns it within a few epochs."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("image", "subject", "label", "label_name", "fold", "dataset")}
    for s in range(n_subjects):
        for y in range(6):
            img = rng.integers(0, 256, (size, size), dtype=np.uint8)
            if signal:
                r, c = divmod(y, 3)
                img[8 + 12 * r:16 + 12 * r, 6 + 10 * c:14 + 10 * c] = 255
            rows["image"].append(cv2.imencode(".png", img)[1].tobytes())
            rows["subject"].append(f"P{s:03d}")
            rows["label"].append(y)
            rows["label_name"].append(f"c{y}")
            rows["fold"].append(s % n_folds)
            rows["dataset"].append(dataset)
    (root / dataset).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), root / dataset / "faces.parquet")
    return root


@pytest.fixture
def tiny_tune(demo_cfg, tmp_path):
    """demo.yaml-sized, identity none, 1 epoch x 2 inner folds: a trial takes about a second. One study
    (demo.yaml's own λ study is nested CV over two outer folds)."""
    write_faces(tmp_path / "data")
    return demo_cfg.with_overrides({"tune.outer_folds": None,
        "identity.backbone": "none", "train.batch_size": 16, "data.root": str(tmp_path / "data"),
        "cv.storage": str(tmp_path / "results"), "tune.dataset": "oulu", "tune.trials": 2, "tune.epochs": 1,
        "tune.inner_folds": 2, "tune.pruner": "none", "tune.cpus_per_trial": 0.5, "tune.gpus_per_trial": 0,
        "tune.study": "t", "tune.storage": f"sqlite:///{tmp_path / 'study.db'}"})


def load(cfg):
    import optuna

    return optuna.load_study(study_name=cfg.tune.study, storage=open_storage(cfg.tune.storage))


def by_state(study) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in study.trials:
        out.setdefault(t.state.name, []).append(t)
    return out


# -- search space ------------------------------------------------------------------------------
@pytest.mark.parametrize("space, match", [
    ({"loss.lam_foo": {"type": "uniform", "low": 0, "high": 1}}, r"tune\.space\.loss\.lam_foo: .*not a config field"),
    ({"optim.nothing": {"type": "uniform", "low": 0, "high": 1}}, r"tune\.space\.optim\.nothing: .*no field"),
    ({"cv.gpus_per_run": {"type": "uniform", "low": 0, "high": 1}},
     r"tune\.space\.cv\.gpus_per_run: .*cannot be tuned"),
    ({"train.epochs": {"type": "int", "low": 1, "high": 9}}, r"tune\.space\.train\.epochs: .*tune\.epochs"),
    ({"loss.lam_adv": {"type": "uniform", "low": -1, "high": 1}},
     r"tune\.space\.loss\.lam_adv: low=-1\.0 .*greater than or equal to 0"),
    ({"schedule.decay": {"type": "categorical", "choices": ["cosine", "linear"]}}, r"schedule\.decay: choice='linear'"),
    ({"schedule.decay": {"type": "categorical", "choices": ["cosine"]}}, r"schedule\.decay: .*baseline.*outside"),
    ({"train.batch_size": {"type": "int", "low": 2.5, "high": 8}}, r"train\.batch_size: .*whole-number"),
    ({}, r"tune\.space: the search space is empty"),
])
def test_bad_space_is_a_clear_error_naming_the_key(tmp_path, space, match):
    path = tmp_path / "t.yaml"
    path.write_text("tune:\n  space: " + (repr(space).replace("'", '"') if space else "{}") + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        ss.check_space(load_config(path), str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("low, high", [(1.0, 0.1), (0.5, 0.5)])
def test_empty_or_inverted_range_is_refused_at_load(tmp_path, low, high):
    path = tmp_path / "t.yaml"
    path.write_text(f"tune:\n  space:\n    loss.lam_rec: {{type: loguniform, low: {low}, high: {high}}}\n")
    with pytest.raises(ConfigError, match=rf"{path}: tune\.space\.loss\.lam_rec: empty or inverted range"):
        load_config(path)


def test_infeasible_space_is_refused():
    cfg = parse_config({"schedule": {"lr_start": 1e-3, "lr_end": 1e-3},
                        "tune": {"space": {"schedule.lr_end": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}}})
    ss.check_space(cfg, "x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: tune\.space: none of 200 random points .*lr_end"):
        ss.check_feasible(cfg, "x.yaml")


def test_tune_yaml_is_a_valid_study_with_the_paper_baseline():
    cfg = load_config(ROOT / "jobs" / "configs" / "tune.yaml")
    ss.check_space(cfg, "tune.yaml")
    assert 0 < ss.check_feasible(cfg) < 1  # lr_end overlaps lr_start: the rejection path is live
    assert {k: ss.baseline(cfg)[k] for k in PAPER} == PAPER
    assert ss.baseline(cfg)["schedule.lr_start"] == 1e-3 and ss.baseline(cfg)["schedule.lr_end"] == 1e-5


@pytest.mark.parametrize("url, match", [
    ("sqlite:////nonexistent-dir/x/study.db",
     r"tune\.storage 'sqlite:////nonexistent-dir/x/study\.db': cannot be opened"),
    ("/nonexistent-dir/x/study.log", r"tune\.storage '/nonexistent-dir/x/study\.log': cannot be opened"),
    ("study.txt", r"tune\.storage 'study\.txt': expected sqlite"),
])
def test_storage_that_cannot_be_opened_is_a_clear_error(url, match):
    with pytest.raises(FersError, match=match):
        open_storage(url)


# -- nested CV ---------------------------------------------------------------------------------
def test_objective_never_touches_the_outer_test_fold(demo_cfg, monkeypatch):
    """Trace every image that enters a training step (trial models, the FES judge, the identity encoder),
    validation, synthesis or the identity score: none may come from the outer test fold."""
    from test_train import decode_index, tagged_faces

    from fers_dist.data import loader
    from fers_dist.train import synthesis as runs
    from fers_dist.tune.objective import NestedCV

    faces, outer = tagged_faces(n_subjects=10, per_subject=6), 3
    test_ids = set(torch.nonzero(faces.folds == outer).squeeze(1).tolist())
    trained, evaluated = set(), set()
    aug, crop, centre, synth = loader.apply_augmentation, loader.center_crop, runs.centre_uint8, runs.synthesise_all

    def traced_aug(images, affine, size):
        trained.update(decode_index(images))
        return aug(images, affine, size)

    def traced(fn):  # only REAL faces are traced (synthesised ones carry no index)
        def wrapper(images, *a, **kw):
            evaluated.update(decode_index(images))
            return fn(images, *a, **kw)
        return wrapper

    for mod in ("fers_dist.train.trainer", "fers_dist.train.identity"):
        monkeypatch.setattr(f"{mod}.apply_augmentation", traced_aug)
    monkeypatch.setattr("fers_dist.train.evaluate.center_crop", traced(crop))
    monkeypatch.setattr(runs, "centre_uint8", traced(centre))
    seen = traced(lambda images: images)
    monkeypatch.setattr(runs, "synthesise_all", lambda model, images, *a, **kw: synth(model, seen(images), *a, **kw))
    cfg = demo_cfg.with_overrides({"identity.backbone": "none", "identity.encoder_epochs": 1,
                                   "train.batch_size": 16})
    nested = NestedCV(cfg, faces, outer_fold=outer, k=3, epochs=1, objective="fer+fes")
    m = nested.run()
    assert trained and evaluated
    assert not (trained | evaluated) & test_ids
    assert evaluated == set(range(len(faces))) - test_ids  # the inner validation folds cover the rest
    for train, val in nested.splits:  # subject-disjoint inner splits
        assert not set(train.subjects.tolist()) & set(val.subjects.tolist())
    assert 0 <= m["inner_val_accuracy"] <= 1 and 0 <= m["fes_realism"] <= 1 and "fes_identity_cosine" in m
    assert m["inner_val_accuracy"] == pytest.approx(np.mean([m[f"inner_val_accuracy_f{f}"] for f in range(3)]))


# -- the searcher ------------------------------------------------------------------------------
def test_searcher_records_asha_stops_rejections_and_interruptions(demo_cfg):
    """Drives the OptunaSearch subclass and RecordingASHA directly, as Tune's controller would."""
    from types import SimpleNamespace

    from optuna.samplers import RandomSampler

    from fers_dist.tune.searcher import FersOptunaSearch, RecordingASHA

    cfg = demo_cfg.with_overrides({"tune.space": {
        "schedule.lr_start": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
        "schedule.lr_end": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}})
    asha = RecordingASHA(metric="inner_val_accuracy", mode="max", max_t=3, grace_period=1, reduction_factor=2)
    s = FersOptunaSearch(base_cfg=cfg, epochs=3, scheduler=asha, space=ss.distributions(cfg.tune.space),
                         metric="inner_val_accuracy", mode="max", sampler=RandomSampler(seed=0))
    trials = {i: SimpleNamespace(trial_id=i) for i in "abcd"}
    for tid, trial in trials.items():
        params = s.suggest(tid)
        assert params["schedule.lr_end"] <= params["schedule.lr_start"]  # rejected points never reach Ray
        asha.on_trial_add(None, trial)

    def result(tid, it, acc):
        r = {"inner_val_accuracy": acc, "training_iteration": it, "epochs_trained": it}
        s.on_trial_result(tid, r)
        assert asha.on_trial_result(None, trials[tid], r) in ("CONTINUE", "STOP")
        return r

    for it in (1, 2, 3):
        last_a = result("a", it, 0.5 + it / 10)
    s.on_trial_complete("a", last_a)
    last_b = result("b", 1, 0.1)  # below rung 1's cutoff (a's 0.6): ASHA stops it
    assert "b" in asha.stopped_early and "a" not in asha.stopped_early
    s.on_trial_complete("b", last_b)
    s.on_trial_complete("c", result("c", 1, 0.9))  # ended early, but not by ASHA: a dead run
    s.on_trial_complete("d", None, error=True)

    got = {t.user_attrs.get("ray_trial_id", "-"): t for t in s._ot_study.trials}
    assert got["a"].state.name == "COMPLETE" and got["a"].user_attrs["stop_reason"] == "completed"
    assert got["a"].value == pytest.approx(0.8)
    assert got["b"].state.name == "PRUNED" and got["b"].user_attrs["stop_reason"] == "asha"
    assert got["b"].value == pytest.approx(0.1) and got["b"].user_attrs["epochs_trained"] == 1
    assert got["c"].state.name == "FAIL" and got["c"].user_attrs["stop_reason"] == "interrupted"
    assert got["d"].state.name == "FAIL" and got["d"].user_attrs["stop_reason"] == "error"
    rejected = [t for t in s._ot_study.trials if t.user_attrs.get("stop_reason") == "invalid_config"]
    assert s.rejected == len(rejected) > 0  # seed 0 draws invalid points; each is a FAILED trial
    assert all(t.state.name == "FAIL" and "lr_end" in t.user_attrs["error"] for t in rejected)


def test_gpu_request_on_a_cluster_without_gpus_fails_fast():
    from fers_dist.tune.cli import concurrency

    with pytest.raises(FersError, match=r"tune\.gpus_per_trial: .*1 GPU but the Ray cluster has no GPUs \(CPU=2\)"):
        concurrency({"cpu": 1, "gpu": 1}, {"CPU": 2.0, "memory": 1e9}, None)
    assert concurrency({"cpu": 0.5, "gpu": 0}, {"CPU": 2.0}, None) == 4
    assert concurrency({"cpu": 1, "gpu": 0.25}, {"CPU": 16.0, "GPU": 2.0}, None) == 8
    assert concurrency({"cpu": 1, "gpu": 0}, {"CPU": 16.0}, 3) == 3


# -- whole studies through Ray -----------------------------------------------------------------
@pytest.mark.ray
def test_study_resumes_keeps_trials_and_guards_its_space(ray_session, tiny_tune, tmp_path):
    from fers_dist.tune.cli import run_tune

    cfg, out = tiny_tune, str(tmp_path / "out")
    first = run_tune(cfg, out=out)
    assert first["counted"] == 2
    before = {t.number: t.params for t in load(cfg).trials}
    load(cfg).ask()  # a trial a crashed run left RUNNING
    second = run_tune(cfg.with_overrides({"tune.trials": 4}), out=out)
    study = load(cfg)
    states = by_state(study)
    assert second["counted"] == 4 and len(states["COMPLETE"]) == 4
    assert [t.user_attrs["stop_reason"] for t in states["FAIL"]] == ["interrupted"]
    assert {n: study.trials[n].params for n in before} == before  # finished trials kept, not repeated
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] and {k: baseline.params[k] for k in PAPER} == PAPER
    for t in states["COMPLETE"]:  # every trial carries its λ values and why it ended
        assert set(cfg.tune.space) <= set(t.params) and t.user_attrs["stop_reason"] == "completed"
    assert sum(t.user_attrs.get("baseline", False) for t in study.trials) == 1

    import pandas as pd

    frame = pd.read_parquet(Path(out) / "trials.parquet")
    assert len(frame) == len(study.trials) and set(PAPER) <= set(frame.columns)
    best = load_config(Path(out) / "best.yaml")
    assert best.cv.datasets == ["oulu"] and best.cv.variants == ["original"]
    win = study.best_trial
    assert best.loss.lam_adv == pytest.approx(win.params["loss.lam_adv"])
    for png in ("history", "importances", "contour_lam_adv-lam_rec", "contour_lam_idt_start-lam_idt_end"):
        assert (Path(out) / f"{png}.png").read_bytes()[:4] == b"\x89PNG"

    attrs, n = dict(study.user_attrs), len(study.trials)
    changed = cfg.with_overrides({"tune.space": {**{k: v.model_dump() for k, v in cfg.tune.space.items()},
                                                 "loss.lam_adv": {"type": "loguniform", "low": 0.1, "high": 1.0}}})
    with pytest.raises(FersError, match=r"tune\.study 't': .*search space differs \(loss\.lam_adv\).*--force"):
        run_tune(changed, out=out)
    assert len(load(cfg).trials) == n and load(cfg).user_attrs == attrs  # the refused run changed nothing
    with pytest.raises(FersError, match=r"tune\.objective: study 't' was created for objective 'fer'"):
        run_tune(cfg.with_overrides({"tune.objective": "fer-fast"}), out=out, force=True)
    forced = run_tune(changed.with_overrides({"tune.trials": 4}), out=out, force=True)
    assert forced["counted"] == 4 and len(load(cfg).user_attrs["fers_setup_history"]) == 1


@pytest.mark.ray
def test_multi_objective_study_writes_a_pareto_front_and_evaluates_the_best(ray_session, tiny_tune, tmp_path):
    from fers_dist.results import folds_uri, read_folds
    from fers_dist.tune.cli import run_tune

    cfg = tiny_tune.with_overrides({"tune.objective": "fer-fast", "tune.pruner": "asha", "tune.study": "mo",
                                    "cv.folds": [0], "train.epochs": 1})
    out = tmp_path / "mo"
    summary = run_tune(cfg, out=str(out), evaluate_best=True)
    study = load(cfg)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert summary["counted"] == 2 and summary["ray"]["asha_stopped"] == 0
    assert all(t.values[1] > 0 for t in study.trials)  # device-hours were measured
    import pandas as pd

    frame = pd.read_parquet(out / "trials.parquet")
    assert {"inner_val_accuracy", "device_hours", "pareto"} <= set(frame.columns) and frame["pareto"].any()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["evaluate_best"]["finished"] == 1  # best.yaml through fers cv on outer fold 0
    rows = read_folds(folds_uri(cfg.cv.storage, cfg.cv.experiment))
    assert rows[["dataset", "variant", "fold", "tag"]].values.tolist() == [["oulu", "original", 0, "tuned"]]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_run_resumes_without_repeating_finished_trials(ray_session, tiny_tune, tmp_path):
    """A real crash: the job entry point runs in its own session and is SIGKILLed with its local Ray."""
    cfg = tiny_tune.with_overrides({"tune.study": "killed", "tune.trials": 8, "tune.max_concurrent": 1,
                                    "tune.epochs": 2})  # 8 trials of ~1 s: the kill lands well before the end
    dump_config(cfg, tmp_path / "killed.yaml")
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "tune_lambdas.py"), "--config",
                             str(tmp_path / "killed.yaml"), "--out", str(tmp_path / "k"), "--address", "local"],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                if len(by_state(load(cfg)).get("COMPLETE", [])) >= 1:
                    break
            except (KeyError, FersError):
                pass
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    done = {t.number: t.params for t in by_state(load(cfg))["COMPLETE"]}
    assert 1 <= len(done) < 8

    from fers_dist.tune.cli import run_tune

    summary = run_tune(cfg, out=str(tmp_path / "k"))
    study = load(cfg)
    assert summary["counted"] == 8 and len(by_state(study)["COMPLETE"]) == 8
    assert {n: study.trials[n].params for n in done} == done
    assert all(t.user_attrs["stop_reason"] == "interrupted" for t in by_state(study).get("FAIL", []))
    left = subprocess.run(["ps", "-s", str(proc.pid), "-o", "stat="], capture_output=True, text=True,
                          check=False).stdout.split()
    assert all(s.startswith("Z") for s in left), "processes of the killed run survived"


def test_job_entry_point_runs_fers_tune():
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune_lambdas.py"), "--help"],
                       capture_output=True, check=False, text=True, timeout=60)
    assert r.returncode == 0 and "--trials" in r.stdout and "--evaluate-best" in r.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_baseline_lies_in_their_search_space(path):
    """Each shipped config's own values are enqueued as a study's first trial: they must be in tune.space."""
    from fers_dist.config import load_config
    from fers_dist.tune.search_space import check_space

    check_space(load_config(path), str(path))
