"""`fers bench train`: the real training step of the fold trainer (full objective: G forward, cycle
pass, D step, backward, optimiser steps), on random faces kept on the device.

Prints images/s per training step, peak memory, and on GPU the achieved TFLOP/s and MFU against the card's
dense bf16 peak. FLOPs per step are COUNTED (torch FlopCounterMode over one real step, backward included).
It also projects a full 500-epoch CK+ fold (883 training images per fold) from the measured rate.
"""

from __future__ import annotations

import argparse
import time

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=256, help="filters per conv layer (paper: 256)")
    p.add_argument("--input-size", type=int, default=96, help="network input (paper: 96)")
    p.add_argument("--batch", type=int, default=64, help="batch size (paper: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, cudnn autotune)")
    p.add_argument("--identity", default="none", choices=["none", "subject_encoder"],
                   help="L_idt network (subject_encoder: LightCNN-9 at 0.25 width trained 1 epoch first)")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA (default: bf16 autocast)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW tensors (default: channels_last)")


def _faces(n: int, size: int, E: int, device):
    import torch

    from fers_dist.data.loader import FaceSet

    g = torch.Generator().manual_seed(0)
    subjects = torch.arange(n) // 8
    return FaceSet(images=torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),
                   labels=torch.arange(n) % E, subjects=subjects, folds=subjects % 10,
                   class_names=tuple(str(i) for i in range(E)),
                   subject_names=tuple(str(i) for i in range(int(subjects.max()) + 1))).to(device)


def bench(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fers_dist.config import Config
    from fers_dist.train.fold import resolve_device
    from fers_dist.train.trainer import Trainer

    device = resolve_device(args.device)
    aligned = args.input_size + args.input_size // 6 + 2  # 96 -> 110, as in the paper
    cfg = Config().model_copy(deep=True).with_overrides({
        "model.width": args.width, "model.input_size": args.input_size, "data.aligned_size": aligned,
        "train.batch_size": args.batch, "train.compile": args.compile, "train.amp": not args.no_amp,
        "train.channels_last": not args.no_channels_last,
        "identity.backbone": args.identity, "identity.encoder_epochs": 1, "identity.encoder_width": 0.25,
        "train.device": str(device), "train.log_every": 10**9})
    E = 7
    faces = _faces(args.batch * 4, aligned, E, device)
    g = torch.Generator(device=device).manual_seed(0)
    trainer = Trainer(cfg, faces, g, log=lambda m: None)
    lam, sums = trainer.lambdas(0), {}
    batches = [torch.arange(i * args.batch, (i + 1) * args.batch, device=device) % len(faces) for i in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        trainer.step(batches[0], lam, sums)
    flops_per_image = counter.get_total_flops() / args.batch
    for i in range(args.warmup):
        trainer.step(batches[i % 4], lam, sums)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        trainer.step(batches[i % 4], lam, sums)
    sync()
    seconds = time.perf_counter() - t0
    ips = args.steps * args.batch / seconds
    out = {"bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "width": args.width, "input_size": args.input_size, "batch": args.batch,
           "amp_bf16": trainer.amp, "compile": args.compile, "channels_last": not args.no_channels_last,
           "identity": args.identity,
           "images_per_s": round(ips, 2), "step_ms": round(1000 * seconds / args.steps, 2),
           "tflop_per_image_counted": round(flops_per_image / 1e12, 4),
           "achieved_tflops": round(ips * flops_per_image / 1e12, 3)}
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in out["device"]), None)
        out["mfu"] = round(out["achieved_tflops"] / peak, 4) if peak else None
    else:
        import resource

        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    out["projected_ckplus_fold_min"] = round(500 * 883 / ips / 60, 2)
    out["torch"] = torch.__version__
    return out
