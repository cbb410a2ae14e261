"""An experiment folder's ``folds.parquet`` as tidy rows, and their per-(dataset, variant) summaries.

Every summary counts the folds it EXPECTS (``data.n_folds`` of the row config) and lists the ones that
are missing or failed, so nothing is silently averaged away. Rows of one variant with different config
hashes (or tags) get different labels ("original [a1b2c3]", "original (tuned)") and are never merged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fers_dist.errors import FersError
from fers_dist.report.paper import VARIANT_ORDER
from fers_dist.report.stats import mean_std

FOLDS_FILE = "folds.parquet"
FES_FILE = "fes_eval.parquet"
REQUIRED = ("dataset", "variant", "fold")
DEFAULT_N_FOLDS = 10  # the paper's protocol, when a row carries no config


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def slug(text: str) -> str:
    """A label as a file-name part: "original [a1b2c3]" -> "original_a1b2c3"."""
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
    return "_".join(p for p in keep.split("_") if p)


def _config(text) -> dict:
    try:
        cfg = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _read_parquet(path: Path) -> pd.DataFrame:
    from fers_dist.results import read_folds

    try:
        return read_folds(str(path))
    except FersError:
        raise
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a corrupt or foreign file)
        raise FersError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def fetch_experiment(uri: str) -> Path:
    """A remote experiment's tables (folds.parquet, and fes_eval.parquet when there is one) copied to a
    local folder; its checkpoints stay in the bucket (each row carries its ``checkpoint_uri``)."""
    import tempfile

    from fers_dist.storage import download, exists

    uri = uri.rstrip("/")
    if not exists(f"{uri}/{FOLDS_FILE}"):
        raise FersError(f"{uri}/{FOLDS_FILE}: not found (run fers cv with this cv.storage first)")
    local = Path(tempfile.mkdtemp(prefix="fers-exp-")) / uri.rsplit("/", 1)[-1]
    for name in (FOLDS_FILE, FES_FILE):
        if exists(f"{uri}/{name}"):
            download(f"{uri}/{name}", local / name)
    return local


def load_rows(exp_dir: str | Path) -> pd.DataFrame:
    """All rows of ``<exp_dir>/folds.parquet``, with ``expected_folds`` and a ``label`` per run group."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise FersError(f"{exp}: experiment folder not found")
    path = exp / FOLDS_FILE
    if not path.is_file():
        raise FersError(f"{path}: no {FOLDS_FILE} in this experiment folder (run fers cv or fers train first)")
    frame = _read_parquet(path)
    if frame.empty:
        raise FersError(f"{path}: holds no rows")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise FersError(f"{path}: column {missing[0]!r} is missing (not a fers folds.parquet)")
    defaults = {"status": "finished", "tag": "paper", "config_hash": "", "config": "{}", "accuracy": math.nan,
                "n_test_images": 0, "checkpoint_uri": "", "gate_maps": "{}", "error": "", "seed": 0}
    for col, value in defaults.items():
        if col not in frame.columns:
            frame[col] = value
    frame["status"] = frame["status"].fillna("finished")
    frame["tag"] = frame["tag"].fillna("paper").replace("", "paper")
    frame["config_hash"] = frame["config_hash"].fillna("").astype(str)
    frame["fold"] = frame["fold"].astype(int)
    frame["expected_folds"] = [int(_config(c).get("data", {}).get("n_folds", DEFAULT_N_FOLDS))
                               for c in frame["config"]]
    frame["label"] = labels(frame)
    return frame


def config_group(row_config: str, config_hash: str) -> str:
    """What makes runs one group: the config hash with ``train.seed`` left out (the repeats of
    ``cv.seeds`` are one group), except for nested-CV tuned runs, which carry one tuned config per outer
    fold (studies ``<study>-outer<k>``) and group by their study family."""
    cfg = _config(row_config)
    study = cfg.get("tune") or {}
    if study.get("source_trial") is not None and study.get("study"):
        return "study:" + re.sub(r"-outer\d+$", "", study["study"])
    if (cfg.get("train") or {}).get("seed"):
        from fers_dist.config import ConfigError, parse_config

        try:
            return parse_config({**cfg, "train": {**cfg["train"], "seed": 0}}, source="row").hash()
        except ConfigError:
            return config_hash
    return config_hash


def labels(frame: pd.DataFrame) -> list[str]:
    """``variant``, plus `` (tag)`` for tags other than "paper", plus `` [hash]`` (or `` [study]``) when one
    variant and tag ran under more than one config group."""
    groups = [config_group(c, h) for c, h in zip(frame["config"], frame["config_hash"])]
    keys = pd.DataFrame({"variant": frame["variant"].to_numpy(), "tag": frame["tag"].to_numpy(), "group": groups})
    n_groups = keys.groupby(["variant", "tag"])["group"].nunique()
    out = []
    for v, t, g in zip(frame["variant"], frame["tag"], groups):
        label = v + ("" if t == "paper" else f" ({t})")
        out.append(label + (f" [{g.removeprefix('study:') if g.startswith('study:') else g[:6]}]"
                            if n_groups[(v, t)] > 1 else ""))
    return out


