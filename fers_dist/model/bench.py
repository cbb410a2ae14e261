"""`fers bench model`: parameters, counted MACs per image, and forward+backward images/s.

MACs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records the FLOPs of every
matmul and convolution (forward and, where run, backward; elementwise ops such as BatchNorm, gates and
activations are not counted), and MAC = FLOP / 2. Counting runs on the meta device, so it costs no
compute. Throughput is measured on the chosen device.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=256, help="filters per conv layer (paper: 256)")
    parser.add_argument("--input-size", type=int, default=96, help="input crop (paper: 96)")
    parser.add_argument("--batch", type=int, default=8, help="batch for the images/s measurement")
    parser.add_argument("--variant", default="original", choices=["no_mtl", "no_convflu", "original", "fes_da"])
    parser.add_argument("--num-classes", type=int, default=7, help="E: 7 on CK+, 6 elsewhere")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")


def _counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _inputs(cfg, num_classes: int, batch: int, device):
    import torch
    import torch.nn.functional as F

    labels = torch.arange(batch, device=device) % num_classes
    image = torch.rand(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device) * 2 - 1
    target = F.one_hot((labels + 1) % num_classes, num_classes).float()
    return image, labels, target


def forward_flops(cfg, num_classes: int, with_target: bool) -> int:
    """Counted FLOPs of one generator forward for one image (eval mode)."""
    import torch

    from fers_dist.model.fersnet import build_model

    with torch.device("meta"), torch.no_grad():
        model = build_model(cfg, num_classes).eval()
        image, _, target = _inputs(cfg, num_classes, 1, "meta")
        return _counted_flops(lambda: model(image, target if with_target else None))


def train_step_flops(cfg, num_classes: int, batch: int = 2) -> dict[str, int]:
    """Counted FLOPs per image of one full-objective training step (eq. 10 with LightCNN-9 L_idt):
    generator step (G forward, cycle forward, D on the fake, LightCNN on fake and target, backward)
    and discriminator step (D on real and on the detached fake, backward). Also the forward-only
    part, whose x3 is the usual rough estimate of forward+backward."""
    import torch
    import torch.nn.functional as F

    from fers_dist.model import losses
    from fers_dist.model.discriminator import PatchDiscriminator
    from fers_dist.model.fersnet import build_model
    from fers_dist.model.lightcnn import LightCNN9, to_lightcnn_input

    with torch.device("meta"):
        gen, disc = build_model(cfg, num_classes), PatchDiscriminator(cfg, num_classes)
        lcnn = LightCNN9(num_classes=10).eval().requires_grad_(False)
        image, labels, target = _inputs(cfg, num_classes, batch, "meta")
        real_t = image.flip(-1)
        onehot = F.one_hot(labels, num_classes).float()

    def g_forward():
        out = gen(image, target)
        if out.image is None:
            return {"cls": losses.cls_loss(out.logits, labels)}, None
        fake = out.image
        return {
            "cls": losses.cls_loss(out.logits, labels),
            "adv": losses.gan_loss(disc(fake, target), True),
            "rec": losses.rec_loss(fake, real_t),
            "cyc": losses.cyc_loss(gen(fake, onehot).image, image),
            "idt": losses.idt_loss(lcnn.features(to_lightcnn_input(fake)),
                                   lcnn.features(to_lightcnn_input(real_t))),
        }, fake

    def d_loss(fake):
        return losses.gan_loss(disc(real_t, target), True) + losses.gan_loss(disc(fake.detach(), target), False)

    lam = {"adv": 0.3, "rec": 1.0, "cyc": 0.5, "idt": 0.1}

    def step():
        terms, fake = g_forward()
        losses.total_loss(terms, lam).backward()
        if fake is not None:
            d_loss(fake).backward()

    def forward():
        with torch.no_grad():
            _, fake = g_forward()
            if fake is not None:
                d_loss(fake)

    return {"step": _counted_flops(step) // batch, "forward": _counted_flops(forward) // batch}


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def throughput(model, cfg, num_classes: int, batch: int, steps: int, warmup: int, device) -> float:
    """Generator forward (with target) + backward of L_cls + L_rec, images/s."""
    import torch
    from tqdm import tqdm

    from fers_dist.model.losses import cls_loss, rec_loss

    image, labels, target = _inputs(cfg, num_classes, batch, device)

    def one_step():
        out = model(image, target)
        loss = cls_loss(out.logits, labels)
        if out.image is not None:
            loss = loss + rec_loss(out.image, image)
        loss.backward()
        model.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in tqdm(range(warmup), desc="warmup", leave=False):
        one_step()
    sync()
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"fwd+bwd batch {batch}", leave=False):
        one_step()
    sync()
    return batch * steps / (time.perf_counter() - start)


def _model_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from fers_dist.config import ConfigError, ModelConfig

    try:
        return ModelConfig(variant=args.variant, width=args.width, input_size=args.input_size)
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if "got" in msg else f" (got {err['input']!r})"
        raise ConfigError(f"{flag}: {msg}{got}") from None


def bench(args: argparse.Namespace) -> dict:
    import torch

    from fers_dist.model.discriminator import PatchDiscriminator
    from fers_dist.model.fersnet import build_model, count_params

    cfg = _model_config(args)
    nc, device = args.num_classes, _device(args.device)
    model = build_model(cfg, nc).to(device).train()
    macs = forward_flops(cfg, nc, with_target=True) // 2
    step = train_step_flops(cfg, nc)
    return {
        "bench": "model",
        "variant": cfg.variant,
        "width": cfg.width,
        "effective_width": model.width,
        "input_size": cfg.input_size,
        "num_classes": nc,
        "batch": args.batch,
        "params": count_params(model),
        "params_discriminator": count_params(PatchDiscriminator(cfg, nc)),
        "macs_per_image": macs,
        "gmac_per_image": round(macs / 1e9, 3),
        "fer_only_gmac_per_image": round(forward_flops(cfg, nc, with_target=False) / 2e9, 3),
        "train_step_tflop_per_image": round(step["step"] / 1e12, 4),
        "train_step_fwd_x3_tflop_per_image": round(3 * step["forward"] / 1e12, 4),
        "fwd_bwd_images_per_s": round(throughput(model, cfg, nc, args.batch, args.steps, args.warmup, device), 3),
        "device": _device_name(device),
        "torch": torch.__version__,
    }
