"""`fers report` on a REAL tiny experiment (see report_fixtures.py): tables recomputed from the rows,
missing/failed folds, config hashes kept apart, paired tests against scipy, figures and report.html."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from report_fixtures import ROOT, copy_experiment, tiny_experiment  # noqa: F401  (session fixture)
from scipy import stats

from fers_dist.errors import FersError
from fers_dist.report import figures
from fers_dist.report.cli import build_report
from fers_dist.report.stats import WILCOXON_MIN_PAIRS, format_p, paired_tests


@pytest.fixture(scope="module")
def report(tiny_experiment, tmp_path_factory):  # noqa: F811
    exp = copy_experiment(tiny_experiment, tmp_path_factory.mktemp("report") / "tiny")
    return build_report(exp), exp


def _table6(res) -> pd.DataFrame:
    return pd.read_csv(res["out"] / "tables" / "table6_accuracy.csv", dtype={"missing_folds": str, "failed_folds": str})


def _md(res, name: str) -> str:
    return (res["out"] / "tables" / f"{name}.md").read_text()


def test_table_numbers_are_recomputed_from_the_rows(report, tiny_experiment):  # noqa: F811
    res, exp = report
    rows = pd.read_parquet(exp / "folds.parquet")
    table = _table6(res).set_index("label")
    for variant, part in rows.groupby("variant"):
        acc = part["accuracy"].to_numpy()
        got = table.loc[variant]
        assert got["accuracy_mean"] == pytest.approx(100 * np.mean(acc))
        if len(acc) > 1:
            assert got["accuracy_std"] == pytest.approx(100 * np.std(acc, ddof=1))
        assert got["folds_finished"] == len(acc)
        assert got["n_test_images"] == part["n_test_images"].sum()
    # the Markdown cell shows the same numbers
    orig = rows[rows["variant"] == "original"]["accuracy"].to_numpy()
    assert f"{100 * orig.mean():.2f} ± {100 * orig.std(ddof=1):.2f} (3 folds" in _md(res, "table6_accuracy")
    # every table is written as Markdown, CSV and LaTeX
    for stem in ("table6_accuracy", "paper_vs_ours", "significance", "per_class_ckplus"):
        for ext in (".md", ".csv", ".tex"):
            assert (res["out"] / "tables" / f"{stem}{ext}").stat().st_size > 0
    assert r"$\pm$" in (res["out"] / "tables" / "table6_accuracy.tex").read_text()
    assert r"no\_mtl" in (res["out"] / "tables" / "table6_accuracy.tex").read_text()


def test_fes_da_run_on_one_fold_shows_its_missing_folds(report):
    res, _ = report
    fes_da = _table6(res).set_index("label").loc["fes_da"]
    assert (fes_da["folds_finished"], fes_da["folds_expected"], fes_da["missing_folds"]) == (1, 3, "1 2")
    assert "(1/3 folds; missing: 1, 2;" in _md(res, "table6_accuracy")


def test_dropped_and_failed_folds_are_reported_not_averaged(tiny_experiment, tmp_path):  # noqa: F811
    def edit(frame):
        frame = frame[~((frame["variant"] == "original") & (frame["fold"] == 1))].copy()
        failed = (frame["variant"] == "no_mtl") & (frame["fold"] == 2)
        frame.loc[failed, "status"] = "failed"
        frame.loc[failed, "error"] = "CUDA out of memory"
        return frame

    exp = copy_experiment(tiny_experiment, tmp_path / "exp", edit)
    res = build_report(exp, synthesis=False)
    rows = pd.read_parquet(exp / "folds.parquet")
    table = _table6(res).set_index("label")
    kept = rows[(rows["variant"] == "original")]["accuracy"]
    assert table.loc["original", "accuracy_mean"] == pytest.approx(100 * kept.mean())
    assert table.loc["original", "missing_folds"] == "1"
    ok = rows[(rows["variant"] == "no_mtl") & (rows["status"] == "finished")]["accuracy"]
    assert table.loc["no_mtl", "accuracy_mean"] == pytest.approx(100 * ok.mean())
    assert table.loc["no_mtl", "failed_folds"] == "2"
    md = _md(res, "table6_accuracy")
    assert "(2/3 folds; missing: 1;" in md
    assert "(2/3 folds; missing: 2; failed: 2;" in md
    missing = _md(res, "missing_folds")
    assert "| original | 1 | not run |" in missing and "| no_mtl | 2 | failed | CUDA out of memory |" in missing


def test_two_config_hashes_under_one_variant_are_reported_separately(tiny_experiment, tmp_path):  # noqa: F811
    def edit(frame):
        frame.loc[(frame["variant"] == "original") & (frame["fold"] > 0), "config_hash"] = "bbbbbbbbbbbb"
        return frame

    exp = copy_experiment(tiny_experiment, tmp_path / "exp", edit)
    res = build_report(exp, synthesis=False)
    rows = pd.read_parquet(exp / "folds.parquet")
    first = rows.loc[(rows["variant"] == "original") & (rows["fold"] == 0), "config_hash"].iloc[0]
    table = _table6(res).set_index("label")
    a, b = f"original [{first[:6]}]", "original [bbbbbb]"
    assert "original" not in table.index
    assert table.loc[a, "folds_finished"] == 1 and table.loc[b, "folds_finished"] == 2
    assert table.loc[b, "accuracy_mean"] == pytest.approx(
        100 * rows[(rows["variant"] == "original") & (rows["fold"] > 0)]["accuracy"].mean())
    header = _md(res, "table6_accuracy").splitlines()[2]
    assert a in header and b in header


def test_paired_tests_match_scipy_on_a_hand_example():
    a = [0.91, 0.93, 0.95, 0.90, 0.94, 0.96, 0.92, 0.97]
    b = [0.89, 0.92, 0.95, 0.86, 0.93, 0.93, 0.93, 0.94]
    r = paired_tests(a, b)
    assert r["n"] == 8
    assert r["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert r["t_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["t_stat"] == pytest.approx(stats.ttest_rel(a, b).statistic)
    assert r["w_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert r["w_note"] == "1 zero difference(s) dropped"  # fold 3 ties


def test_paired_tests_say_n_a_for_too_few_pairs_or_no_differences():
    few = paired_tests([0.9, 0.8, 0.7], [0.85, 0.8, 0.6])
    assert math.isnan(few["w_p"]) and few["w_note"] == f"n/a (n<{WILCOXON_MIN_PAIRS})"
    assert few["t_p"] == pytest.approx(stats.ttest_rel([0.9, 0.8, 0.7], [0.85, 0.8, 0.6]).pvalue)
    one = paired_tests([0.9], [0.8])
    assert one["t_note"] == "n/a (n<2)" and format_p(one["t_p"], one["t_note"]) == "n/a (n<2)"
    same = paired_tests([0.5] * 7, [0.5] * 7)
    assert same["t_note"] == "n/a (all differences equal)" and same["w_note"] == "n/a (all differences 0)"
    assert format_p(0.0004) == "<0.001" and format_p(0.0312) == "0.031"


def test_corrected_resampled_t_test_on_values_worked_out_by_hand():
    """Nadeau & Bengio (2003), d = (1, 2, 3), n_test/n_train = 1/9: mean 2, s² = 1, so the variance of the
    mean is (1/3 + 1/9)·1 = 4/9, se = 2/3, t = 3 with 2 degrees of freedom. The t(2) distribution has the
    closed form F(t) = 1/2 + t / (2 sqrt(2 + t²)), so p = 2 (1 - F(3)) = 1 - 3/sqrt(11); its 97.5% point is
    sqrt(2) (2·0.975 - 1) / sqrt(1 - (2·0.975 - 1)²) = 4.30265..., so the 95% interval is 2 ± 4.30265·2/3.
    (The uncorrected paired t would be 2 / (1/sqrt(3)) = 3.464.)"""
    from fers_dist.report.stats import corrected_t

    r = corrected_t([1.0, 2.0, 3.0], 1 / 9)
    assert r["nb_t"] == pytest.approx(3.0)
    assert r["nb_p"] == pytest.approx(1 - 3 / math.sqrt(11))  # 0.09547
    q = 2 * 0.975 - 1
    t975 = math.sqrt(2) * q / math.sqrt(1 - q * q)
    assert t975 == pytest.approx(4.302653, abs=1e-6)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(2 - t975 * 2 / 3), pytest.approx(2 + t975 * 2 / 3))
    plain = paired_tests([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], 1 / 9)
    assert plain["t_stat"] == pytest.approx(2 * math.sqrt(3)) and plain["nb_p"] == pytest.approx(r["nb_p"])
    assert plain["nb_p"] > plain["t_p"]  # the correction widens: fewer false "significant" ablations
    assert corrected_t([1.0, 2.0, 3.0], None)["nb_note"] == "n/a (fold sizes unknown)"
    assert corrected_t([0.1, 0.1], 0.1)["nb_note"] == "n/a (all differences equal)"


def test_significance_table_pairs_the_folds_both_variants_finished(report):
    res, exp = report
    rows = pd.read_parquet(exp / "folds.parquet")
    acc = {v: p.set_index("fold")["accuracy"] for v, p in rows.groupby("variant")}
    sig = pd.read_csv(res["out"] / "tables" / "significance.csv", dtype={"folds": str})
    r = sig[(sig["a"] == "original") & (sig["b"] == "no_mtl")].iloc[0]
    assert r["n"] == 3
    assert r["t_p"] == pytest.approx(stats.ttest_rel(acc["original"].sort_index(), acc["no_mtl"].sort_index()).pvalue)
    assert r["w_note"] == f"n/a (n<{WILCOXON_MIN_PAIRS})"
    folds = rows[(rows["variant"] == "no_mtl")].set_index("fold").sort_index()  # B's fold sizes give the ratio
    ratio = folds["n_test_images"].mean() / folds["n_train_images"].mean()
    d = (acc["original"].sort_index() - acc["no_mtl"].sort_index()).to_numpy()
    t = d.mean() / math.sqrt((1 / 3 + ratio) * d.var(ddof=1))
    assert r["nb_t"] == pytest.approx(t) and r["nb_p"] == pytest.approx(2 * stats.t.sf(abs(t), 2))
    assert r["ci_low"] < r["mean_diff"] < r["ci_high"]
    one = sig[(sig["a"] == "fes_da") & (sig["b"] == "original")].iloc[0]
    assert one["n"] == 1 and one["folds"] == "0" and one["t_note"] == "n/a (n<2)"


def test_paper_side_by_side_and_tuned_vs_paper(tiny_experiment, tmp_path):  # noqa: F811
    def edit(frame):
        tuned = frame[frame["variant"] == "original"].copy()
        tuned["tag"], tuned["accuracy"] = "tuned", tuned["accuracy"] + np.array([0.05, 0.1, 0.2])
        return pd.concat([frame, tuned])

    exp = copy_experiment(tiny_experiment, tmp_path / "exp", edit)
    res = build_report(exp, synthesis=False)
    rows = pd.read_parquet(exp / "folds.parquet")
    paper = pd.read_csv(res["out"] / "tables" / "paper_vs_ours.csv")
    orig = paper[paper["label"] == "original"].iloc[0]
    ours = rows[(rows["variant"] == "original") & (rows["tag"] == "paper")]["accuracy"].mean()
    assert orig["paper"] == 97.35 and orig["difference"] == pytest.approx(100 * ours - 97.35)
    tvp = pd.read_csv(res["out"] / "tables" / "tuned_vs_paper.csv").iloc[0]
    assert (tvp["variant"], tvp["n"]) == ("original", 3)
    assert tvp["mean_diff"] == pytest.approx(np.mean([0.05, 0.1, 0.2]))
    assert "original (tuned)" in _table6(res)["label"].tolist()


def test_figures_are_pngs_of_the_expected_size(report, tiny_experiment):  # noqa: F811
    res, _ = report
    names = {p.name: p for p in res["figures"]}
    faces = tiny_experiment["faces"]
    E, sources = faces.num_classes, len(set(faces.labels[faces.folds == 0].tolist()))  # one face per class
    expected = {
        "fold_accuracy_ckplus.png": figures.SIZES["fold_accuracy"],
        "confusion_ckplus_original.png": figures.SIZES["confusion"],
        "confusion_ckplus_no_mtl.png": figures.SIZES["confusion"],
        "confusion_ckplus_fes_da.png": figures.SIZES["confusion"],
        "gates_ckplus_original.png": figures.SIZES["gate_maps"],
        "gates_ckplus_fes_da.png": figures.SIZES["gate_maps"],
        "synthesis_ckplus_original_f0.png": figures.grid_size(sources, E + 1),
    }
    assert set(names) == set(expected)  # no_mtl has no ConvFLU gates and no synthesis branch
    for name, size in expected.items():
        assert names[name].stat().st_size > 2000, name
        assert figures.png_size(names[name]) == size, name


def test_html_is_self_contained_and_embeds_every_figure(report):
    res, _ = report
    page = res["html"].read_text()
    for fig in res["figures"]:
        assert base64.b64encode(fig.read_bytes()).decode() in page, fig.name
    assert page.count("data:image/png;base64,") == len(res["figures"])
    assert "src=\"http" not in page and "<link" not in page
    for title in ("Table VI layout", "The paper side by side", "Significance across folds", "Fig. 3", "Fig. 4"):
        assert title in page


def test_gate_maps_figure_averages_the_folds(report):
    from fers_dist.report.cli import mean_gate_maps

    _, exp = report
    rows = pd.read_parquet(exp / "folds.parquet")
    orig = rows[rows["variant"] == "original"]
    maps = mean_gate_maps(orig)
    assert len(maps) == 16  # r and z, both directions, 4 ConvFLU positions
    each = [np.asarray(json.loads(m)["fes_z2"]) for m in orig["gate_maps"]]
    assert np.allclose(maps["fes_z2"], np.mean(each, axis=0))


def test_experiment_without_folds_parquet_is_a_clear_error(tmp_path):
    with pytest.raises(FersError, match=r"folds\.parquet"):
        build_report(tmp_path)
    with pytest.raises(FersError, match="experiment folder not found"):
        build_report(tmp_path / "nope")
    out = subprocess.run([sys.executable, "-m", "fers_dist.cli", "report", str(tmp_path)], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and str(tmp_path / "folds.parquet") in out.stderr


def test_report_cli_never_imports_ray(report, tmp_path):
    _, exp = report
    code = ("import sys; from fers_dist.cli import main; rc = main(['report', sys.argv[1], '--out', sys.argv[2]]); "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'fers_dist.cv', 'fers_dist.tune'))]; "
            "assert not bad, bad; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(exp), str(tmp_path / "r")], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "r" / "report.html").is_file() and "report.html" in out.stdout


def test_synthesis_grid_without_the_faces_is_skipped_with_a_note(report, tmp_path):
    _, exp = report
    res = build_report(exp, tmp_path / "r", data_root=tmp_path / "no-data")
    assert not [p for p in res["figures"] if p.name.startswith("synthesis_")]
    note = [n for n in res["notes"] if n.startswith("synthesis figure skipped")]
    assert note and f"{tmp_path / 'no-data' / 'ckplus' / 'faces.parquet'}: no prepared dataset" in note[0]
    assert note[0] in res["html"].read_text()


def test_provenance_table_and_mixed_versions_warning(tiny_experiment, tmp_path):  # noqa: F811
    """Every row's code, library and hardware versions are printed; a dataset whose compared rows were
    made with different torch versions gets a warning, and rows from before provenance show as such."""
    from fers_dist.provenance import COLUMNS, provenance

    prov = provenance("cpu")
    assert set(prov) == set(COLUMNS) and prov["torch_version"] and prov["hostname"]

    def edit(frame):
        for k, v in prov.items():
            frame[k] = v
        frame.loc[frame["variant"] == "no_mtl", "torch_version"] = "2.0.0"
        frame.loc[frame["variant"] == "fes_da", "torch_version"] = None  # written before provenance existed
        return frame

    res = build_report(copy_experiment(tiny_experiment, tmp_path / "mixed", edit), tmp_path / "out")
    table = pd.read_csv(res["out"] / "tables" / "provenance.csv", dtype=str)
    assert sorted(table["torch_version"]) == sorted(["2.0.0", prov["torch_version"], "not recorded"])
    assert table["rows"].astype(int).sum() == 7 and set(table["hostname"]) == {prov["hostname"]}
    warn = [n for n in res["notes"] if n.startswith("WARNING: the CK+ comparison mixes versions")]
    assert warn and "torch_version: 2.0.0" in warn[0] and warn[0] in res["html"].read_text()


def test_labels_of_two_rows_one_per_variant():
    """Two rows (the S3 chain's original + fes_da): labels must not trip pandas' list-of-arrays grouping."""
    from fers_dist.report.experiment import labels

    frame = pd.DataFrame({"variant": ["original", "fes_da"], "tag": ["paper", "paper"], "config_hash": ["h", "h"],
                          "config": ["{}", "{}"]})
    assert labels(frame) == ["original", "fes_da"]
