"""FERSNet model package: ConvFLU equations, shapes of every variant, capacity matching, and which
parameters each loss term reaches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fers_dist.config import VARIANTS, ConfigError, ModelConfig
from fers_dist.model.convflu import ConvFLU
from fers_dist.model.discriminator import PatchDiscriminator, patch_size
from fers_dist.model.fersnet import (
    Capacity,
    FERNet,
    FERSNet,
    SharedTrunkNet,
    architecture,
    build_model,
    capacity,
    count_params,
)
from fers_dist.model.lightcnn import LightCNN9, to_lightcnn_input
from fers_dist.model.losses import cls_loss, cyc_loss, gan_loss, idt_loss, rec_loss

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on the shared 2-core machine two OpenMP threads per
    process oversubscribe the cores and slow these tests several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(**kw) -> ModelConfig:
    base = {"width": 8, "input_size": SIZE, "cls_hidden": 16, "disc_width": 8, "disc_layers": 2}
    return ModelConfig(**{**base, **kw})


def batch(n: int = 4, num_classes: int = 7, channels: int = 1):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, channels, SIZE, SIZE, generator=g) * 2 - 1
    labels = torch.arange(n) % num_classes
    target = F.one_hot((labels + 1) % num_classes, num_classes).float()
    return image, labels, target


# -- ConvFLU (eq. 1-4) --------------------------------------------------------------------------
def _by_hand(flu: ConvFLU, fx, fy):
    def conv(m, x):
        return F.conv2d(x, m.weight, m.bias, stride=1, padding=0)

    both = torch.cat([fx, fy], 1)
    r = torch.sigmoid(conv(flu.leaky_gate, both))  # eq. 1
    cand = torch.tanh(conv(flu.W, r * fy) + conv(flu.U, fx))  # eq. 2
    z = torch.sigmoid(conv(flu.memory_gate, both))  # eq. 3
    return (1 - z) * fx + z * cand, r, z, cand  # eq. 4


def test_convflu_matches_equations_1_to_4():
    torch.manual_seed(0)
    flu = ConvFLU(6)
    for conv in (flu.leaky_gate, flu.memory_gate, flu.W, flu.U):
        assert conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    fx, fy = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    out, r, z = flu(fx, fy)
    want_out, want_r, want_z, _ = _by_hand(flu, fx, fy)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(out, want_out)
    for gate in (r, z):
        assert gate.shape == fx.shape and (gate > 0).all() and (gate < 1).all()


@pytest.mark.parametrize("bias, keeps", [(-1e4, "f_x"), (1e4, "candidate")])
def test_memory_gate_bias_selects_input_or_candidate(bias, keeps):
    torch.manual_seed(1)
    flu = ConvFLU(4)
    with torch.no_grad():
        flu.memory_gate.bias.fill_(bias)
    fx, fy = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    out, _, z = flu(fx, fy)
    _, _, _, cand = _by_hand(flu, fx, fy)
    torch.testing.assert_close(z, torch.full_like(z, 0.0 if keeps == "f_x" else 1.0))
    torch.testing.assert_close(out, fx if keeps == "f_x" else cand)
    assert not torch.allclose(fx, cand)


# -- shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [7, 6])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_of_every_variant(variant, num_classes):
    cfg = small_cfg(variant=variant)
    model = build_model(cfg, num_classes)
    image, _, target = batch(num_classes=num_classes)
    out = model(image, target)
    assert out.logits.shape == (4, num_classes)
    with_convflu = variant in ("original", "fes_da")
    assert model.has_fes == (variant != "no_mtl")
    assert isinstance(model, FERSNet) == with_convflu
    if model.has_fes:
        assert out.image.shape == image.shape
        assert out.image.abs().max() <= 1
    else:
        assert out.image is None
    assert len(out.gates) == (4 if with_convflu else 0)
    for i, g in enumerate(out.gates):
        side = SIZE // 2 ** (i + 1)
        for t in (g.fer_r, g.fer_z, g.fes_r, g.fes_z):
            assert t.shape == (4, cfg.width, side, side)
    cheap = model(image)
    assert cheap.image is None and cheap.logits.shape == (4, num_classes)


def test_rgb_input_and_shared_convflu():
    cfg = small_cfg(in_channels=3, share_convflu=True)
    model = build_model(cfg, 6)
    assert len(model.flu_fer) == len(model.flu_fes) == 1
    assert count_params(model) < count_params(build_model(small_cfg(in_channels=3), 6))
    image, _, target = batch(num_classes=6, channels=3)
    out = model(image, target)
    assert out.image.shape == (4, 3, SIZE, SIZE) and len(out.gates) == 4


def test_without_target_f_tra_and_f_dec_are_skipped():
    model = build_model(small_cfg(), 7)
    called = []
    for name in ("f_tra", "f_dec"):
        getattr(model, name).register_forward_hook(lambda *a, n=name: called.append(n))
    model(batch()[0])
    assert called == []
    model(*batch()[::2])
    assert called == ["f_tra", "f_dec"]


def test_wrong_target_shape_is_a_clear_error():
    model = build_model(small_cfg(), 7)
    image, _, _ = batch()
    with pytest.raises(ValueError, match="target_onehot must have shape"):
        model(image, torch.zeros(4, 6))


# -- capacity of the ablations ------------------------------------------------------------------
@pytest.mark.parametrize("width, size", [(8, 32), (16, 32), (16, 48), (256, 96)])
@pytest.mark.parametrize("variant", ["no_mtl", "no_convflu"])
def test_width_matched_variants_have_at_least_the_original_capacity(variant, width, size):
    cfg = ModelConfig(width=width, input_size=size, variant=variant, capacity_match="width")
    with torch.device("meta"):
        original = count_params(FERSNet(cfg, 7))
        reduced = build_model(cfg, 7)
        assert count_params(reduced) >= original
        cls = FERNet if variant == "no_mtl" else SharedTrunkNet
        assert count_params(cls(cfg, 7, Capacity(reduced.width - 1))) < original  # the smallest such width
    assert reduced.width == capacity(cfg, 7).width > width


@pytest.mark.parametrize("width, size", [(8, 32), (16, 32), (16, 48), (256, 96)])
@pytest.mark.parametrize("variant", ["no_mtl", "no_convflu"])
def test_depth_matched_variants_grow_kernel_and_depth_not_width(variant, width, size):
    """The paper's default: 5x5 kernels and the fewest convs per block that reach FERSNet's count."""
    cfg = ModelConfig(width=width, input_size=size, variant=variant)
    assert cfg.capacity_match == "depth"
    with torch.device("meta"):
        original = count_params(FERSNet(cfg, 7))
        reduced = build_model(cfg, 7)
        cap = reduced.capacity
        assert cap == capacity(cfg, 7) and cap.width == width and cap.kernel == 5 and cap.convs >= 2
        assert count_params(reduced) >= original
        cls = FERNet if variant == "no_mtl" else SharedTrunkNet
        if cap.convs > 2:  # one conv fewer per block falls short
            assert count_params(cls(cfg, 7, cap._replace(convs=cap.convs - 1))) < original
        kernels = {m.kernel_size for m in reduced.modules() if isinstance(m, torch.nn.Conv2d)
                   and m in set((reduced.fer_blocks if variant == "no_mtl" else reduced.trunk).modules())}
        assert kernels == {(5, 5)}
    arch = architecture(cfg, 7)
    assert arch["params"] == count_params(build_model(cfg, 7)) >= arch["fersnet_params"] == original
    assert (arch["convs_per_block"], arch["kernel"], arch["capacity_match"]) == (cap.convs, 5, "depth")


def test_depth_matched_variants_train_forward_and_backward():
    cfg = small_cfg().model_copy(update={"variant": "no_convflu"})
    model = build_model(cfg, 7)
    image, _, target = batch()
    out = model(image, target)
    (out.logits.sum() + out.image.mean()).backward()
    assert out.image.shape == image.shape and all(p.grad is not None for p in model.parameters())


# -- discriminator ------------------------------------------------------------------------------
def test_patch_discriminator_shape_and_label_conditioning():
    cfg = small_cfg()
    disc = PatchDiscriminator(cfg, 7).eval()
    image, _, target = batch()
    out = disc(image, target)
    side = patch_size(SIZE, cfg.disc_layers)
    assert out.shape == (4, 1, side, side) and side > 1
    assert not torch.allclose(out, disc(image, target.roll(1, dims=1)))
    assert disc.net[0].in_channels == cfg.in_channels + 7


def test_discriminator_too_deep_for_input_is_config_error():
    with pytest.raises(ConfigError, match="model.disc_layers"):
        PatchDiscriminator(ModelConfig(input_size=16, disc_layers=5), 7)


# -- which parameters each loss reaches ---------------------------------------------------------
def reached(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def close_memory_gates(flus):
    with torch.no_grad():
        for flu in flus:
            flu.memory_gate.bias.fill_(-1e4)


@pytest.fixture
def gen():
    torch.manual_seed(0)
    return build_model(small_cfg(), 7)


def test_cls_loss_reaches_fer_and_fes_encoder_through_convflu_only(gen):
    image, labels, target = batch()
    cls_loss(gen(image, target).logits, labels).backward()
    for part in ("f_cls", "fer_blocks", "flu_fer", "fes_blocks"):
        assert reached(getattr(gen, part)), part
    assert not reached(gen.f_tra) and not reached(gen.f_dec)

    gen.zero_grad(set_to_none=True)
    close_memory_gates(gen.flu_fer)  # z = 0: nothing flows from FES into FER (eq. 4)
    cls_loss(gen(image, target).logits, labels).backward()
    assert reached(gen.fer_blocks) and not reached(gen.fes_blocks)


def test_rec_and_cyc_losses_reach_synthesis_path_not_f_cls(gen):
    image, labels, target = batch()
    for loss_of in (lambda fake: rec_loss(fake, image.flip(-1)),
                    lambda fake: cyc_loss(gen(fake, F.one_hot(labels, 7).float()).image, image)):
        gen.zero_grad(set_to_none=True)
        loss_of(gen(image, target).image).backward()
        for part in ("f_dec", "f_tra", "fes_blocks", "flu_fes", "fer_blocks"):
            assert reached(getattr(gen, part)), part
        assert not reached(gen.f_cls)

    gen.zero_grad(set_to_none=True)
    close_memory_gates(gen.flu_fes)  # nothing flows from FER into FES
    rec_loss(gen(image, target).image, image).backward()
    assert reached(gen.fes_blocks) and not reached(gen.fer_blocks)


def test_gan_losses_split_generator_and_discriminator(gen):
    disc = PatchDiscriminator(small_cfg(), 7)
    image, _, target = batch()
    fake = gen(image, target).image

    disc.requires_grad_(False)  # generator step: D frozen
    gan_loss(disc(fake, target), is_real=True).backward()
    assert reached(gen.f_dec) and not reached(gen.f_cls)
    assert all(p.grad is None for p in disc.parameters())

    disc.requires_grad_(True)  # discriminator step: fake detached
    gen.zero_grad(set_to_none=True)
    d_loss = gan_loss(disc(image, target), True, "lsgan") + gan_loss(disc(fake.detach(), target), False, "lsgan")
    d_loss.backward()
    assert reached(disc) and all(p.grad is None for p in gen.parameters())


def test_idt_loss_reaches_generator_not_frozen_lightcnn(gen):
    lcnn = LightCNN9(num_classes=10).eval().requires_grad_(False)
    image, _, target = batch(n=2)
    fake = gen(image, target).image
    idt_loss(lcnn.features(to_lightcnn_input(fake)), lcnn.features(to_lightcnn_input(image))).backward()
    assert reached(gen.f_dec) and not reached(gen.f_cls)
    assert all(p.grad is None for p in lcnn.parameters())


def test_reduced_variants_gradients():
    torch.manual_seed(0)
    image, labels, target = batch()
    no_mtl = build_model(small_cfg(variant="no_mtl"), 7)
    cls_loss(no_mtl(image, target).logits, labels).backward()
    assert reached(no_mtl.fer_blocks) and reached(no_mtl.f_cls)

    shared = build_model(small_cfg(variant="no_convflu"), 7)
    cls_loss(shared(image, target).logits, labels).backward()
    assert reached(shared.trunk) and not reached(shared.f_dec)
    shared.zero_grad(set_to_none=True)
    rec_loss(shared(image, target).image, image).backward()
    assert reached(shared.trunk) and reached(shared.f_tra) and not reached(shared.f_cls)
