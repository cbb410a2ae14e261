"""The speed settings of a training run, each behind a ``train.*`` key (numerics tests: tests/test_speed.py).

- ``train.cudnn_benchmark``: cuDNN autotunes its conv algorithms once per shape (shapes never change).
- ``train.tf32``: float32 matmuls/convs outside bf16 autocast use TF32 tensor cores.
- ``train.fused_adam``: one fused Adam kernel per step instead of a loop over parameters.
- ``train.expandable_segments``: the CUDA caching allocator grows segments instead of fragmenting.
- ``train.channels_last`` (NHWC), ``train.amp`` (bf16 autocast on CUDA) and ``train.cpu_amp`` (bf16 autocast on
  a CPU with bf16 units) are applied by the trainer, the evaluation and the synthesis code; ``train.compile``
  by the trainer.

Everything here is Ray-free; the Ray layer adds the per-process memory cap of packed runs.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from fers_dist.config import Config

ALLOC_CONF = "expandable_segments:True"


def configure_backends(cfg: Config, device: torch.device) -> None:
    """Process-wide CUDA backend flags for this run (no effect on CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32


def set_alloc_conf(cfg: Config) -> None:
    """``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` for this process unless the user set one. The
    allocator reads the variable once, when CUDA starts; where CUDA has already started (a Ray Train worker:
    Ray calls ``torch.cuda.set_device`` before the train function), the setting is applied at run time."""
    if cfg.train.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.memory._set_allocator_settings(ALLOC_CONF)


def adam(params, lr: float, cfg: Config) -> torch.optim.Adam:
    """Adam with the config's betas and weight decay: fused (``train.fused_adam``) or foreach."""
    o = cfg.optim
    impl = {"fused": True} if cfg.train.fused_adam else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, **impl)


def to_channels_last(module: torch.nn.Module | None, enabled: bool):
    """NHWC weights for ``module`` (a no-op when disabled or None); returns it."""
    if module is not None and enabled:
        module.to(memory_format=torch.channels_last)
    return module


def nhwc(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16), where oneDNN's bf16 convolutions beat
    float32; elsewhere bf16 is emulated and slower, so ``train.cpu_amp`` leaves such CPUs in float32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # older torch builds lack it: float32
    caps = capabilities() if capabilities else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def use_amp(cfg: Config, device: torch.device) -> bool:
    """Whether a run of ``cfg`` on ``device`` computes under bf16 autocast: ``train.amp`` on CUDA,
    ``train.cpu_amp`` on a CPU with bf16 units (measured in docs/BENCHMARKS.md), float32 otherwise."""
    if device.type == "cuda":
        return cfg.train.amp
    return device.type == "cpu" and cfg.train.cpu_amp and cpu_has_bf16()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (callers pass ``use_amp(cfg, device)``)."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_norms(module: torch.nn.Module) -> list:
    """The BatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@contextlib.contextmanager
def running_stats_frozen(module: torch.nn.Module):
    """BatchNorm still normalises with the batch's statistics (so gradients are unchanged) but the
    running statistics that test-time inference uses come out of the block unchanged.

    Inside the block each BatchNorm updates scratch copies of its buffers; the originals are put back on
    exit, never written to (autograd may have saved them). Swapping buffers, rather than setting
    ``momentum = 0``, keeps torch.compile on one graph: a changed module attribute fails its guards."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = batch_norms(module)
    originals = [{n: m._buffers[n] for n in names} for m in norms]
    for m, bufs in zip(norms, originals):
        for n, b in bufs.items():
            m._buffers[n] = b.clone()
    try:
        yield
    finally:
        for m, bufs in zip(norms, originals):
            m._buffers.update(bufs)


def cap_process_memory(device: str | torch.device, share: float) -> None:
    """A packed run (``share`` < 1 of a GPU) may use at most that share of the card's memory: one run
    that outgrows its share then fails alone with an OOM, instead of starving the runs beside it."""
    device = torch.device(device)
    if device.type == "cuda" and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share, cuda_index(device))


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device ("cuda" alone means the current one): memory APIs refuse an unindexed one."""
    return device.index if device.index is not None else torch.cuda.current_device()
