"""The fold trainer: schedules, resume, no test-fold peeking, FES-DA balance, BatchNorm statistics from
real faces only, clear errors. (The learning check on the demo's data is in test_demo.py.)"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from fers_dist.config import ScheduleConfig
from fers_dist.data.loader import FaceSet
from fers_dist.errors import DataError, FersError
from fers_dist.model.losses import lambda_idt
from fers_dist.train import fold as fold_mod
from fers_dist.train.fes_da import synthesize_balanced
from fers_dist.train.fold import fit_fold
from fers_dist.train.schedule import lr_at


def tagged_faces(n_subjects=20, per_subject=8, size=40, E=7, seed=0) -> FaceSet:
    """Random faces whose corner pixels encode their own index, so any batch can be traced back."""
    g = torch.Generator().manual_seed(seed)
    n = n_subjects * per_subject
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    idx = torch.arange(n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (idx % 256).to(torch.uint8), (idx // 256).to(torch.uint8)
    subjects = idx // per_subject
    return FaceSet(images=images, labels=(idx * 3 + subjects) % E, subjects=subjects,
                   folds=subjects % 10, class_names=tuple(f"c{i}" for i in range(E)),
                   subject_names=tuple(f"S{i:03d}" for i in range(n_subjects)), dataset="ckplus")


def decode_index(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())


@pytest.fixture
def tiny(demo_cfg):
    return demo_cfg.with_overrides({"train.epochs": 3, "train.checkpoint_every": 1,
                                    "identity.backbone": "subject_encoder", "identity.encoder_epochs": 1})


@pytest.mark.parametrize("decay", ["exponential", "cosine", "step"])
def test_lr_schedule_first_and_last_epoch(decay):
    s = ScheduleConfig(lr_start=1e-3, lr_end=1e-5, decay=decay)
    assert lr_at(0, 500, s) == pytest.approx(1e-3)
    assert lr_at(499, 500, s) == pytest.approx(1e-5)
    values = [lr_at(e, 500, s) for e in range(500)]
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(values))  # never increases


def test_lambda_idt_ramp_first_and_last_epoch():
    assert lambda_idt(0, 500, 0.1, 0.5) == pytest.approx(0.1)
    assert lambda_idt(499, 500, 0.1, 0.5) == pytest.approx(0.5)


def test_trainer_reports_paper_schedule_values(tiny):
    seen = []
    fit_fold(tiny.with_overrides({"train.epochs": 4}), tagged_faces(), 0,
             report=lambda m, ck: seen.append(m), log=lambda m: None)
    assert [m["epoch"] for m in seen] == [0, 1, 2, 3]
    assert seen[0]["lr"] == pytest.approx(tiny.schedule.lr_start)
    assert seen[-1]["lr"] == pytest.approx(tiny.schedule.lr_end)
    assert seen[0]["lam_idt"] == pytest.approx(tiny.loss.lam_idt_start)
    assert seen[-1]["lam_idt"] == pytest.approx(tiny.loss.lam_idt_end)


@pytest.mark.parametrize("variant", ["original", "fes_da"])
def test_interrupt_and_resume_equals_straight_run(tiny, tmp_path, variant):
    cfg = tiny.with_overrides({"model.variant": variant, "identity.backbone": "none"})
    faces = tagged_faces()
    straight = fit_fold(cfg, faces, 2, checkpoint_dir=tmp_path / "a", log=lambda m: None)

    class Killed(Exception):
        pass

    def kill_after_epoch_1(metrics, checkpoint):
        if metrics["epoch"] == 1 and "phase" not in metrics:
            raise Killed

    with pytest.raises(Killed):
        fit_fold(cfg, faces, 2, report=kill_after_epoch_1, checkpoint_dir=tmp_path / "b", log=lambda m: None)
    resumed = fit_fold(cfg, faces, 2, checkpoint_dir=tmp_path / "b", log=lambda m: None)
    assert resumed.accuracy == straight.accuracy
    assert resumed.confusion == straight.confusion
    assert resumed.gate_means == pytest.approx(straight.gate_means, abs=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


@pytest.mark.parametrize("variant", ["original", "no_mtl", "fes_da"])
def test_test_fold_never_reaches_an_optimiser_step(tiny, monkeypatch, variant):
    """Every image that enters a training step passes through apply_augmentation; trace them all."""
    faces, fold = tagged_faces(), 4
    test_ids = set(torch.nonzero(faces.folds == fold).squeeze(1).tolist())
    seen: set[int] = set()
    from fers_dist.data import loader

    def traced(images, affine, crop):
        seen.update(decode_index(images))
        return loader.apply_augmentation(images, affine, crop)

    monkeypatch.setattr("fers_dist.train.trainer.apply_augmentation", traced)
    monkeypatch.setattr("fers_dist.train.identity.apply_augmentation", traced)
    # One epoch is a pass over every training face (and each phase: identity encoder, main, FES-DA).
    cfg = tiny.with_overrides({"model.variant": variant, "train.epochs": 1})
    result = fit_fold(cfg, faces, fold, log=lambda m: None)
    assert seen, "the instrumentation saw no training batch"
    assert not seen & test_ids
    assert result.n_test_images == len(test_ids)


def test_fes_da_fine_tuning_set_is_balanced(demo_cfg):
    from fers_dist.model import build_model

    faces = tagged_faces()
    counts = torch.bincount(faces.labels, minlength=7)
    assert counts.max() != counts.min()  # imbalanced to start with
    model = build_model(demo_cfg.model, 7)
    balanced = synthesize_balanced(model, faces, demo_cfg.model.input_size, amp=False)
    assert torch.bincount(balanced.labels, minlength=7).tolist() == [len(faces)] * 7
    assert decode_index(balanced.images) == set(range(len(faces)))  # made from these faces only


def test_cycle_pass_keeps_fakes_out_of_batchnorm_running_stats(tiny_cfg, monkeypatch):
    """The cycle pass G(fake, y) normalises with its batch statistics (gradients unchanged) but leaves the
    running statistics, used at test time on real faces, to the real-input forward passes alone."""
    from fers_dist.train import trainer as trainer_mod

    faces = tagged_faces()
    calls = []

    @contextlib.contextmanager
    def spy(module):  # the real context manager, checked from inside and after
        norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        before = [m.running_mean.clone() for m in norms]
        originals = [m.running_mean for m in norms]
        with real(module):  # scratch buffers inside; the module's attributes (compile guards) untouched
            assert all(m.running_mean is not o and m.momentum == 0.1 for m, o in zip(norms, originals))
            yield
        calls.append(all(torch.equal(b, m.running_mean) for b, m in zip(before, norms)))
        assert all(m.running_mean is o for m, o in zip(norms, originals))  # the originals are back

    real = trainer_mod.running_stats_frozen
    monkeypatch.setattr(trainer_mod, "running_stats_frozen", spy)
    t = trainer_mod.Trainer(tiny_cfg, faces, torch.Generator().manual_seed(0), log=lambda m: None)
    bn = next(m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    start = bn.running_mean.clone()
    t.step(torch.arange(16), t.lambdas(0), {})
    assert calls == [True]  # one cycle pass per step, running stats untouched inside it
    assert not torch.equal(start, bn.running_mean)  # ...while the real-input pass did update them

    x = torch.randn(8, 4, 6, 6)
    norm = torch.nn.BatchNorm2d(4).train()
    with real(norm):
        y = norm(x)
    assert torch.equal(norm.running_mean, torch.zeros(4)) and norm.momentum == 0.1
    assert torch.allclose(y, torch.nn.BatchNorm2d(4).train()(x))  # batch statistics still normalise


def test_bad_fold_index_is_a_clear_error(tiny):
    with pytest.raises(DataError, match=r"fold 10 is out of range: ckplus has folds 0\.\.9"):
        fit_fold(tiny, tagged_faces(), 10)


def test_empty_training_split_is_a_clear_error(tiny):
    faces = tagged_faces()
    one_fold = FaceSet(**{**faces.__dict__, "folds": torch.zeros_like(faces.folds)})
    with pytest.raises(DataError, match="training split is empty"):
        fit_fold(tiny, one_fold, 0)


def test_missing_lightcnn_checkpoint_names_the_field(tiny):
    cfg = tiny.with_overrides({"identity.backbone": "lightcnn9", "identity.checkpoint": None})
    with pytest.raises(fold_mod.FersError, match="identity.checkpoint"):
        fit_fold(cfg, tagged_faces(), 0, log=lambda m: None)


def test_identity_none_records_lambda4_zero(tiny):
    r = fit_fold(tiny.with_overrides({"identity.backbone": "none"}), tagged_faces(), 0, log=lambda m: None)
    assert r.identity == "none" and r.lam_idt_used is False
    assert all(h["lam_idt"] == 0 for h in r.history)


def test_a_checkpoint_made_under_another_config_is_refused(tiny, tmp_path):
    cfg = tiny.with_overrides({"identity.backbone": "none", "train.epochs": 1})
    faces = tagged_faces()
    fit_fold(cfg, faces, 2, checkpoint_dir=tmp_path, log=lambda m: None)
    other = cfg.with_overrides({"loss.lam_rec": 2.0})
    with pytest.raises(FersError, match=rf"main.pt: checkpoint was made under config {cfg.hash()}, this run's "
                                        rf"config is {other.hash()}"):
        fit_fold(other, faces, 2, checkpoint_dir=tmp_path, log=lambda m: None)
    with pytest.raises(FersError, match="checkpoint was made under config"):  # fes_da's init_from too
        fit_fold(other.with_overrides({"model.variant": "fes_da"}), faces, 2, init_from=tmp_path / "main.pt",
                 log=lambda m: None)


def test_checkpoints_keep_only_the_training_devices_cuda_rng(tmp_path):
    """A run may resume on a node that sees fewer GPUs: the checkpoint holds the training device's CUDA RNG
    alone (none on the CPU), and an old checkpoint holding every visible GPU's RNG still loads."""
    from fers_dist.train.checkpoint import load_checkpoint, save_checkpoint

    net, g = torch.nn.Linear(2, 2), torch.Generator().manual_seed(0)
    save_checkpoint(tmp_path / "c.pt", epoch=0, modules={"model": net}, generator=g, history=[])
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert "cuda" not in state["rng"]
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # the old format: all 8 GPUs of a node
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", modules={"model": net}, generator=g)["epoch"] == 0
    state["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state, on a CPU run
    torch.save(state, tmp_path / "cuda.pt")
    with pytest.raises(FersError, match="cuda.pt: made on another kind of device than this run's cpu"):
        load_checkpoint(tmp_path / "cuda.pt", modules={"model": net}, generator=g)


def test_fes_da_fine_tuning_epochs_are_reported_as_such(tiny):
    """Live reports (Tune, MLflow) tell the fine-tuning epochs from the main ones, which restart at 0."""
    cfg = tiny.with_overrides({"model.variant": "fes_da", "identity.backbone": "none", "train.epochs": 1,
                               "train.fes_da_epochs": 1})
    seen = []
    fit_fold(cfg, tagged_faces(), 2, report=lambda m, saved: seen.append((m["epoch"], m.get("phase"))),
             log=lambda m: None)
    assert seen == [(0, None), (0, "fes_da")]
