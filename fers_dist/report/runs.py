"""From a folds.parquet row to what it produced: its config, its checkpoint, the generator it trained,
its dataset's faces, and every target expression synthesised for a set of faces (Ray-free)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fers_dist.config import Config, num_classes, parse_config
from fers_dist.errors import FersError
from fers_dist.storage import download, exists, is_uri


def row_name(row) -> str:
    return f"{row['dataset']}/{row['variant']}/fold {row['fold']}"


def row_config(row) -> Config:
    """The run's full config (``config`` column), validated."""
    text = row.get("config")
    try:
        data = json.loads(text if isinstance(text, str) and text else "{}")
    except ValueError as e:
        raise FersError(f"folds.parquet row {row_name(row)}: config is not valid JSON ({e})") from None
    return parse_config(data, source=f"folds.parquet row {row_name(row)}: config")


def generator_checkpoint(row, exp_dir: str | Path) -> Path:
    """``main.pt`` of the run's checkpoint directory (``fes_da.pt``, the fine-tuned model, for fes_da)."""
    uri = str(row.get("checkpoint_uri") or "")
    if not uri:
        raise FersError(f"folds.parquet row {row_name(row)}: checkpoint_uri is empty (the run kept no checkpoint)")
    name = "fes_da.pt" if row["variant"] == "fes_da" else "main.pt"
    uri = uri.removeprefix("file://")
    if is_uri(uri):  # s3://, gs://: copied to a local temporary file
        if not exists(f"{uri.rstrip('/')}/{name}"):
            raise FersError(f"{uri.rstrip('/')}/{name}: checkpoint not found (folds.parquet row {row_name(row)})")
        return download(f"{uri.rstrip('/')}/{name}")
    folder = Path(uri)
    if not folder.is_absolute() and not folder.exists():
        folder = Path(exp_dir) / folder
    path = folder / name
    if not path.is_file():
        raise FersError(f"{path}: checkpoint not found (folds.parquet row {row_name(row)})")
    return path


def load_generator(row, exp_dir: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The FERSNet generator of an ``original`` or ``fes_da`` row, in eval mode."""
    from fers_dist.model import build_model
    from fers_dist.train.checkpoint import load_weights

    if row["variant"] not in ("original", "fes_da"):
        raise FersError(f"folds.parquet row {row_name(row)}: variant {row['variant']!r} has no synthesis branch")
    cfg = row_config(row)
    path = generator_checkpoint(row, exp_dir)
    names = row.get("class_names")
    E = len(names) if names is not None and len(names) else num_classes(row["dataset"])
    model = build_model(cfg.model.model_copy(update={"variant": "original"}), E)
    try:
        model.load_state_dict(load_weights(path, "model"))
    except RuntimeError as e:
        raise FersError(f"{path}: weights do not fit the row's model config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def load_row_faces(row, data_root: str | Path | None = None):
    """The prepared dataset a row was trained on (``data.root`` of its config, or ``data_root``)."""
    from fers_dist.data.loader import load_faces

    root = data_root or row_config(row).data.root
    return load_faces(root, row["dataset"])
