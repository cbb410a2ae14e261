"""The report's provenance table: which code, libraries and hardware made the rows, and a warning for
every dataset whose compared rows were made with different versions (a comparison across versions can
measure the versions rather than the variants). Rows written before provenance was recorded show as
"not recorded"."""

from __future__ import annotations

import math

import pandas as pd

from fers_dist.provenance import COLUMNS, VERSION_COLUMNS
from fers_dist.report.experiment import datasets
from fers_dist.report.paper import dataset_name
from fers_dist.report.tables import Table

UNKNOWN = "not recorded"


def _filled(frame: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=frame.index)
    for c in COLUMNS:
        col = frame[c] if c in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        out[c] = col.map(lambda v: UNKNOWN if v is None or v == "" or (isinstance(v, float) and math.isnan(v))
                         else str(v))
    out["git_commit"] = out["git_commit"].map(lambda v: v[:10] if v != UNKNOWN else v)
    return out


def provenance_table(frame: pd.DataFrame) -> Table:
    """One line per distinct (code, libraries, hardware) combination, with how many finished rows it made."""
    done = frame[frame["status"] == "finished"]
    filled = _filled(done).assign(dataset=done["dataset"].map(dataset_name), variant=done["label"])
    grouped = filled.groupby(list(COLUMNS), dropna=False, sort=True)
    data = grouped.agg(rows=("dataset", "size"), datasets=("dataset", lambda s: ", ".join(sorted(set(s)))),
                       variants=("variant", lambda s: ", ".join(sorted(set(s))))).reset_index()
    cols = ["rows", "datasets", "variants", *COLUMNS]
    return Table("provenance", "Provenance: the code, libraries and hardware behind the rows", cols,
                 [[str(r[c]) for c in cols] for _, r in data.iterrows()], data[cols],
                 "git_dirty: the checkout had uncommitted changes when the row was made.")


def mixed_versions(frame: pd.DataFrame) -> list[str]:
    """One warning per dataset whose finished rows differ in any version column."""
    done = frame[frame["status"] == "finished"]
    filled = _filled(done)
    notes = []
    for d in datasets(done):
        part = filled[done["dataset"] == d]
        mixed = [c for c in VERSION_COLUMNS if part[c].nunique() > 1]
        if mixed:
            seen = "; ".join(f"{c}: {', '.join(sorted(part[c].unique()))}" for c in mixed)
            notes.append(f"WARNING: the {dataset_name(d)} comparison mixes versions ({seen}); differences between "
                         f"variants may come from the versions")
    return notes
