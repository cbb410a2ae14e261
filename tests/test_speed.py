"""The speed features of the training step (fers_dist/train/speed.py, issue 20): each keeps the numbers of
the plain path within tolerance, and a training step never waits on the device (no host sync)."""

from __future__ import annotations

import pytest
import torch
from test_train import tagged_faces
from torch.overrides import TorchFunctionMode

from fers_dist.train.trainer import Trainer

SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
           "masked_select", "unique", "tensor", "as_tensor", "repeat_interleave", "synchronize"}


class HostSyncSpy(TorchFunctionMode):
    """Records every torch call that makes the host wait for the device (reads a value back, or copies
    host data in), plus indexing with a boolean mask (an implicit nonzero)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING or (name == "to" and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()])):
            self.syncs.append(name)
        if name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                         for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.syncs.append("bool-mask indexing")
        return func(*args, **(kwargs or {}))


def _trainer(cfg, **overrides) -> Trainer:
    cfg = cfg.with_overrides(overrides)
    torch.manual_seed(0)
    return Trainer(cfg, tagged_faces(), torch.Generator().manual_seed(0), log=lambda m: None)


@pytest.fixture(scope="module")
def full_cfg(demo_cfg):  # the full objective: D, cycle, identity network (a subject encoder)
    return demo_cfg.with_overrides({"identity.backbone": "subject_encoder", "identity.encoder_epochs": 1,
                                    "loss.lam_idt_start": 1.0, "loss.lam_idt_end": 1.0, "train.batch_size": 16,
                                    "train.cpu_amp": False})  # float32: the features below are compared exactly


def test_training_step_makes_no_host_sync(full_cfg):
    t = _trainer(full_cfg)
    lam, sums = t.lambdas(0), {}
    assert lam["idt"] > 0 and t.D is not None and t.identity is not None  # every loss term runs
    t.step(torch.arange(16), lam, sums)  # first step (lazy init) outside the check
    with HostSyncSpy() as spy:
        for s in range(2):
            t.step(torch.arange(16 * s, 16 * (s + 1)), lam, sums)
    assert spy.syncs == []
    for variant in ("no_mtl", "no_convflu"):
        t = _trainer(full_cfg, **{"model.variant": variant})
        with HostSyncSpy() as spy:
            t.step(torch.arange(16), t.lambdas(0), {})
        assert spy.syncs == [], variant


def test_the_sync_spy_catches_a_sync(full_cfg, monkeypatch):
    """The check above is not vacuous: one .item() inside a loss is caught."""
    from fers_dist.train import trainer as trainer_mod

    real = trainer_mod.rec_loss
    monkeypatch.setattr(trainer_mod, "rec_loss", lambda a, b: real(a, b) * (1 + 0 * real(a, b).item()))
    t = _trainer(full_cfg)
    with HostSyncSpy() as spy:
        t.step(torch.arange(16), t.lambdas(0), {})
    assert spy.syncs == ["item"]


def _losses(cfg, steps: int = 3, **overrides) -> tuple[list[float], Trainer]:
    t = _trainer(cfg, **overrides)
    out = []
    for s in range(steps):
        sums = {}
        t.step(torch.arange(16 * s, 16 * (s + 1)), t.lambdas(0), sums)
        out.append(float(sums["loss"]))
    return out, t


@pytest.mark.parametrize(("key", "fast", "plain"), [("train.fused_adam", True, False),
                                                     ("train.channels_last", True, False)])
def test_speed_feature_keeps_the_plain_losses(full_cfg, key, fast, plain):
    """Three full-objective steps (G, D, cycle, identity). The first step starts from the same weights, so
    its loss must agree to 1e-5 (relative): only the operations differ. The next two agree to 0.5%: Adam
    moves parameters whose gradient is ~0 by ±lr on rounding noise alone (measured: 0.12% after 2
    steps for channels_last), so the trajectory tolerance measures Adam as much as the feature. Weights
    are compared one operation at a time below."""
    _assert_same_losses(_losses(full_cfg, **{key: fast})[0], _losses(full_cfg, **{key: plain})[0], first_rel=1e-5)


def test_cpu_amp_is_bf16_autocast_only_on_a_cpu_with_bf16_units(demo_cfg, monkeypatch):
    """``train.cpu_amp`` turns bf16 autocast on for CPU runs where the CPU computes bf16 in hardware, and
    nowhere else; ``train.amp`` alone decides CUDA runs."""
    from fers_dist.train import speed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on, off = (demo_cfg.with_overrides({"train.cpu_amp": v, "train.amp": not v}) for v in (True, False))
    monkeypatch.setattr(speed, "cpu_has_bf16", lambda: False)
    assert not speed.use_amp(on, cpu)  # emulated bf16 would be slower than float32
    monkeypatch.setattr(speed, "cpu_has_bf16", lambda: True)
    assert speed.use_amp(on, cpu) and not speed.use_amp(off, cpu)
    assert speed.use_amp(off, cuda) and not speed.use_amp(on, cuda)
    with speed.autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with speed.autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")


def test_a_torch_without_the_capability_query_stays_float32(monkeypatch):
    """Older torch builds have no ``torch.cpu.get_capabilities``: CPU runs then stay float32, no error."""
    from fers_dist.train import speed

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    speed.cpu_has_bf16.cache_clear()
    try:
        assert speed.cpu_has_bf16() is False
    finally:
        speed.cpu_has_bf16.cache_clear()  # the next call asks the real torch again


def test_cpu_bf16_step_computes_in_bf16_and_follows_float32(full_cfg, monkeypatch):
    """Three full-objective steps under ``train.cpu_amp`` (bf16 forced on, so the test runs on any CPU): the
    generator's convolutions run in bf16, and the losses stay within 3% of float32's (measured: 0.04%, 1.1%, 0.5%)."""
    from fers_dist.train import speed

    monkeypatch.setattr(speed, "cpu_has_bf16", lambda: True)
    dtypes = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: dtypes.append(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        bf16, t = _losses(full_cfg, **{"train.cpu_amp": True})
    finally:
        hook.remove()
    assert t.amp and torch.bfloat16 in dtypes
    fp32 = _losses(full_cfg)[0]
    assert bf16 == pytest.approx(fp32, rel=0.03)


def _assert_same_losses(fast: list[float], plain: list[float], first_rel: float) -> None:
    assert fast[0] == pytest.approx(plain[0], rel=first_rel)
    assert fast == pytest.approx(plain, rel=5e-3)


def test_fused_adam_step_equals_foreach():
    from fers_dist.config import Config
    from fers_dist.train.speed import adam

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g)]
    out = {}
    for fused in (True, False):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = adam(ps, 1e-3, Config().with_overrides({"train.fused_adam": fused, "optim.weight_decay": 1e-4}))
        for step in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        out[fused] = ps
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(out[True], out[False]))


def test_channels_last_forward_equals_nchw(full_cfg):
    from fers_dist.model import build_model
    from fers_dist.model.discriminator import PatchDiscriminator
    from fers_dist.train.speed import nhwc, to_channels_last

    torch.manual_seed(0)
    g, d = build_model(full_cfg.model, 7).eval(), PatchDiscriminator(full_cfg.model, 7).eval()
    x = torch.randn(4, 1, full_cfg.model.input_size, full_cfg.model.input_size)
    z = torch.nn.functional.one_hot(torch.arange(4) % 7, 7).float()
    with torch.no_grad():
        plain = (g(x, z).image, g(x, z).logits, d(x, z))
        to_channels_last(g, True), to_channels_last(d, True)
        fast = (g(nhwc(x, True), z).image, g(nhwc(x, True), z).logits, d(nhwc(x, True), z))
    convs = [m for net in (g, d) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs if m.kernel_size != (1, 1))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, fast))


@pytest.mark.slow
def test_compiled_step_matches_eager_in_one_graph(full_cfg):
    """torch.compile (inductor, on CPU here) vs eager: the same losses and weights within tolerance, and the
    generator compiles once: the cycle pass (BatchNorm scratch buffers) must not force a second graph."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = full_cfg.with_overrides({"identity.backbone": "none"})
    eager, _ = _losses(cfg, **{"train.compile": False})
    compiled, _ = _losses(cfg, **{"train.compile": True})
    _assert_same_losses(compiled, eager, first_rel=1e-4)  # inductor fuses and reorders float ops
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    recompiles = sum(torch._dynamo.utils.counters["recompiles"].values())
    assert recompiles == 0, dict(torch._dynamo.utils.counters["recompiles"])
    assert frames >= 1


