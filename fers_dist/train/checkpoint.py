"""Fold checkpoints: model, optimiser and scheduler states, RNG states and the epoch, written atomically
and read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch

from fers_dist.errors import FersError
from fers_dist.io import atomic_torch_save


def save_checkpoint(path: str | Path, *, epoch: int, modules: dict, generator: torch.Generator,
                    history: list, extra: dict | None = None) -> None:
    """``extra`` carries ``config_hash`` (checked on resume) and early-stopping state. Of the CUDA RNGs only
    the training device's is kept: a run may resume on a node that sees fewer GPUs."""
    state = {
        "epoch": epoch,
        "modules": {k: m.state_dict() for k, m in modules.items() if m is not None},
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state().cpu()},
        "history": history,
        "extra": extra or {},
    }
    if generator.device.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(generator.device)
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, *, modules: dict, generator: torch.Generator) -> dict:
    """Restore states in place; returns the checkpoint (epoch, history, extra)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any failure here is reported as the one-line error below)
        raise FersError(f"{path}: unreadable fold checkpoint ({type(e).__name__}: {e})") from None
    for key, module in modules.items():
        if module is None:
            continue
        if key not in state["modules"]:
            raise FersError(f"{path}: checkpoint has no {key!r} state (has {sorted(state['modules'])})")
        module.load_state_dict(state["modules"][key])
    torch.set_rng_state(state["rng"]["torch"])
    try:
        generator.set_state(state["rng"]["generator"])
    except RuntimeError:  # a CPU generator's state does not fit a CUDA one, nor the reverse
        raise FersError(f"{path}: made on another kind of device than this run's {generator.device.type}; resume "
                        f"it where it was made (train.device), or start the run afresh") from None
    cuda_rng = state["rng"].get("cuda")
    if isinstance(cuda_rng, torch.Tensor) and generator.device.type == "cuda":  # the device it trains on now
        torch.cuda.set_rng_state(cuda_rng, generator.device)
    return state


def checkpoint_stamp(path: str | Path) -> dict:
    """The ``extra`` dict of a fold checkpoint (``config_hash`` among it), without restoring anything."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("extra", {})
    except Exception as e:  # noqa: BLE001  (any failure here is reported as the one-line error below)
        raise FersError(f"{path}: unreadable fold checkpoint ({type(e).__name__}: {e})") from None


def check_stamp(path: str | Path, config_hash: str | None) -> None:
    """Refuse a checkpoint made under another config (one without a hash predates the stamp)."""
    made = checkpoint_stamp(path).get("config_hash")
    if config_hash and made and made != config_hash:
        raise FersError(f"{path}: checkpoint was made under config {made}, this run's config is {config_hash}; "
                        f"a result is never reported from another config's model")


def load_weights(path: str | Path, key: str = "model") -> dict:
    """Just one module's weights from a fold checkpoint (e.g. the generator for fes-eval)."""
    path = Path(path)
    if not path.exists():
        raise FersError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["modules"][key]
    except Exception as e:  # noqa: BLE001  (any failure here is reported as the one-line error below)
        raise FersError(f"{path}: not a fers fold checkpoint with {key!r} weights ({type(e).__name__})") from None
