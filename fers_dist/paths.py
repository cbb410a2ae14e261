"""Config paths made absolute on the driver (``resolve_paths``), before any Ray worker or trial starts."""

from __future__ import annotations

import os
from pathlib import Path

from fers_dist.config import Config, ConfigError


def resolve_paths(cfg: Config, base: str | os.PathLike | None = None) -> Config:
    """Every path field made absolute against ``base`` (the driver's working directory) and checked,
    before any Ray worker or trial starts: those ``chdir`` into their own run folders, where a relative
    path points nowhere. URIs are kept as they are. A missing ``identity.checkpoint`` is a one-line error
    naming the field; ``data.root`` is checked per dataset by the commands (with the ``fers prepare`` line
    to run), and ``cv.storage`` is created."""
    from fers_dist.storage import is_uri

    base = Path(base or os.getcwd())
    fields = {"data.root": cfg.data.root, "cv.storage": cfg.cv.storage}
    if cfg.identity.backbone == "lightcnn9" and cfg.identity.checkpoint:
        fields["identity.checkpoint"] = cfg.identity.checkpoint
    out = {}
    uri = cfg.cv.tracking.mlflow
    if uri:  # a local MLflow store (sqlite file, file: folder, plain path): one for every run, not one per folder
        scheme = next((s for s in ("sqlite:///", "file://") if uri.startswith(s)), "" if "://" not in uri else None)
        rest = uri[len(scheme):] if scheme is not None else "/"
        if not rest.startswith("/"):
            out["cv.tracking.mlflow"] = scheme + str((base / rest).resolve())
    for key, value in fields.items():
        if is_uri(value):
            continue
        path = (base / Path(value.removeprefix("file://")).expanduser()).resolve()
        if key == "identity.checkpoint" and not path.is_file():
            raise ConfigError(f"{key}: {value!r} not found (resolved on the driver to {path})")
        if str(path) != value:
            out[key] = str(path)
    return cfg.with_overrides(out) if out else cfg