def test_identity_network_drops_the_unused_classifier_and_runs_nhwc():
    """LightCNN-9's 79,077-way classifier (20M parameters) never feeds L_idt, so it never reaches the device;
    the features are unchanged, in channels_last too."""
    from fers_dist.model.lightcnn import OFFICIAL_CLASSES, LightCNN9
    from fers_dist.train.identity import IdentityFeatures

    torch.manual_seed(0)
    net = LightCNN9(num_classes=OFFICIAL_CLASSES)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    from fers_dist.model.lightcnn import to_lightcnn_input

    with torch.no_grad():
        expected = net.features(to_lightcnn_input(x))
        plain, fast = IdentityFeatures(LightCNN9(num_classes=OFFICIAL_CLASSES)), IdentityFeatures(net, True)
    assert sum(p.numel() for p in fast.parameters()) < 6_000_000 < OFFICIAL_CLASSES * 256
    assert not any(k.startswith("net.fc2") for k in fast.state_dict())
    with torch.no_grad():
        assert torch.allclose(fast(x), expected, atol=1e-5)
        assert plain(x).shape == expected.shape


def test_packed_memory_cap_names_an_indexed_device(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction refuses an unindexed torch.device("cuda"), which is what
    `auto`/`cuda` resolve to: the cap must pass the index (the current device for a bare "cuda")."""
    from fers_dist.train import speed

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    speed.cap_process_memory("cuda", 0.25)
    speed.cap_process_memory(torch.device("cuda", 1), 0.5)
    speed.cap_process_memory("cuda:0", 1.0)  # a whole card: no cap
    speed.cap_process_memory("cpu", 0.25)
    assert calls == [(0.25, 3), (0.5, 1)]
