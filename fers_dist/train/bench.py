"""`fers bench train`: the real training step of the fold trainer (full objective: G forward, cycle
pass, D step, backward, optimiser steps), on random faces kept on the device.

Prints images/s per training step, memory, and on GPU the achieved TFLOP/s and MFU against the card's
dense bf16 peak. FLOPs per step are COUNTED (torch FlopCounterMode over one real step, backward included).
It also projects a full 500-epoch CK+ fold (883 training images per fold) from the measured rate.

Scale: the paper's (width 256, 96x96, batch 64) on CUDA. On CPU the default is a scale that fits a small
machine (width 64, 48x48, batch 16): the paper scale needs ~40 GB of host memory there. Every run first
estimates its memory (``train/memory.py``) and refuses, in one line, one that cannot fit.
On CUDA, memory is the allocator's peak RESERVED bytes plus the process's CUDA context (what
``nvidia-smi`` shows), not just the allocated peak.
"""

from __future__ import annotations

import argparse
import time

from fers_dist.errors import FersError

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
PAPER_SCALE = {"width": 256, "input_size": 96, "batch": 64}
CPU_SCALE = {"width": 64, "input_size": 48, "batch": 16}
CKPLUS_TRAIN_IMAGES = 883  # 981 images, 9 of 10 folds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, help="filters per conv layer (paper: 256; CPU default: 64)")
    p.add_argument("--input-size", type=int, help="network input (paper: 96; CPU default: 48)")
    p.add_argument("--batch", type=int, help="batch size (paper: 64; CPU default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, cudnn autotune)")
    p.add_argument("--identity", default="none", choices=["none", "subject_encoder", "lightcnn9"],
                   help="L_idt network, random weights (same shapes and cost as the trained one): lightcnn9 is "
                        "the paper's LightCNN-9, subject_encoder the 0.25-width encoder")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA (default: bf16 autocast)")
    p.add_argument("--cpu-amp", action="store_true",
                   help="CPU: bf16 autocast (train.cpu_amp) where the CPU has bf16 units (AMX/AVX512-BF16); "
                        "amp_bf16 in the output says whether it took effect")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW tensors (default: channels_last)")
    p.add_argument("--no-fused-adam", action="store_true", help="foreach Adam (default: fused)")
    p.add_argument("--memory-fraction", type=float,
                   help="CUDA: cap this process at this share of the card (as a packed run is)")
    p.add_argument("--start-at", type=float, help="after warm-up, wait until this Unix time to start timing "
                                                  "(lines up packed processes; fers bench gpu sets it)")
    p.add_argument("--sync-check", action="store_true",
                   help="CUDA: run one warm step under torch.cuda.set_sync_debug_mode('error'): any host sync "
                        "inside a training step fails it")


def scale(args: argparse.Namespace, device_type: str) -> tuple[dict, str]:
    """The (width, input_size, batch) to run, and how it was chosen."""
    base = PAPER_SCALE if device_type == "cuda" else CPU_SCALE
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    name = "paper scale" if chosen == PAPER_SCALE else "CPU scale" if chosen == CPU_SCALE else "custom scale"
    return chosen, name


def aligned_size(input_size: int) -> int:
    """The aligned face a random ``input_size`` crop is cut from, in the paper's proportion (96 of 110)."""
    return input_size + input_size // 6 + 2


def bench_config(args: argparse.Namespace, sc: dict, device):
    from fers_dist.config import Config

    size = sc["input_size"]
    return Config().with_overrides({
        "model.width": sc["width"], "model.input_size": size, "data.aligned_size": aligned_size(size),
        "train.batch_size": sc["batch"], "train.compile": args.compile, "train.amp": not args.no_amp,
        "train.cpu_amp": args.cpu_amp,
        "train.channels_last": not args.no_channels_last, "identity.backbone": args.identity,
        "train.fused_adam": not args.no_fused_adam,
        "identity.encoder_width": 0.25, "train.device": str(device), "train.log_every": 10**9,
        "loss.lam_idt_start": 0.5 if args.identity != "none" else 0.1})


def check_fits(estimate, device) -> None:
    """Refuse, in one line, a run whose estimated memory exceeds what the device has free."""
    import torch

    from fers_dist.train.memory import available_memory_gb

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / 1e9
        where = f"{torch.cuda.get_device_name(device)} has {free:.1f} GB free"
    else:
        free = available_memory_gb()
        where = f"this machine has {free:.1f} GB available"
    if estimate.total_gb > 0.9 * free:
        raise FersError(f"this run needs an estimated {estimate.line()} but {where}; lower --batch, --width "
                        f"or --input-size")


