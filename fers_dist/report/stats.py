"""Fold statistics: mean ± sample std over folds and paired tests between two variants on the SAME folds
(Wilcoxon signed-rank and paired t-test, scipy). Too few pairs or degenerate differences give an honest
"n/a (...)" instead of a number."""

from __future__ import annotations

import math
import warnings

import numpy as np

# Below 6 pairs the exact two-sided Wilcoxon p-value cannot go below 2 / 2**5 = 0.0625, so the test can
# never reject at the 5 % level; we report it as n/a rather than print a p-value that cannot mean anything.
WILCOXON_MIN_PAIRS = 6
TTEST_MIN_PAIRS = 2  # one degree of freedom at least


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); std is NaN for fewer than two values."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def paired_tests(a, b) -> dict:
    """Paired comparison of ``a`` and ``b`` (same folds, same order).

    Returns n pairs, the mean difference a - b, and for each test its statistic and p-value, or a
    ``*_note`` explaining why there is none.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    d = a - b
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan,
           "t_stat": math.nan, "t_p": math.nan, "t_note": "",
           "w_stat": math.nan, "w_p": math.nan, "w_note": ""}
    from scipy import stats

    if d.size < TTEST_MIN_PAIRS:
        out["t_note"] = f"n/a (n<{TTEST_MIN_PAIRS})"
    elif np.allclose(d, d[0], rtol=0, atol=1e-12):
        out["t_note"] = "n/a (all differences equal)"
    else:
        r = stats.ttest_rel(a, b)
        out["t_stat"], out["t_p"] = float(r.statistic), float(r.pvalue)
    if d.size < WILCOXON_MIN_PAIRS:
        out["w_note"] = f"n/a (n<{WILCOXON_MIN_PAIRS})"
    elif np.all(np.abs(d) < 1e-12):
        out["w_note"] = "n/a (all differences 0)"
    else:
        with warnings.catch_warnings():  # ties/zeros switch scipy to the normal approximation, noted below
            warnings.simplefilter("ignore")
            r = stats.wilcoxon(a, b)
        out["w_stat"], out["w_p"] = float(r.statistic), float(r.pvalue)
        zeros = int(np.sum(np.abs(d) < 1e-12))
        if zeros:
            out["w_note"] = f"{zeros} zero difference(s) dropped"
    return out


def format_p(p: float, note: str = "") -> str:
    """A p-value for a table: 3 significant digits, or the note when there is no p-value."""
    if math.isnan(p):
        return note or "n/a"
    text = "<0.001" if p < 1e-3 else f"{p:.3f}"
    return f"{text} ({note})" if note else text
