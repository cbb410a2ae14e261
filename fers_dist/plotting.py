"""Figure plumbing shared by every layer: a fixed-pixel matplotlib figure on the Agg canvas (no pyplot
state), saved as PNG atomically, and a PNG's size read back. What is drawn lives with its layer
(``report/figures.py``, ``data/bench.py``); this module only knows pixels and files."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from fers_dist.io import atomic_write_bytes

DPI = 100


def figure(size: tuple[int, int]):
    """A matplotlib Figure of exactly ``size`` = (width, height) pixels."""
    from matplotlib.figure import Figure

    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)


def save_png(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, written to a temporary file and renamed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    return struct.unpack(">II", head[16:24])
