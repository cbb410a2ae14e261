"""Fold checkpoints: model, optimiser and scheduler states, RNG states and the epoch, written atomically
and read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch

from fers_dist.errors import FersError
from fers_dist.io import atomic_torch_save


def save_checkpoint(path: str | Path, *, epoch: int, modules: dict, generator: torch.Generator,
                    history: list, extra: dict | None = None) -> None:
    state = {
        "epoch": epoch,
        "modules": {k: m.state_dict() for k, m in modules.items() if m is not None},
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state().cpu()},
        "history": history,
        "extra": extra or {},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
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
    generator.set_state(state["rng"]["generator"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


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
