"""``<storage>/<experiment>/folds.parquet``: one row per finished (dataset, variant, fold) run.

Ray-free. ``storage`` is a local path or any pyarrow-filesystem URI (s3://, gs://). Rows are appended by
rewriting the whole file through a temporary object and a rename (a single PUT on object stores), so a
reader never sees half a file; a row for a run that is already there replaces it, so a resumed
experiment never duplicates rows.
"""

from __future__ import annotations

import json
import time
import uuid

import pandas as pd

from fers_dist.errors import FersError
from fers_dist.storage import filesystem

KEY = ["dataset", "variant", "fold", "seed", "config_hash", "tag"]
PRETRAINED_TAG = "pretrained"  # rows of runs started from a pre-trained model (train.init_from)
SHOWCASE_TAG = "showcase"  # fers demo's one longer synthesis run per dataset (Fig. 4 and Table V)
JSON_COLUMNS = ("gate_means", "gate_maps", "history", "config")


def run_name(dataset: str, variant: str, fold: int, tag: str = "", seed: int = 0) -> str:
    """Deterministic run names (Train V2 resumes a run by name): ``ckplus-original-f3``, and ``-s2`` for a
    repeat under ``train.seed`` 2 (``cv.seeds``)."""
    return (f"{dataset}-{variant}-f{fold}" + (f"-s{seed}" if seed else "")
            + (f"-{tag}" if tag and tag != "paper" else ""))


def run_key(dataset: str, variant: str, fold: int, tag: str, config_hash: str, seed: int = 0) -> str:
    """Where a run keeps its checkpoints and Ray state: its name plus the hash of the config that trains
    it (``ckplus-original-f3-1a2b3c4d5e6f``), so a changed config never resumes another config's model."""
    return f"{run_name(dataset, variant, fold, tag, seed)}-{config_hash}"


def result_row(result, *, experiment: str, tag: str = "paper", checkpoint_uri: str = "",
               config: dict | None = None, status: str = "finished", error: str = "") -> dict:
    """A folds.parquet row from a :class:`fers_dist.train.fold.FoldResult` (or its dict)."""
    d = result if isinstance(result, dict) else result.to_dict()
    row = {k: v for k, v in d.items() if k not in JSON_COLUMNS and k != "architecture"}
    row.update({f"arch_{k}" if "params" not in k else k: v for k, v in d.get("architecture", {}).items()})
    row.update({k: json.dumps(d.get(k, {})) for k in JSON_COLUMNS if k != "config"})
    row.update(experiment=experiment, tag=tag, run_name=run_name(d["dataset"], d["variant"], d["fold"], tag, d.get("seed", 0)),
               checkpoint_uri=checkpoint_uri, status=status, error=error,
               config=json.dumps(config or {}), finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tune = (config or {}).get("tune") or {}
    if tune.get("source_trial") is not None:  # a tuned config: the study and trial it came from
        row.update(study=tune.get("study"), study_trial=int(tune["source_trial"]))
    return row


def experiment_uri(storage: str, experiment: str) -> str:
    return f"{storage.rstrip('/')}/{experiment}"


def folds_uri(storage: str, experiment: str) -> str:
    return f"{experiment_uri(storage, experiment)}/folds.parquet"


def read_folds(uri: str) -> pd.DataFrame:
    """Read a folds.parquet (path or URI). Missing file -> empty frame.

    The file is read whole through one opened stream (one open file, one GET), never by path: a writer
    may replace it at any moment (``append_rows``), and pyarrow's reader by path takes the size from one
    look at the file and the bytes from a later open, so it could mix the old file's length with the new
    file's bytes ("Page was smaller than expected", seen while a driver was appending)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            data = f.readall()
    except FileNotFoundError:
        return pd.DataFrame()
    return pq.read_table(pa.BufferReader(data)).to_pandas()


def append_rows(storage: str, experiment: str, rows: list[dict]) -> str:
    """Append (or replace, by run key) rows in folds.parquet atomically; returns its URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = folds_uri(storage, experiment)
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    new = pd.DataFrame(rows)
    old = read_folds(uri)
    frame = pd.concat([old, new], ignore_index=True) if len(old) else new
    frame["seed"] = (frame["seed"] if "seed" in frame else pd.Series(0, index=frame.index)).fillna(0).astype(int)
    frame = frame.drop_duplicates(subset=KEY, keep="last").sort_values(KEY[:3]).reset_index(drop=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, filesystem=fs)
    fs.move(tmp, path)
    return uri


def check_writable(storage: str) -> None:
    """Fail fast (before any run starts) when the storage cannot be written."""
    fs, path = filesystem(storage)
    probe = f"{path.rstrip('/')}/.fers-write-test-{uuid.uuid4().hex}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001  (any failure here is reported as the one-line error below)
        raise FersError(f"cv.storage {storage!r} is not writable ({type(e).__name__}: {e})") from None


def expand(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """A JSON-string column of folds.parquet as a tidy frame, keyed by the run (``KEY`` columns).

    - ``history``: one row per epoch (and ``phase``, for fes_da fine-tuning), one column per metric;
    - ``gate_means``: one column per ConvFLU gate (``fer_r1`` …), one row per run;
    - ``gate_maps``: one row per (run, gate), the map as a nested list in ``map``;
    - ``config``: one column per dotted config key (``loss.lam_adv`` …), one row per run.
    """
    if column not in JSON_COLUMNS:
        raise FersError(f"expand: {column!r} is not one of the JSON columns {', '.join(JSON_COLUMNS)}")
    out = []
    for _, row in frame.iterrows():
        key = {k: row[k] for k in KEY if k in row}
        value = json.loads(row[column]) if isinstance(row[column], str) and row[column] else {}
        if column == "history":
            out += [{**key, **epoch} for epoch in value]
        elif column == "gate_maps":
            out += [{**key, "gate": g, "map": m} for g, m in value.items()]
        elif column == "config":
            out.append({**key, **pd.json_normalize(value, sep=".").iloc[0].to_dict()} if value else key)
        else:
            out.append({**key, **value})
    return pd.DataFrame(out)
