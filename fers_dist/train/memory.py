"""How much memory one training run needs, estimated before it starts (the planner's check on a GPU share,
``fers bench train``'s guard on CPU). ``fers bench gpu`` prints this estimate beside the measured peak.

The estimate is measured, not guessed from a formula: one training step of the run's config (full
objective: G, cycle pass, D, identity network) at batch 2, counting the bytes autograd saves for backward
(``saved_tensors_hooks``, storages counted once, parameters left out), under bf16 autocast when the run will
use it. The step runs on fake tensors (``FakeTensorMode``: shapes and dtypes, no arithmetic), so it takes
seconds whatever the model: a real bf16 step of the paper's model on a CPU without bf16 units took 299 s
(fp32 21 s) where the fake one takes 2-5 s, and counted the same bytes (fp32 exactly, bf16 to 0.01%). Activations
scale linearly with the batch; the rest is counted from the modules:

    total = weights, gradients and Adam moments (16 B per trainable parameter, G and D)
          + frozen identity network (4 B per parameter)
          + the dataset kept on the device (uint8)
          + saved activations x batch x 1.25 (backward's transient gradients)
          + the process's fixed cost (CUDA context and kernels, cuDNN/cuBLAS workspaces)

The discriminator step's activations are freed by its own backward, before the generator's backward
(the peak), so they are left out.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import asdict, dataclass

import torch

from fers_dist.train.speed import use_amp

PROCESS_GB = {"cuda": 0.8, "cpu": 0.6}  # CUDA context + library kernels; on CPU, torch's own footprint
BACKWARD_HEADROOM = 1.25
PROBE_BATCH = 2


@dataclass
class MemoryEstimate:
    batch: int
    weights_gb: float
    activations_gb: float
    data_gb: float
    process_gb: float
    total_gb: float

    def line(self) -> str:
        return (f"~{self.total_gb:.1f} GB (weights+Adam {self.weights_gb:.2f}, activations at batch {self.batch} "
                f"{self.activations_gb:.1f}, data {self.data_gb:.2f}, process {self.process_gb:.1f})")

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def random_faces(n: int, size: int, channels: int, E: int, n_subjects: int | None = None):
    """``n`` random uint8 faces over ``n_subjects`` subjects (default: 4 faces each), every subject showing
    several expressions: stand-ins with a real dataset's shapes, for benchmarks and estimates."""
    from fers_dist.data.loader import FaceSet

    g = torch.Generator().manual_seed(0)
    subjects = torch.arange(n) * (n_subjects or -(-n // 4)) // n
    return FaceSet(images=torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                   labels=torch.arange(n) % E, subjects=subjects, folds=subjects % 10,
                   class_names=tuple(str(i) for i in range(E)),
                   subject_names=tuple(str(i) for i in range(int(subjects.max()) + 1)))


def identity_for_probe(cfg):
    """The run's identity network with random weights: same shapes, memory and time as the real one."""
    from fers_dist.model.lightcnn import LightCNN9
    from fers_dist.train.identity import IdentityFeatures

    if cfg.identity.backbone == "none":
        return None
    width = 1.0 if cfg.identity.backbone == "lightcnn9" else cfg.identity.encoder_width
    return IdentityFeatures(LightCNN9(num_classes=2, width=width), cfg.train.channels_last)


def _fake_parameters(module: torch.nn.Module, mode) -> None:
    """Replace ``module``'s parameters and buffers by fake tensors of the same shapes (``mode``'s)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = mode.from_tensor(b)


def probe_key(cfg) -> str:
    """The part of a config the probe depends on (the batch is the probe's own), as a cache key."""
    return cfg.with_overrides({"train.batch_size": PROBE_BATCH}).model_dump_json()


@functools.lru_cache(maxsize=32)
def _probe(cfg_json: str, E: int, bf16: bool, fake: bool = True) -> tuple[int, int, int]:
    """(saved activation bytes per image, trainable parameters, frozen parameters) of one step, on fake
    tensors (``fake=False``: a real step, which the tests compare it with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fers_dist.config import parse_config
    from fers_dist.train.trainer import Trainer

    cfg = parse_config(json.loads(cfg_json), source="memory probe").with_overrides(
        {"train.batch_size": PROBE_BATCH, "train.compile": False, "train.device": "cpu",
         "train.cpu_amp": False})  # the probe's own autocast below stands for the target device's
    faces = random_faces(4 * PROBE_BATCH, cfg.data.aligned_size, cfg.model.in_channels, E)
    torch.manual_seed(0)
    t = Trainer(cfg, faces, torch.Generator().manual_seed(0), identity=identity_for_probe(cfg), log=lambda m: None)
    modules = [m for m in (t.model, t.D, t.identity) if m is not None]
    trainable = sum(p.numel() for m in (t.model, t.D) if m is not None for p in m.parameters())
    frozen = sum(p.numel() for p in t.identity.parameters()) if t.identity is not None else 0
    seen: dict[int, int] = {}  # storage -> bytes, live at the generator's backward
    order: list[int] = []  # storages in the order first saved
    d_start: list[int] = []  # where the current discriminator step began in ``order``

    if t.D is not None:
        t.D.register_forward_pre_hook(lambda m, a: d_start.append(len(order)) if not d_start else None)
    real_update = t._update

    def update(opt, loss):  # a D step's backward frees what it saved: drop it from the count
        real_update(opt, loss)
        if opt is t.opt_d and d_start:
            for ptr in order[d_start[0]:]:
                seen.pop(ptr, None)
            del order[d_start[0]:], d_start[:]

    t._update = update
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext() as mode:
        for m in modules if fake else ():  # the faces and the target sampler stay real, and cheap
            _fake_parameters(m, mode)
        params = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}

        def pack(x):
            ptr = x.untyped_storage()._cdata  # the storage itself (fake storages have no data pointer)
            if ptr not in params and ptr not in seen:
                seen[ptr] = x.untyped_storage().nbytes()
                order.append(ptr)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), amp:
            t.step(torch.arange(PROBE_BATCH), t.lambdas(0) | {"idt": 1.0 if t.identity else 0.0}, {})
    return sum(seen.values()) // PROBE_BATCH, trainable, frozen


def estimate_memory(cfg, n_images: int, num_classes: int = 7, device_type: str = "cuda",
                    batch_size: int | None = None, models: int = 1) -> MemoryEstimate:
    """Peak memory of one run of ``cfg`` (at ``batch_size``, default ``train.batch_size``) training on
    ``n_images`` faces, on ``device_type`` (bf16 activations as the run computes them: ``train.amp`` on CUDA,
    ``train.cpu_amp`` on a CPU with bf16 units). ``models``:
    models held at once but stepped one at a time (a tuning trial's inner folds in lockstep)."""
    batch = batch_size or cfg.train.batch_size
    bf16 = use_amp(cfg, torch.device(device_type))
    per_image, trainable, frozen = _probe(probe_key(cfg), num_classes, bf16)
    weights = models * (16 * trainable + 4 * frozen) / 1e9
    activations = per_image * batch * BACKWARD_HEADROOM / 1e9
    data = models * n_images * cfg.model.in_channels * cfg.data.aligned_size ** 2 / 1e9
    process = PROCESS_GB[device_type]
    return MemoryEstimate(batch=batch, weights_gb=weights, activations_gb=activations, data_gb=data,
                          process_gb=process, total_gb=weights + activations + data + process)


def available_memory_gb() -> float:
    """This machine's available memory (``MemAvailable``; falls back to total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
