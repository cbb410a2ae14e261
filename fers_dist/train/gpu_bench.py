"""`fers bench gpu`: every GPU question in one call (≤ 8 minutes on one H100/H200), JSON on the last line.

At the paper scale (width 256, 96x96, batch 64, LightCNN-9 for L_idt), each in its own process so memory
figures are per process, as a run's would be:

1. ``step_bf16``, ``step_fp32``: eager training step, bf16 autocast vs float32; images/s, counted FLOPs,
   MFU, peak reserved memory + CUDA context, the memory estimate beside it, and a host-sync check (one
   step under ``torch.cuda.set_sync_debug_mode('error')``);
2. ``step_bf16_compiled``: the same with ``torch.compile``;
3. ``packed``: N runs in N processes on the card, each capped at 1/N of its memory (as packed CV runs are),
   timed over the same window: total images/s vs one run; ``packed_mps`` again under CUDA MPS when
   ``nvidia-cuda-mps-control`` can be started;
4. ``fold``: a 20-epoch fold of ``fit_fold`` on random faces at CK+ scale (981 images, 118 subjects), and
   its projected 500-epoch time.

Sections that would overrun ``--budget-s`` are skipped and say so; a failing section records its error
and the rest still run. ``--tiny`` runs every section at a toy scale on any device: the test suite
rehearses the whole command on CPU with it, so the one GPU call cannot fail on a typo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {"width": 8, "input_size": 32, "batch": 4, "steps": 2, "warmup": 1, "packed": 2, "fold_epochs": 2,
        "images": 48, "subjects": 12, "warm_up_s": 12}  # a late starter only lowers the packed total
PAPER = {"width": 256, "input_size": 96, "batch": 64, "steps": 20, "warmup": 5, "packed": 4, "fold_epochs": 20,
         "images": 981, "subjects": 118, "warm_up_s": 45}  # CK+: paper Table I
SECTION_S = {"step": 60, "compiled": 240, "packed": 90, "fold": 120}  # budgeted seconds per section (GPU)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--tiny", action="store_true", help="toy scale for a rehearsal on any device (about 1-2 min on a 2-core CPU)")
    p.add_argument("--budget-s", type=float, default=480, help="skip sections that would run past this")
    p.add_argument("--packed", type=int, help="processes sharing the card (default 4; --tiny: 2)")
    p.add_argument("--out", help="also write the JSON here (for fers cv --dry-run --bench FILE)")


def _train_cmd(sc: dict, device: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fers_dist.cli", "bench", "train", "--device", device, "--identity", "lightcnn9",
            "--width", str(sc["width"]), "--input-size", str(sc["input_size"]), "--batch", str(sc["batch"]),
            "--steps", str(sc["steps"]), "--warmup", str(sc["warmup"]), *extra]


def _result(rc: int, stdout: str, stderr: str) -> dict:
    """A ``fers bench train`` process's last stdout line (JSON), or an error record."""
    lines = stdout.strip().splitlines()
    if rc or not lines:
        return {"error": f"exit {rc}: {(stderr.strip().splitlines() or ['no output'])[-1][:300]}"}
    return json.loads(lines[-1])


def _run_train_bench(sc: dict, device: str, extra: list[str], timeout: float = 600) -> dict:
    """``fers bench train`` in a fresh process, so its memory figures are its own."""
    proc = subprocess.run(_train_cmd(sc, device, extra), capture_output=True, text=True, timeout=timeout, check=False)
    return _result(proc.returncode, proc.stdout, proc.stderr)