def sync_check(trainer, idx, lam, sums, device) -> str:
    """One training step with CUDA's sync debug mode at 'error': 'none' if no step op waited on the host."""
    import torch

    if device.type != "cuda":
        return "not applicable on CPU (tests/test_speed.py checks the step with a spy)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(idx, lam, sums)
        return "none"
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        if trainer.D is not None:  # a sync raised mid-step must not leave D frozen for the timed steps
            trainer.D.requires_grad_(True)


def bench(args: argparse.Namespace) -> dict:
    import sys

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fers_dist.train.fold import resolve_device
    from fers_dist.train.memory import estimate_memory, identity_for_probe, random_faces
    from fers_dist.train.speed import set_alloc_conf
    from fers_dist.train.trainer import Trainer

    device = resolve_device(args.device)
    sc, scale_name = scale(args, device.type)
    cfg = bench_config(args, sc, device)
    set_alloc_conf(cfg)
    E, n = 7, sc["batch"] * 4
    estimate = estimate_memory(cfg, n, E, device.type)
    print(f"fers bench train: {scale_name} (width {sc['width']}, {sc['input_size']}x{sc['input_size']}, batch "
          f"{sc['batch']}) on {device}; memory estimate {estimate.line()}", file=sys.stderr)
    check_fits(estimate, device)
    if device.type == "cuda":
        torch.cuda.init()
        if args.memory_fraction:
            from fers_dist.train.speed import cap_process_memory

            cap_process_memory(device, args.memory_fraction)
        context = torch.cuda.mem_get_info(device)
    faces = random_faces(n, cfg.data.aligned_size, cfg.model.in_channels, E).to(device)
    identity = identity_for_probe(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    trainer = Trainer(cfg, faces, g, identity=identity.to(device) if identity else None, log=lambda m: None)
    lam, sums = trainer.lambdas(0), {}
    batches = [torch.arange(i * sc["batch"], (i + 1) * sc["batch"], device=device) for i in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        trainer.step(batches[0], lam, sums)
    flops_per_image = counter.get_total_flops() / sc["batch"]
    for i in range(args.warmup):
        trainer.step(batches[i % 4], lam, sums)
    sync()
    syncs = sync_check(trainer, batches[0], lam, sums, device) if args.sync_check else None
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    t0, start = time.perf_counter(), time.time()
    for i in range(args.steps):
        trainer.step(batches[i % 4], lam, sums)
    sync()
    seconds = time.perf_counter() - t0
    ips = args.steps * sc["batch"] / seconds
    out = {"bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "scale": scale_name, **sc, "amp_bf16": trainer.amp, "compile": args.compile,
           "channels_last": not args.no_channels_last, "fused_adam": not args.no_fused_adam, "identity": args.identity,
           "images_per_s": round(ips, 2), "step_ms": round(1000 * seconds / args.steps, 2),
           "tflop_per_image_counted": round(flops_per_image / 1e12, 4),
           "achieved_tflops": round(ips * flops_per_image / 1e12, 3), "memory_estimate_gb": round(estimate.total_gb, 2),
           "timed_from": start, "timed_to": start + seconds}
    if syncs is not None:
        out["host_sync_check"] = syncs
    if device.type == "cuda":
        free0, total = context
        reserved = torch.cuda.max_memory_reserved(device) / 1e9
        context_gb = (total - free0) / 1e9  # what the process held before the first tensor: CUDA context
        out.update(peak_allocated_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
                   peak_reserved_gb=round(reserved, 2), context_gb=round(context_gb, 2),
                   peak_process_gb=round(reserved + context_gb, 2))
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in out["device"]), None)
        if peak and "PCIe" in out["device"] and "H100" in out["device"]:
            peak = 756.0  # H100 PCIe: lower clocks than SXM
        out["mfu"] = round(out["achieved_tflops"] / peak, 4) if peak else None
    else:
        import resource

        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    out["projected_ckplus_fold_min"] = round(500 * CKPLUS_TRAIN_IMAGES / ips / 60, 2)
    out["torch"] = torch.__version__
    return out