def label_order(frame: pd.DataFrame) -> list[str]:
    """Labels in Table VI order: variant (paper order), then tag ("paper" first), then hash."""
    keys = frame[["label", "variant", "tag", "config_hash"]].drop_duplicates("label")
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    keys = sorted(keys.itertuples(index=False),
                  key=lambda r: (rank.get(r.variant, len(rank)), r.variant, r.tag != "paper", r.tag, r.config_hash))
    return [k.label for k in keys]


@dataclass
class Group:
    """The runs of one (dataset, label): which folds finished, failed or never ran."""

    dataset: str
    label: str
    variant: str
    tag: str
    config_hash: str
    expected: int
    fold_accuracy: dict[int, float]  # finished folds only, fraction in [0, 1]
    failed: list[int]
    n_test_images: int
    rows: pd.DataFrame = field(repr=False)

    @property
    def missing(self) -> list[int]:
        """Expected folds with no finished run (never ran or failed)."""
        return [f for f in range(self.expected) if f not in self.fold_accuracy]

    def test_train_ratio(self, folds) -> float | None:
        """Mean test images over mean training images on ``folds`` (the Nadeau-Bengio correction)."""
        ok = self.finished()
        ok = ok[ok["fold"].isin(list(folds))]
        if "n_train_images" not in ok or not len(ok) or not ok["n_train_images"].fillna(0).gt(0).all():
            return None
        return float(ok["n_test_images"].mean() / ok["n_train_images"].mean())

    @property
    def n_done(self) -> int:
        return len(self.fold_accuracy)

    @property
    def mean_std(self) -> tuple[float, float]:
        """Mean and fold-to-fold std of the per-fold accuracies (each the mean over its seeds)."""
        return mean_std(list(self.fold_accuracy.values()))

    @property
    def n_seeds(self) -> int:
        ok = self.finished()
        return int(ok.groupby("fold")["seed"].nunique().max()) if len(ok) and "seed" in ok else 1

    @property
    def seed_std(self) -> float:
        """Seed-to-seed std within a fold (sample std over a fold's seeds), averaged over the folds with ≥ 2."""
        ok = self.finished()
        if self.n_seeds < 2:
            return math.nan
        per_fold = ok.groupby("fold")["accuracy"].std(ddof=1).dropna()
        return float(per_fold.mean()) if len(per_fold) else math.nan

    def finished(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "finished"].sort_values("fold")

    def confusion(self) -> np.ndarray | None:
        """The confusion matrix summed over the finished folds (rows = true class)."""
        mats = [np.array([np.asarray(r, dtype=np.int64) for r in c]) for c in self.finished().get("confusion", [])
                if c is not None and len(c)]
        return np.sum(mats, axis=0) if mats else None

    def class_names(self) -> list[str]:
        names = self.finished().get("class_names")
        if names is None or not len(names):
            return []
        return [str(n) for n in names.iloc[0]]

    def coverage(self) -> str:
        """"(9/10 folds; missing: 3)" or "(10 folds)"."""
        if not self.missing:
            return f"({plural(self.n_done, 'fold')})"
        text = f"({self.n_done}/{self.expected} folds; missing: {', '.join(map(str, self.missing))}"
        if self.failed:
            text += f"; failed: {', '.join(map(str, self.failed))}"
        return text + ")"

    def cell(self, with_images: bool = True) -> str:
        """"97.10 ± 1.20 (9/10 folds; missing: 3)": accuracy in %, sample std over folds (with several
        seeds: of the per-fold means over seeds, and the seed-to-seed std within a fold beside it)."""
        m, s = self.mean_std
        if math.isnan(m):
            acc = "no finished fold"
        else:
            acc = f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if not math.isnan(s) else " ± n/a")
            if self.n_seeds > 1:  # fold-to-fold std above; the seed-to-seed std within a fold beside it
                acc += f" (seed std {100 * self.seed_std:.2f}, {self.n_seeds} seeds)"
        images = f"; {self.n_test_images} img" if with_images and self.n_test_images else ""
        return f"{acc} {self.coverage()[:-1]}{images})"


def groups(frame: pd.DataFrame) -> dict[tuple[str, str], Group]:
    """One :class:`Group` per (dataset, label)."""
    out = {}
    for (dataset, label), rows in frame.groupby(["dataset", "label"], sort=False):
        ok = rows[rows["status"] == "finished"]
        failed = sorted(set(rows.loc[rows["status"] != "finished", "fold"]) - set(ok["fold"]))
        first = rows.iloc[0]
        out[(dataset, label)] = Group(
            dataset=dataset, label=label, variant=first["variant"], tag=first["tag"],
            config_hash=first["config_hash"], expected=int(rows["expected_folds"].max()),
            fold_accuracy={int(f): float(a) for f, a in ok.groupby("fold")["accuracy"].mean().items()},
            failed=[int(f) for f in failed], n_test_images=int(ok["n_test_images"].fillna(0).sum()), rows=rows)
    return out


def datasets(frame: pd.DataFrame) -> list[str]:
    order = ["ckplus", "oulu", "mmi", "bu4dfe"]
    found = list(dict.fromkeys(frame["dataset"]))
    return sorted(found, key=lambda d: (order.index(d) if d in order else len(order), d))


def load_fes(exp_dir: str | Path) -> pd.DataFrame | None:
    """``<exp_dir>/fes_eval.parquet`` written by ``fers fes-eval``, or None when there is none."""
    path = Path(exp_dir) / FES_FILE
    if not path.is_file():
        return None
    frame = _read_parquet(path)
    return frame if len(frame) else None
