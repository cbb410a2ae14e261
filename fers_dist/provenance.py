"""Where a result came from: the code (fers-dist version, git commit and whether the checkout had
uncommitted changes), the libraries (torch, ray, optuna, CUDA, cuDNN), the hardware (GPU name, or the CPU
model) and the host. Every folds.parquet row and every tuning trial records it; the report prints it and
flags a comparison whose rows were made with different versions. Ray-free: library versions are read from
the installed metadata, not by importing them."""

from __future__ import annotations

import platform
import socket
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

# the columns a row gets, in order; the report compares rows on the VERSION_COLUMNS
COLUMNS = ("fers_version", "git_commit", "git_dirty", "torch_version", "ray_version", "optuna_version",
           "cuda_version", "cudnn_version", "device_name", "hostname")
VERSION_COLUMNS = ("fers_version", "git_commit", "git_dirty", "torch_version", "ray_version", "optuna_version",
                   "cuda_version", "cudnn_version")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


@cache
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout this package runs from; ("", None) when it is not one."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "", None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "", None
    return commit, bool(status.strip())


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu") -> dict:
    """The provenance columns for a run on ``device`` (``cpu`` or ``cuda:N``)."""
    import torch

    commit, dirty = git_state()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    from fers_dist import __version__

    return {
        "fers_version": _version("fers-dist") or __version__, "git_commit": commit, "git_dirty": dirty,
        "torch_version": torch.__version__, "ray_version": _version("ray"), "optuna_version": _version("optuna"),
        "cuda_version": torch.version.cuda or "" if cuda else "",
        "cudnn_version": str(torch.backends.cudnn.version() or "") if cuda else "",
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else cpu_model(),
        "hostname": socket.gethostname(),
    }
