"""Result tables built from the experiment's rows. Each :class:`Table` has display cells (Markdown, LaTeX,
HTML) and a numeric long-form frame (CSV), so nothing printed is typed in by hand: every number is
recomputed from ``folds.parquet`` (and ``fes_eval.parquet``)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fers_dist.report.experiment import Group, datasets, label_order, plural, slug
from fers_dist.report.paper import PRETRAINED_BU4DFE, TABLE_V_FES, TABLE_VI, VARIANT_ORDER, dataset_name, variant_name
from fers_dist.report.stats import WILCOXON_MIN_PAIRS, format_p, mean_std, paired_tests
from fers_dist.results import PRETRAINED_TAG

DASH = "—"


@dataclass
class Table:
    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[list[str]]  # display cells
    data: pd.DataFrame  # numbers, long form (CSV)
    note: str = ""


def _pct(x: float, digits: int = 2) -> str:
    return DASH if x is None or math.isnan(x) else f"{100 * x:.{digits}f}"


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _pm(values) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return DASH
    return f"{100 * m:.2f} ± " + ("n/a" if math.isnan(s) else f"{100 * s:.2f}")


# -- Table VI ------------------------------------------------------------------------------------------
def table_vi(frame: pd.DataFrame, G: dict[tuple[str, str], Group]) -> Table:
    """Datasets as rows, variants as columns (paper Table VI), mean ± std over folds."""
    cols = label_order(frame)
    rows, data = [], []
    for d in datasets(frame):
        rows.append([dataset_name(d)] + [G[(d, c)].cell() if (d, c) in G else DASH for c in cols])
        for c in cols:
            if (d, c) not in G:
                continue
            g = G[(d, c)]
            m, s = g.mean_std
            data.append({"dataset": d, "label": c, "variant": g.variant, "tag": g.tag, "config_hash": g.config_hash,
                         "accuracy_mean": 100 * m, "accuracy_std": 100 * s, "folds_finished": g.n_done,
                         "folds_expected": g.expected, "missing_folds": " ".join(map(str, g.missing)),
                         "failed_folds": " ".join(map(str, g.failed)), "n_test_images": g.n_test_images,
                         "fold_accuracy": json.dumps({str(k): 100 * v for k, v in sorted(g.fold_accuracy.items())})})
    return Table("table6_accuracy", "Accuracy (%) per dataset and variant (Table VI layout)", ["dataset"] + cols,
                 rows, pd.DataFrame(data),
                 "mean ± sample std (ddof=1) over finished test folds; missing or failed folds are listed, "
                 "never averaged in.")


# -- per class ---------------------------------------------------------------------------------------
def per_class(frame: pd.DataFrame, G: dict[tuple[str, str], Group]) -> list[Table]:
    """Per dataset: accuracy per class from the confusion matrix summed over folds."""
    out = []
    for d in datasets(frame):
        gs = [G[(d, c)] for c in label_order(frame) if (d, c) in G and G[(d, c)].confusion() is not None]
        if not gs:
            continue
        names = gs[0].class_names()
        rows, data = [], []
        mats = {g.label: g.confusion() for g in gs}
        for i, name in enumerate(names):
            cells = [name]
            for g in gs:
                m = mats[g.label]
                n = int(m[i].sum()) if i < len(m) else 0
                acc = m[i, i] / n if n else math.nan
                cells.append(f"{_pct(acc, 1)} (n={n})")
                data.append({"dataset": d, "label": g.label, "class": name, "accuracy": 100 * acc, "n_images": n})
            rows.append(cells)
        out.append(Table(f"per_class_{d}", f"{dataset_name(d)}: accuracy (%) per class, test folds pooled",
                         ["class"] + [g.label for g in gs], rows, pd.DataFrame(data),
                         "from the confusion matrix summed over finished folds; n = test images of the class."))
    return out


def confusions(frame: pd.DataFrame, G: dict[tuple[str, str], Group]) -> list[Table]:
    """The confusion matrix summed over folds, one table per (dataset, label); rows = true class."""
    out = []
    for d in datasets(frame):
        for c in label_order(frame):
            g = G.get((d, c))
            m = g.confusion() if g else None
            if m is None:
                continue
            names = g.class_names() or [str(i) for i in range(len(m))]
            rows = [[names[i]] + [str(int(v)) for v in m[i]] for i in range(len(m))]
            data = pd.DataFrame([{"dataset": d, "label": c, "true": names[i], "predicted": names[j],
                                  "count": int(m[i, j])} for i in range(len(m)) for j in range(len(m))])
            title = (f"{dataset_name(d)}, {c}: confusion matrix summed over {plural(g.n_done, 'fold')} "
                     "(rows: true, columns: predicted)")
            out.append(Table(f"confusion_{d}_{slug(c)}", title, ["true \\ predicted"] + names, rows, data))
    return out


# -- paper side by side ------------------------------------------------------------------------------
def _diff_row(d: str, what: str, paper: float | None, g_or_values, label: str, coverage: str) -> tuple[list, dict]:
    m, s = mean_std(g_or_values)
    diff = 100 * m - paper if paper is not None and not math.isnan(m) else math.nan
    cells = [dataset_name(d), what, label, DASH if paper is None else f"{paper:.2f}",
             (_pm(g_or_values) + f" {coverage}") if not math.isnan(m) else DASH,
             DASH if math.isnan(diff) else f"{diff:+.2f}"]
    return cells, {"dataset": d, "comparison": what, "label": label, "paper": paper, "ours_mean": 100 * m,
                   "ours_std": 100 * s, "difference": diff, "coverage": coverage}


def paper_side_by_side(frame: pd.DataFrame, G: dict[tuple[str, str], Group], fes: pd.DataFrame | None) -> Table:
    rows, data = [], []

    def add(*args):
        cells, rec = _diff_row(*args)
        rows.append(cells)
        data.append(rec)

    for d in datasets(frame):
        for c in label_order(frame):
            g = G.get((d, c))
            if g is None or g.tag not in ("paper", PRETRAINED_TAG):
                continue
            if g.tag == PRETRAINED_TAG:
                add(d, "BU-4DFE pre-trained", PRETRAINED_BU4DFE.get(d), list(g.fold_accuracy.values()), c, g.coverage())
            else:
                add(d, f"Table VI: {variant_name(g.variant)}", TABLE_VI.get(d, {}).get(g.variant),
                    list(g.fold_accuracy.values()), c, g.coverage())
        if d in PRETRAINED_BU4DFE and not any(g.tag == PRETRAINED_TAG for (dd, _), g in G.items() if dd == d):
            add(d, "BU-4DFE pre-trained", PRETRAINED_BU4DFE[d], [], f"no '{PRETRAINED_TAG}' runs", "")
    for (d, label), part in _fes_groups(fes):
        add(d, "Table V: FES (synthesised test faces)", TABLE_V_FES.get(d), list(part["accuracy"]), label,
            f"({plural(len(part), 'fold')})")
    return Table("paper_vs_ours", "The paper's published accuracy (%) beside ours",
                 ["dataset", "comparison", "ours: run", "paper", "ours", "ours − paper"], rows, pd.DataFrame(data),
                 "ours: mean ± sample std over finished folds (from scratch unless the run tag says otherwise).")


def _fes_groups(fes: pd.DataFrame | None):
    if fes is None:
        return []
    fes = fes.copy()
    for col in ("accuracy_cross", "recogniser_real_accuracy", "identity_cosine", "identity_cosine_other"):
        if col not in fes.columns:  # written by an older fes-eval
            fes[col] = math.nan
    fes["identity_method"] = fes.get("identity_method", "n/a")
    fes["identity_pairs"] = fes.get("identity_pairs", 0)
    fes["label"] = fes["variant"] + np.where(fes.get("tag", "paper") == "paper", "", " (" + fes.get("tag", "") + ")")
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    parts = [((d, lab), part.sort_values("fold")) for (d, lab), part in fes.groupby(["dataset", "label"])]
    return sorted(parts, key=lambda p: (p[0][0], rank.get(p[1]["variant"].iloc[0], 9), p[0][1]))


CORRECTED_NOTE = ("CV folds share most of their training data, so the plain paired t-test and Wilcoxon "
                  "reject too often; the corrected resampled t-test (Nadeau & Bengio 2003) and its 95% interval "
                  "use the variance (1/k + n_test/n_train)·s² with the runs' own fold sizes.")


# -- tuned vs paper ----------------------------------------------------------------------------------
def tuned_vs_paper(frame: pd.DataFrame, G: dict[tuple[str, str], Group]) -> Table | None:
    """Runs tagged "tuned" beside the "paper" runs of the same dataset and variant (paired on common folds)."""
    rows, data = [], []
    for (d, _), t in sorted(G.items()):
        if t.tag != "tuned":
            continue
        for p in (g for (dd, _), g in G.items() if dd == d and g.variant == t.variant and g.tag == "paper"):
            common = sorted(set(t.fold_accuracy) & set(p.fold_accuracy))
            r = paired_tests([t.fold_accuracy[f] for f in common], [p.fold_accuracy[f] for f in common],
                             p.test_train_ratio(common))
            rows.append([dataset_name(d), t.variant, p.cell(False), t.cell(False),
                         DASH if not common else f"{100 * r['mean_diff']:+.2f}", _ci(r), str(r["n"]),
                         format_p(r["nb_p"], r["nb_note"]), format_p(r["t_p"], r["t_note"]),
                         format_p(r["w_p"], r["w_note"])])
            data.append({"dataset": d, "variant": t.variant, "paper_label": p.label, "tuned_label": t.label, **r})
    if not rows:
        return None
    return Table("tuned_vs_paper", "Tuned λ vs the paper's λ (accuracy %)",
                 ["dataset", "variant", "paper λ", "tuned λ", "mean diff (tuned − paper)", "95% CI", "n pairs",
                  "corrected t p", "paired t p (uncorrected)", "Wilcoxon p (uncorrected)"], rows, pd.DataFrame(data),
                 f"paired on the folds both finished. {CORRECTED_NOTE}")


# -- significance ------------------------------------------------------------------------------------
def significance(frame: pd.DataFrame, G: dict[tuple[str, str], Group]) -> Table:
    """Every pair of variant labels per dataset, paired on the folds both finished."""
    rows, data = [], []
    for d in datasets(frame):
        labels = [c for c in label_order(frame) if (d, c) in G]
        for a, b in itertools.combinations(labels, 2):
            ga, gb = G[(d, a)], G[(d, b)]
            common = sorted(set(ga.fold_accuracy) & set(gb.fold_accuracy))
            r = paired_tests([gb.fold_accuracy[f] for f in common], [ga.fold_accuracy[f] for f in common],
                             ga.test_train_ratio(common))
            rows.append([dataset_name(d), b, a, str(r["n"]),
                         DASH if not common else f"{100 * r['mean_diff']:+.2f}", _ci(r),
                         format_p(r["nb_p"], r["nb_note"]), format_p(r["t_p"], r["t_note"]),
                         format_p(r["w_p"], r["w_note"])])
            data.append({"dataset": d, "a": b, "b": a, "folds": " ".join(map(str, common)), **r,
                         "mean_diff": 100 * r["mean_diff"], "ci_low": 100 * r["ci_low"], "ci_high": 100 * r["ci_high"]})
    return Table("significance", "Paired comparison across folds (A − B, accuracy points)",
                 ["dataset", "A", "B", "n pairs", "mean diff (A − B)", "95% CI (corrected)",
                  "corrected resampled t p", "paired t-test p (uncorrected)", "Wilcoxon signed-rank p (uncorrected)"],
                 rows, pd.DataFrame(data),
                 f"two-sided tests on the folds both variants finished. {CORRECTED_NOTE} Wilcoxon needs n ≥ "
                 f"{WILCOXON_MIN_PAIRS} pairs (below that its exact p-value cannot reach 0.05).")


def _ci(r: dict) -> str:
    return DASH if math.isnan(r["ci_low"]) else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"


# -- Table V (FES) -----------------------------------------------------------------------------------
def _targets(fes: pd.DataFrame) -> str:
    """The target sets the rows used (rows from before the ``targets`` column synthesised every class)."""
    sets = set(fes["targets"].fillna("all")) if "targets" in fes else {"all"}
    names = {"basic6": "the six basic emotions (the paper's set; CK+ leaves contempt out)", "all": "every class"}
    return " / ".join(names.get(t, t) for t in sorted(sets))


def _recognisers(fes: pd.DataFrame) -> str:
    """How many recognisers each row averages (rows from before the column had one)."""
    counts = sorted(set(fes["recognisers"].fillna(1).astype(int))) if "recognisers" in fes else [1]
    return "" if counts == [1] else f" (the mean of {'/'.join(map(str, counts))} recognisers, each from its own seed)"


def fes_table(fes: pd.DataFrame | None) -> Table | None:
    if fes is None:
        return None
    rows, data = [], []
    for (d, label), part in _fes_groups(fes):
        methods = ", ".join(sorted(set(part["identity_method"].astype(str))))
        paper = TABLE_V_FES.get(d)
        chance = 100 / len(part["class_names"].iloc[0])  # the recogniser picks one of the dataset's classes
        rows.append([dataset_name(d), label, " ".join(map(str, part["fold"])), _pm(part["accuracy_cross"]),
                     f"{chance:.2f}", _pm(part["accuracy"]), _pm(part["recogniser_real_accuracy"]),
                     (f"{_num(part['identity_cosine'].mean())} vs {_num(part['identity_cosine_other'].mean())} "
                      f"({methods}; {int(part['identity_pairs'].sum())} pairs)"),
                     DASH if paper is None else f"{paper:.2f}"])
        data.append({"dataset": d, "label": label, "folds": " ".join(map(str, part["fold"])),
                     "accuracy": 100 * part["accuracy"].mean(), "accuracy_std": 100 * mean_std(part["accuracy"])[1],
                     "accuracy_cross": 100 * part["accuracy_cross"].mean(), "chance": chance,
                     "recogniser_real_accuracy": 100 * part["recogniser_real_accuracy"].mean(),
                     "identity_cosine": part["identity_cosine"].mean(),
                     "identity_cosine_other": part["identity_cosine_other"].mean(), "identity_method": methods,
                     "paper": paper})
    return Table("table5_fes", "FES evaluation (Table V protocol): independent recogniser on synthesised test faces",
                 ["dataset", "run", "folds", "cross-expression accuracy (%)", "chance (%)", "all targets incl. own (%)",
                  "recogniser on real test (%)", "identity cosine: own vs other subjects (method)", "paper (%)"],
                 rows, pd.DataFrame(data),
                 f"recogniser: no_mtl trained on the fold's real training faces only{_recognisers(fes)}; targets: "
                 f"{_targets(fes)}, synthesised for every test face; the headline is the accuracy excluding each "
                 "face's own expression (a copy of the source would score the rest); identity: mean cosine(source, its synthesised faces) vs the same "
                 "against other subjects' synthesised faces (identity is preserved only where own > other).")


# -- writers -----------------------------------------------------------------------------------------
def to_markdown(t: Table) -> str:
    esc = lambda s: str(s).replace("|", "\\|")
    lines = [f"### {t.title}", "", "| " + " | ".join(map(esc, t.columns)) + " |",
             "|" + "|".join("---" for _ in t.columns) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in t.rows]
    if t.note:
        lines += ["", f"*{t.note}*"]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "--",
        "−": "$-$", "<": r"$<$", ">": r"$>$", "≥": r"$\geq$", "λ": r"$\lambda$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(t: Table) -> str:
    head = " & ".join(rf"\textbf{{{tex_escape(c)}}}" for c in t.columns)
    body = "\n".join(" & ".join(tex_escape(c) for c in r) + r" \\" for r in t.rows)
    note = f"\n% {t.note}" if t.note else ""
    return (f"% {t.title}{note}\n\\begin{{table}}[t]\n\\centering\n\\caption{{{tex_escape(t.title)}}}\n"
            f"\\begin{{tabular}}{{l{'l' * (len(t.columns) - 1)}}}\n\\toprule\n{head} \\\\\n\\midrule\n{body}\n"
            "\\bottomrule\n\\end{tabular}\n\\end{table}\n")
