"""What ``fers tune`` leaves in ``--out``: ``best.yaml`` (a full config for ``fers cv``), ``trials.parquet``
(one row per Optuna trial with its λ values, state and stop reason) and Optuna's matplotlib plots as PNG:
optimisation history, parameter importances, contour of the λ pairs, Pareto front (multi-objective).

Ray-free. ``out`` is a local folder or a pyarrow URI (s3://, gs://); every file is written whole
(temporary file and rename, or one object PUT).
"""

from __future__ import annotations

import io
import uuid
import warnings
from pathlib import Path

import yaml

from fers_dist.config import Config
from fers_dist.io import atomic_write_bytes


def write_bytes(out: str, name: str, blob: bytes) -> str:
    if "://" not in out:
        path = Path(out) / name
        atomic_write_bytes(path, blob)
        return str(path)
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(out)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(blob)
    fs.move(tmp, f"{base}/{name}")
    return f"{out.rstrip('/')}/{name}"


def trials_frame(study, metrics: list[str]):
    """One row per trial: number, state, one column per objective, the dotted params, user attrs."""
    import pandas as pd

    pareto = {t.number for t in study.best_trials} if len(metrics) > 1 else set()
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name}
        for i, m in enumerate(metrics):
            row[m] = t.values[i] if t.values else None
        row.update(t.params)
        attrs = dict(t.user_attrs)
        row["stop_reason"] = attrs.pop("stop_reason", None)
        row["baseline"] = bool(attrs.pop("baseline", False))
        for k, v in attrs.items():
            row[k] = str(v) if isinstance(v, (list, dict)) else v
        row["pareto"] = t.number in pareto
        row["started"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        rows.append(row)
    return pd.DataFrame(rows)


def best_trial(study, metrics: list[str]):
    """Single objective: the best COMPLETE trial. Multi-objective: the most accurate Pareto trial."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if len(metrics) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


def best_config(cfg: Config, trial) -> Config:
    """The tuned config, ready for ``fers cv``: the base config + the trial's params, one dataset/variant, and
    ONLY the study's own outer fold (every other fold's subjects trained or validated its trials), with the
    study and trial it came from."""
    return cfg.with_overrides({**trial.params, "cv.datasets": [cfg.tune.dataset], "cv.folds": [cfg.tune.outer_fold],
                               "cv.variants": [cfg.tune.variant], "model.variant": cfg.tune.variant,
                               "tune.source_trial": trial.number})


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _figure(ax):
    import numpy as np

    return np.ravel(ax)[0].figure if hasattr(ax, "__len__") else ax.figure


def lambda_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """λ pairs worth a contour: every pair of λ1..λ3 (GAN, rec, cyc) and λ4's start/end."""
    main = [k for k in ("loss.lam_adv", "loss.lam_rec", "loss.lam_cyc") if k in keys]
    pairs = [(a, b) for i, a in enumerate(main) for b in main[i + 1:]]
    if "loss.lam_idt_start" in keys and "loss.lam_idt_end" in keys:
        pairs.append(("loss.lam_idt_start", "loss.lam_idt_end"))
    return pairs


def plots(study, metrics: list[str], keys: list[str], log=print) -> dict[str, bytes]:
    """PNG bytes by file name; a plot Optuna cannot draw yet (too few trials) is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    multi = len(metrics) > 1
    target = (lambda t: t.values[0]) if multi else None
    name = metrics[0]
    lam = [k for k in keys if k.startswith("loss.lam_")]

    def importances(**kw):
        try:  # fANOVA needs scikit-learn and some spread in the values; PED-ANOVA is Optuna's own
            return ovm.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(), **kw)
        except (ImportError, RuntimeError):  # RuntimeError: "zero total variance" (every trial scored alike)
            return ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), **kw)

    todo = {
        "history.png": lambda: ovm.plot_optimization_history(study, target=target, target_name=name),
        "importances.png": lambda: importances(target=target, target_name=name),
    }
    for a, b in lambda_pairs(lam):
        todo[f"contour_{a.split('.')[-1]}-{b.split('.')[-1]}.png"] = (
            lambda a=a, b=b: ovm.plot_contour(study, params=[a, b], target=target, target_name=name))
    if multi:
        todo["pareto.png"] = lambda: ovm.plot_pareto_front(study, target_names=metrics)
    out = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "unique value length < 2" on a young study's plots
    try:
        for fname, draw in todo.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    warnings.simplefilter("ignore", UserWarning)
                    out[fname] = _png(_figure(draw()))
            except Exception as e:  # noqa: BLE001  (Optuna refuses plots it has too little data for)
                log(f"tune: skipped {fname} ({type(e).__name__}: {e})")
    finally:
        optuna.logging.set_verbosity(verbosity)
    return out


def write_outputs(study, cfg: Config, out: str, metrics: list[str], log=print) -> dict:
    """Write trials.parquet, best.yaml and the plots; returns what was written and the best trial."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = trials_frame(study, metrics)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    written = {"trials": write_bytes(out, "trials.parquet", buf.getvalue())}
    best = best_trial(study, metrics)
    summary = {"best_trial": None}
    if best is not None:
        tuned = best_config(cfg, best)
        values = ", ".join(f"{m}={v:.4g}" for m, v in zip(metrics, best.values))
        head = (f"# fers tune: study {study.study_name!r}, trial #{best.number} ({values}).\n"
                f"# Run the outer folds with: fers cv --config best.yaml\n")
        body = yaml.safe_dump(tuned.model_dump(mode="json"), sort_keys=False)
        written["best"] = write_bytes(out, "best.yaml", (head + body).encode())
        summary = {"best_trial": best.number, "best_values": dict(zip(metrics, best.values)),
                   "best_params": best.params}
    for fname, blob in plots(study, metrics, list(cfg.tune.space), log).items():
        written[fname.removesuffix(".png")] = write_bytes(out, fname, blob)
    return {**summary, "written": written}