def _packed(sc: dict, device: str, n: int, env: dict | None = None) -> dict:
    """``n`` train benches in ``n`` processes at once, each capped at 1/n of the card, timed together."""
    extra = ["--start-at", str(time.time() + sc["warm_up_s"])]  # timing starts once every process is warm
    if device != "cpu":
        extra += ["--memory-fraction", f"{1 / n:.4f}"]
    else:  # CPU processes share the cores: oversubscribed OpenMP threads spin against each other (measured:
        # the tiny rehearsal's packed section took 47-100 s with 2 x 2 threads on 2 cores)
        env = dict(env or os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    cmd = _train_cmd(dict(sc, steps=sc["steps"] * 3), device, extra)  # a longer window: the overlap dominates
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:  # a hung process must not keep holding the card through the next sections
        for p in procs:
            if p.poll() is None:
                p.kill()
    runs = [_result(p.returncode, *o) for p, o in zip(procs, outputs)]
    bad = [r["error"] for r in runs if "error" in r]
    if bad:
        return {"processes": n, "error": bad[0]}
    late = max(r["timed_from"] for r in runs) - min(r["timed_from"] for r in runs)
    window = max(r["timed_to"] for r in runs) - min(r["timed_from"] for r in runs)
    images = sum(r["images_per_s"] * (r["timed_to"] - r["timed_from"]) for r in runs)
    return {"processes": n, "total_images_per_s": round(images / window, 2),
            "per_process_images_per_s": [r["images_per_s"] for r in runs],
            "peak_process_gb": [r.get("peak_process_gb") for r in runs], "window_s": round(window, 2),
            "start_spread_s": round(late, 2)}  # > a few s: a process missed --start-at; the total is then low


def _mps(tmp: str) -> dict | None:
    """Environment for processes under a CUDA MPS daemon started here, or None if it cannot start."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not control:
        return None
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=f"{tmp}/pipe", CUDA_MPS_LOG_DIRECTORY=f"{tmp}/log")
    os.makedirs(f"{tmp}/pipe"), os.makedirs(f"{tmp}/log")
    if subprocess.run([control, "-d"], env=env, capture_output=True, timeout=30, check=False).returncode:
        return None
    return env


def _stop_mps(env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, capture_output=True, timeout=30,
                   check=False)


def _fold(sc: dict, device: str) -> dict:
    """``fit_fold`` for ``fold_epochs`` epochs on random faces at CK+ scale, with a LightCNN-9 checkpoint."""
    import torch

    from fers_dist.config import Config
    from fers_dist.model.lightcnn import LightCNN9
    from fers_dist.train.bench import aligned_size
    from fers_dist.train.fold import fit_fold
    from fers_dist.train.memory import random_faces

    n, aligned = sc["images"], aligned_size(sc["input_size"])
    faces = random_faces(n, aligned, 1, 7, n_subjects=sc["subjects"])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "lightcnn9.pth"
        torch.save(LightCNN9(num_classes=10).state_dict(), ckpt)  # random weights, the official shapes
        cfg = Config().with_overrides({
            "model.width": sc["width"], "model.input_size": sc["input_size"],
            "data.aligned_size": aligned, "train.batch_size": sc["batch"],
            "train.epochs": sc["fold_epochs"], "identity.backbone": "lightcnn9", "identity.checkpoint": str(ckpt),
            "train.log_every": 10**9})
        result = fit_fold(cfg, faces, 0, device=device, log=lambda m: None)
    epoch_s = [h["epoch_s"] for h in result.history][1:] or [result.history[0]["epoch_s"]]  # first: warm-up
    per_epoch = sum(epoch_s) / len(epoch_s)
    return {"images": n, "train_images": result.n_train_images, "epochs": result.epochs_run,
            "wall_s": round(result.wall_s, 2), "epoch_s": round(per_epoch, 3),
            "projected_500_epoch_min": round((500 * per_epoch + result.wall_s - sum(h["epoch_s"] for h in
                                                                                   result.history)) / 60, 2),
            "device": result.device}


def bench(args: argparse.Namespace) -> dict:
    from fers_dist.train.fold import resolve_device

    device = str(resolve_device(args.device))
    sc = dict(TINY if args.tiny else PAPER)
    sc["packed"] = args.packed or sc["packed"]
    t0, out = time.perf_counter(), {"bench": "gpu", "scale": "tiny" if args.tiny else "paper", "device": device,
                                    "sections": {}}
    scale_s = 0.25 if device == "cpu" and args.tiny else 1.0

    def section(name: str, kind: str, fn):
        left = args.budget_s - (time.perf_counter() - t0)
        if SECTION_S[kind] * scale_s > left:
            out["sections"][name] = {"skipped": f"needs ~{SECTION_S[kind] * scale_s:.0f} s, {left:.0f} s of "
                                                f"--budget-s left"}
            return
        s0 = time.perf_counter()
        print(f"fers bench gpu: {name} ...", file=sys.stderr, flush=True)
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (one failing section must not lose the others' figures)
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        result["section_s"] = round(time.perf_counter() - s0, 1)
        out["sections"][name] = result

    section("step_bf16", "step", lambda: _run_train_bench(sc, device, ["--sync-check"]))
    section("step_fp32", "step", lambda: _run_train_bench(sc, device, ["--no-amp"]))
    section("step_bf16_compiled", "compiled", lambda: _run_train_bench(sc, device, ["--compile"]))
    section("packed", "packed", lambda: _packed(sc, device, sc["packed"]))
    with tempfile.TemporaryDirectory() as tmp:
        env = _mps(tmp) if device.startswith("cuda") else None
        if env is None:
            out["sections"]["packed_mps"] = {"skipped": "no CUDA MPS on this machine" if device.startswith("cuda")
                                             else "CUDA only"}
        else:
            try:
                section("packed_mps", "packed", lambda: _packed(sc, device, sc["packed"], env))
            finally:
                _stop_mps(env)
    section("fold", "fold", lambda: _fold(sc, device))
    out["summary"] = summary(out["sections"])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        from fers_dist.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(out, indent=1))
    return out


def summary(sections: dict) -> dict:
    """The headline figures, and the issue's targets for one H100/H200 at the paper scale."""
    s = {}
    for name in ("step_bf16", "step_fp32", "step_bf16_compiled"):
        r = sections.get(name, {})
        if "images_per_s" in r:
            s[f"{name}_images_per_s"] = r["images_per_s"]
            s[f"{name}_mfu"] = r.get("mfu")
    bf16 = sections.get("step_bf16", {})
    s["peak_process_gb"] = bf16.get("peak_process_gb")
    s["memory_estimate_gb"] = bf16.get("memory_estimate_gb")
    s["host_sync_check"] = bf16.get("host_sync_check")
    for name in ("packed", "packed_mps"):
        if "total_images_per_s" in sections.get(name, {}):
            s[f"{name}_total_images_per_s"] = sections[name]["total_images_per_s"]
    s["projected_ckplus_fold_min"] = sections.get("fold", {}).get("projected_500_epoch_min")
    best = max([v for k, v in s.items() if k.endswith("images_per_s") and v] or [0])
    mfus = [v for k, v in s.items() if k.endswith("_mfu") and v]
    s["targets"] = {"images_per_s>=1000": best >= 1000, "mfu>=0.35": bool(mfus) and max(mfus) >= 0.35,
                    "reserved<=18GB": bool(s["peak_process_gb"]) and s["peak_process_gb"] <= 18,
                    "fold<=10min": bool(s["projected_ckplus_fold_min"]) and s["projected_ckplus_fold_min"] <= 10}
    return s
