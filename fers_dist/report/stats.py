"""Fold statistics: mean ± sample std over folds and paired tests between two variants on the SAME folds.
Too few pairs or degenerate differences give an honest "n/a (...)" instead of a number.

The k folds of a CV share most of their training data, so their differences are not independent and the
plain paired t-test (and Wilcoxon) reject too often (Dietterich 1998; Nadeau & Bengio 2003). The test that
fits CV is Nadeau & Bengio's corrected resampled t-test: the variance of the mean difference is
(1/k + n_test/n_train) s² instead of s²/k, with n_test/n_train from the actual fold sizes. Its 95% interval
for the mean difference is reported too; the uncorrected tests stay, labelled as such."""

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


def corrected_t(d, test_train_ratio: float | None) -> dict:
    """Nadeau-Bengio corrected resampled t-test of the differences ``d`` (one per fold):
    t = mean(d) / sqrt((1/k + n_test/n_train) s²), k - 1 degrees of freedom, two-sided p, and the 95%
    interval mean(d) ± t_{0.975, k-1} sqrt((1/k + n_test/n_train) s²)."""
    from scipy import stats

    d = np.asarray(d, dtype=float)
    out = {"nb_t": math.nan, "nb_p": math.nan, "ci_low": math.nan, "ci_high": math.nan, "nb_note": ""}
    if test_train_ratio is None or not test_train_ratio > 0:
        out["nb_note"] = "n/a (fold sizes unknown)"
    elif d.size < TTEST_MIN_PAIRS:
        out["nb_note"] = f"n/a (n<{TTEST_MIN_PAIRS})"
    elif np.allclose(d, d[0], rtol=0, atol=1e-12):
        out["nb_note"] = "n/a (all differences equal)"
    else:
        k = d.size
        se = math.sqrt((1 / k + test_train_ratio) * d.var(ddof=1))
        t = float(d.mean() / se)
        half = float(stats.t.ppf(0.975, k - 1)) * se
        out.update(nb_t=t, nb_p=float(2 * stats.t.sf(abs(t), k - 1)), ci_low=float(d.mean() - half),
                   ci_high=float(d.mean() + half))
    return out


def paired_tests(a, b, test_train_ratio: float | None = None) -> dict:
    """Paired comparison of ``a`` and ``b`` (same folds, same order).

    Returns n pairs, the mean difference a - b, and for each test its statistic and p-value, or a
    ``*_note`` explaining why there is none: the corrected resampled t-test (``nb_*``, with the 95%
    interval ``ci_low``..``ci_high``; needs ``test_train_ratio``), the plain paired t-test (``t_*``) and
    the Wilcoxon signed-rank test (``w_*``).
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
    out.update(corrected_t(d, test_train_ratio))
    return out


def format_p(p: float, note: str = "") -> str:
    """A p-value for a table: 3 significant digits, or the note when there is no p-value."""
    if math.isnan(p):
        return note or "n/a"
    text = "<0.001" if p < 1e-3 else f"{p:.3f}"
    return f"{text} ({note})" if note else text
