"""Report figures (PNG through matplotlib's Agg canvas, no pyplot state): per-fold accuracy, confusion
heatmaps, the synthesis grid (paper Fig. 4) and ConvFLU gate maps (paper Fig. 3).

Every figure has a fixed pixel size (``SIZES``, or :func:`grid_size` for the synthesis grid), so reports
stay comparable and tests can check what was drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fers_dist.plotting import figure as _figure
from fers_dist.plotting import png_size  # noqa: F401  (tests and callers read sizes through this module)
from fers_dist.plotting import save_png as _save

SIZES = {"fold_accuracy": (800, 450), "confusion": (640, 560), "gate_maps": (960, 820)}
GRID_CELL, GRID_TITLE, GRID_LABEL = 110, 60, 30  # pixels: one face, the title band, the row label band
GATE_ROWS = (("fer_r", "FER←FES leaky gate r (eq. 1)"), ("fer_z", "FER←FES memory gate z (eq. 3)"),
             ("fes_r", "FES←FER leaky gate r (eq. 1)"), ("fes_z", "FES←FER memory gate z (eq. 3)"))


def fold_accuracy(title: str, per_label: dict[str, dict[int, float]], expected: dict[str, int],
                  path: str | Path) -> Path:
    """Box plot plus every fold as a labelled point, one column per variant; "k/n folds" under each."""
    fig = _figure(SIZES["fold_accuracy"])
    ax = fig.add_subplot()
    labels = list(per_label)
    values = [[100 * a for _, a in sorted(per_label[lab].items())] for lab in labels]
    ax.boxplot([v if v else [np.nan] for v in values], positions=range(len(labels)), widths=0.5,
               showfliers=False, medianprops={"color": "tab:orange"})
    for i, (lab, v) in enumerate(zip(labels, values)):
        folds = sorted(per_label[lab])
        x = i + np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.full(len(v), float(i))
        ax.scatter(x, v, s=22, color="tab:blue", zorder=3)
        for xi, yi, f in zip(x, v, folds):
            ax.annotate(str(f), (xi, yi), xytext=(3, 2), textcoords="offset points", fontsize=7, color="0.35")
        if v:
            ax.scatter([i], [np.mean(v)], marker="D", color="tab:red", zorder=4, s=26)
    ax.set_xticks(range(len(labels)),
                  [f"{lab}\n{len(per_label[lab])}/{expected[lab]} folds" for lab in labels], fontsize=8)
    ax.set_xlabel("variant")
    ax.set_ylabel("test-fold accuracy (%)")
    ax.set_title(title + "  (points: folds, ◆ mean)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confusion_heatmap(matrix: np.ndarray, class_names: list[str], title: str, path: str | Path) -> Path:
    """Row-normalised confusion heatmap (rows = true class), each cell annotated with its count."""
    m = np.asarray(matrix, dtype=float)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = _figure(SIZES["confusion"])
    ax = fig.add_subplot()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}\n{100 * norm[i, j]:.0f}%", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted expression")
    ax.set_ylabel("true expression")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of the true class (row-normalised)")
    fig.tight_layout()
    return _save(fig, path)


def grid_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """Pixel size of a synthesis grid with ``n_rows`` sources and ``n_cols`` image columns."""
    return GRID_CELL * n_cols, GRID_CELL * n_rows + GRID_TITLE + GRID_LABEL


def synthesis_grid(sources: np.ndarray, synth: np.ndarray, source_labels: list[str], class_names: list[str],
                   title: str, path: str | Path) -> Path:
    """Paper Fig. 4: source faces in rows; the source, then G(z^t, I) for every target expression t.

    ``sources``: uint8 [R, C, H, W]; ``synth``: uint8 [R, E, C, H, W]; C is 1 (gray) or 3 (RGB).
    """
    n_rows, n_targets = synth.shape[:2]
    w, h = grid_size(n_rows, n_targets + 1)
    fig = _figure((w, h))
    top = 1 - GRID_TITLE / h
    bottom = GRID_LABEL / h
    axes = fig.subplots(n_rows, n_targets + 1, squeeze=False,
                        gridspec_kw={"left": 0, "right": 1, "top": top, "bottom": bottom, "wspace": 0.04,
                                     "hspace": 0.04})
    fig.suptitle(title, fontsize=10, y=1 - 8 / h, va="top")
    for r in range(n_rows):
        for c in range(n_targets + 1):
            ax = axes[r, c]
            face = sources[r] if c == 0 else synth[r, c - 1]
            if face.shape[0] == 3:  # colour: channels last, as imshow reads RGB
                ax.imshow(face.transpose(1, 2, 0))
            else:
                ax.imshow(face[0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.text(0.03, 0.97, source_labels[r], transform=ax.transAxes, fontsize=7, va="top",
                        color="yellow", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
            if r == 0:
                ax.set_title("source" if c == 0 else f"→ {class_names[c - 1]}", fontsize=8, pad=2)
    fig.text(0.5, 4 / h, "columns: target expression; rows: test faces (source, with its true label)",
             ha="center", va="bottom", fontsize=8)
    return _save(fig, path)


def gate_maps(maps: dict[str, np.ndarray], title: str, path: str | Path) -> Path:
    """Paper Fig. 3: mean leaky (r) and memory (z) gates over the face at each ConvFLU position, for both
    directions. ``maps`` keys are ``fer_r1`` .. ``fes_z4`` (2-D arrays)."""
    positions = sorted({int(k[5:]) for k in maps})
    fig = _figure(SIZES["gate_maps"])
    axes = fig.subplots(len(GATE_ROWS), len(positions), squeeze=False)
    values = np.concatenate([np.ravel(v) for v in maps.values()])
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    im = None
    for r, (key, name) in enumerate(GATE_ROWS):
        for c, p in enumerate(positions):
            ax = axes[r, c]
            m = maps.get(f"{key}{p}")
            if m is not None:
                im = ax.imshow(np.asarray(m), vmin=lo, vmax=hi, cmap="viridis")
                ax.set_xlabel(f"mean {np.mean(m):.3f}", fontsize=7, labelpad=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"ConvFLU {p} (after block {p})", fontsize=8)
            if c == 0:
                ax.set_ylabel(name.replace(" gate", "\ngate"), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.86, top=0.9, bottom=0.04, hspace=0.35, wspace=0.1)
    if im is not None:
        cax = fig.add_axes([0.89, 0.1, 0.02, 0.75])
        fig.colorbar(im, cax=cax, label="gate value (mean over test faces and channels)")
    return _save(fig, path)
