"""The paper's wiring, as one Trainer.step does it: the inputs of every loss term (eq. 5-9) are recorded
and compared with tensors replayed independently from the trainer's random draws; and the no_convflu
variant (SharedTrunkNet) trained for an epoch on the full objective.

Replay: a step draws the augmentation, then the targets, from the trainer's generator; a copy of the
generator's state taken before the step gives the same draws again, so the test knows the source faces
x, the target faces x_t (same subject, target expression, same augmentation) and both one-hots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from test_train import tagged_faces
from torch import nn

from fers_dist.data.loader import TargetSampler, apply_augmentation, rotation_table, sample_augmentation
from fers_dist.model.fersnet import SharedTrunkNet
from fers_dist.train import trainer as trainer_mod

LOSSES = ("cls_loss", "gan_loss", "rec_loss", "cyc_loss", "idt_loss")
IDX = torch.tensor([0, 5, 10, 15, 2, 7, 8, 13])  # two faces of each of the 4 subjects


class TinyIdentity(nn.Module):
    """A cheap, frozen stand-in for f_LCNN: a fixed random projection of 4x4 patches."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(1, 4, 4, 4, bias=False).requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(1)


class Seen(NamedTuple):
    """A tensor as it reached a call: its value then, and whether gradients flow through it."""

    value: torch.Tensor
    grad: bool


def snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return Seen(obj.detach().clone(), obj.requires_grad)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # FERSOutput
        return type(obj)(*map(snapshot, obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map(snapshot, obj))
    return obj


class Call(NamedTuple):
    args: tuple
    out: object


@dataclass
class Replay:
    y: torch.Tensor
    y_t: torch.Tensor
    t_idx: torch.Tensor
    x: torch.Tensor
    x_t: torch.Tensor
    onehot: torch.Tensor
    onehot_t: torch.Tensor


@dataclass
class Recorded:
    real_pair: str
    faces: object
    replay: Replay | None = None
    losses: dict[str, list[Call]] = field(default_factory=lambda: {name: [] for name in LOSSES})
    G: list[Call] = field(default_factory=list)  # the model (generator and recogniser)
    D: list[Call] = field(default_factory=list)
    idt: list[Call] = field(default_factory=list)  # the identity network

    @property
    def fake(self) -> Seen:
        return self.G[0].out.image


def same(seen: Seen, expected: torch.Tensor) -> bool:
    return torch.equal(seen.value, expected)


def recording(fn, calls: list[Call]):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(Call(snapshot(args) + tuple(kwargs.values()), snapshot(out)))
        return out
    return wrapped


def record_forward(module: nn.Module, calls: list[Call]):
    return module.register_forward_hook(lambda _, args, out: calls.append(Call(snapshot(args), snapshot(out))))


def replay(t: trainer_mod.Trainer, idx: torch.Tensor, state: torch.Tensor) -> Replay:
    """The step's draws again, from a copy of the generator state it started from."""
    tr, cfg, dev = t.train_set, t.cfg, t.device
    g = torch.Generator(device=dev)
    g.set_state(state)
    crop = cfg.model.input_size
    aff = sample_augmentation(idx.numel(), tr.images.shape[-1], crop, rotation_table(cfg.data.rotations, dev),
                              cfg.data.mirror, g, dev)
    y_t, t_idx = TargetSampler(tr.labels, tr.subjects, tr.num_classes).sample(idx, g)
    y = tr.labels[idx]
    return Replay(y=y, y_t=y_t, t_idx=t_idx,
                  x=apply_augmentation(tr.images[idx], aff, crop), x_t=apply_augmentation(tr.images[t_idx], aff, crop),
                  onehot=F.one_hot(y, tr.num_classes).float(), onehot_t=F.one_hot(y_t, tr.num_classes).float())


@pytest.fixture(scope="module")
def wiring_cfg(demo_cfg):
    """A tiny model (16x16 input, width 8): one full-objective step takes milliseconds."""
    return demo_cfg.with_overrides({"model.input_size": 16, "model.width": 8, "model.disc_width": 8,
                                    "identity.backbone": "none", "train.batch_size": 8})


@pytest.fixture(scope="module", params=["target", "source"])
def step(request, wiring_cfg) -> Recorded:
    """One Trainer.step under loss.real_pair=<param>, every loss input and module call recorded."""
    cfg = wiring_cfg.with_overrides({"loss.real_pair": request.param})
    faces = tagged_faces(n_subjects=4, per_subject=4, size=20)
    torch.manual_seed(0)
    t = trainer_mod.Trainer(cfg, faces, torch.Generator().manual_seed(0), identity=TinyIdentity(),
                            log=lambda m: None)
    rec = Recorded(request.param, faces)
    lam = t.lambdas(0)
    assert t.D is not None and lam["idt"] > 0 and cfg.train.d_steps == 1  # every term runs, D once
    hooks = [record_forward(m, calls) for m, calls in ((t.model, rec.G), (t.D, rec.D), (t.identity, rec.idt))]
    state = t.g.get_state()
    with pytest.MonkeyPatch.context() as mp:
        for name in LOSSES:
            mp.setattr(trainer_mod, name, recording(getattr(trainer_mod, name), rec.losses[name]))
        t.step(IDX, lam, {})
    for h in hooks:
        h.remove()
    rec.replay = replay(t, IDX, state)
    return rec


def test_replayed_targets_are_the_same_subject_showing_the_target_expression(step):
    faces, r = step.faces, step.replay
    assert torch.equal(faces.subjects[r.t_idx], faces.subjects[IDX])
    assert torch.equal(faces.labels[r.t_idx], r.y_t)
    # every subject has other expressions, so no target is the source: a swap of the two is visible below
    assert (r.y_t != r.y).all() and (r.t_idx != IDX).all()
    assert not torch.isclose(r.x, r.x_t).all(dim=(1, 2, 3)).any()
    fake = step.fake.value.float()  # bf16 where the demo config runs under train.cpu_amp
    assert not torch.isclose(fake, r.x).all() and not torch.isclose(fake, r.x_t).all()


def test_each_term_is_computed_once_per_step(step):
    assert {name: len(calls) for name, calls in step.losses.items()} == {
        "cls_loss": 1, "gan_loss": 3, "rec_loss": 1, "cyc_loss": 1, "idt_loss": 1}
    assert (len(step.G), len(step.D), len(step.idt)) == (2, 3, 2)


def test_generator_sees_the_source_face_and_the_target_onehot(step):
    image, onehot = step.G[0].args
    assert same(image, step.replay.x), "the model's input is not the augmented source face"
    assert same(onehot, step.replay.onehot_t), "the generator is not conditioned on y_t"
    assert not image.grad and not onehot.grad


def test_cls_loss_scores_the_source_logits_against_the_source_labels(step):  # eq. 5
    logits, labels = step.losses["cls_loss"][0].args
    assert same(logits, step.G[0].out.logits.value) and logits.grad
    assert same(labels, step.replay.y)


def test_discriminator_real_pair_fake_pair_and_adversarial_pair(step):  # eq. 6
    r = step.replay
    want_real = (r.x_t, r.onehot_t) if step.real_pair == "target" else (r.x, r.onehot)
    (real, z_real), (fake_d, z_fake), (fake_g, z_g) = (c.args for c in step.D)
    assert same(real, want_real[0]) and same(z_real, want_real[1]), f"real pair is not the {step.real_pair}'s"
    assert same(fake_d, step.fake.value) and not fake_d.grad, "D's fake pair: G's fake, detached"
    assert same(z_fake, r.onehot_t), "D's fake pair is not labelled with the target one-hot"
    assert same(fake_g, step.fake.value) and fake_g.grad, "the adversarial term must reach G"
    assert same(z_g, r.onehot_t)
    gan = step.losses["gan_loss"]
    assert [c.args[1] for c in gan] == [True, False, True]  # D: real -> 1, fake -> 0; G: fake -> 1
    assert all(same(c.args[0], d.out.value) for c, d in zip(gan, step.D))


def test_rec_loss_compares_the_fake_with_the_target_face(step):  # eq. 7
    fake, target = step.losses["rec_loss"][0].args
    assert same(fake, step.fake.value) and fake.grad
    assert same(target, step.replay.x_t), "L_rec's target is not I^t"


def test_cycle_maps_the_fake_back_with_the_source_onehot(step):  # eq. 8
    image, onehot = step.G[1].args
    assert same(image, step.fake.value) and image.grad, "the cycle's input is not G's fake"
    assert same(onehot, step.replay.onehot), "the cycle is not conditioned on the source label"
    cycled, target = step.losses["cyc_loss"][0].args
    assert same(cycled, step.G[1].out.image.value) and cycled.grad
    assert same(target, step.replay.x), "L_cyc's target is not the source face"


def test_identity_features_of_the_fake_and_the_target_face(step):  # eq. 9
    (of_fake,), (of_target,) = (c.args for c in step.idt)
    assert same(of_fake, step.fake.value) and of_fake.grad
    assert same(of_target, step.replay.x_t), "L_idt compares with a face other than I^t"
    feat_fake, feat_target = step.losses["idt_loss"][0].args
    assert same(feat_fake, step.idt[0].out.value) and same(feat_target, step.idt[1].out.value)


# -- no_convflu: the hard-sharing ablation trains on the full objective ----------------------------------
def test_no_convflu_trains_an_epoch_on_the_full_objective(wiring_cfg):
    cfg = wiring_cfg.with_overrides({"model.variant": "no_convflu"})
    faces = tagged_faces(n_subjects=4, per_subject=8, size=20)  # 32 faces: 4 steps of 8
    torch.manual_seed(0)
    t = trainer_mod.Trainer(cfg, faces, torch.Generator().manual_seed(0), epochs=1, identity=TinyIdentity(),
                            log=lambda m: None)
    assert isinstance(t.model, SharedTrunkNet) and t.full and t.D is not None
    heads = {name: getattr(t.model, name) for name in ("trunk", "f_cls", "f_tra", "f_dec")}
    before = {name: [p.detach().clone() for p in head.parameters()] for name, head in heads.items()}
    assert t.fit() == 1
    (h,) = t.history
    assert h["epoch"] == 0
    terms = ("loss", "d_loss", "loss_cls", "loss_adv", "loss_rec", "loss_cyc", "loss_idt")
    assert all(k in h and torch.isfinite(torch.tensor(h[k])) for k in terms), h
    assert h["loss_rec"] > 0 and h["loss_cyc"] > 0 and h["lam_idt"] > 0
    for name, head in heads.items():
        unchanged = [i for i, (b, p) in enumerate(zip(before[name], head.parameters())) if torch.equal(b, p)]
        assert not unchanged, f"{name}: parameters {unchanged} did not move in an epoch"
