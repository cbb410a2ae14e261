"""Tables (Markdown, CSV, LaTeX), figures (PNG) and one self-contained report.html for an experiment.

Reads ``EXPERIMENT_DIR/folds.parquet`` (and ``fes_eval.parquet`` when ``fers fes-eval`` ran), plus the
checkpoints and prepared faces for the synthesis grid. Never imports Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fers_dist.errors import FersError
from fers_dist.io import atomic_write_text
from fers_dist.results import SHOWCASE_TAG


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment_dir", metavar="EXPERIMENT_DIR",
                   help="<storage>/<experiment>, holding folds.parquet: a folder or an s3:// / gs:// URI")
    p.add_argument("--out", help="output folder (default: EXPERIMENT_DIR/report)")
    p.add_argument("--data-root", help="prepared faces for the synthesis grid (default: data.root of each run)")
    p.add_argument("--no-synthesis", action="store_true",
                   help="skip the synthesis grid (it needs the checkpoints and the prepared faces)")


def run(args: argparse.Namespace) -> int:
    res = build_report(args.experiment_dir, args.out, data_root=args.data_root, synthesis=not args.no_synthesis)
    print(f"wrote {len(res['tables'])} tables and {len(res['figures'])} figures to {res['out']}; "
          f"open {res['html']}")
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def mean_gate_maps(rows) -> dict:
    """The gate maps of a run group averaged over its finished folds (paper Fig. 3): key -> 2-D array."""
    import numpy as np

    sums: dict[str, list] = {}
    for text in rows.get("gate_maps", []):
        try:
            maps = json.loads(text) if isinstance(text, str) and text else {}
        except ValueError:
            continue
        for key, m in maps.items():
            sums.setdefault(key, []).append(np.asarray(m, dtype=float))
    return {k: np.mean(v, axis=0) for k, v in sums.items() if len({a.shape for a in v}) == 1}


def _synthesis_figure(frame, dataset: str, exp_dir: Path, fig_dir: Path, data_root, faces_cache: dict):
    """Fig. 4 for one dataset from its lowest-fold original (else fes_da) checkpoint and its test faces; a run
    tagged ``showcase`` (``fers demo``'s longer synthesis run) is drawn first."""
    import torch

    from fers_dist.data.loader import split_fold
    from fers_dist.report import figures
    from fers_dist.report.experiment import slug
    from fers_dist.report.paper import dataset_name
    from fers_dist.report.runs import load_generator, load_row_faces, row_config
    from fers_dist.train.speed import use_amp
    from fers_dist.train.synthesis import centre_uint8, synthesise_all

    cands = frame[(frame["dataset"] == dataset) & (frame["status"] == "finished")
                  & frame["variant"].isin(["original", "fes_da"])]
    if cands.empty:
        return None
    cands = cands.assign(_s=cands["tag"] != SHOWCASE_TAG, _v=cands["variant"] != "original").sort_values(
        ["_s", "_v", "fold"])
    row = cands.iloc[0]
    cfg = row_config(row)
    key = (dataset, str(data_root or cfg.data.root))
    if key not in faces_cache:
        faces_cache[key] = load_row_faces(row, data_root)
    faces = faces_cache[key]
    _, test_idx = split_fold(faces, int(row["fold"]))
    test = faces.subset(test_idx)
    picks = [int((test.labels == c).nonzero()[0]) for c in range(faces.num_classes) if (test.labels == c).any()]
    picks = torch.tensor(picks[:8])
    model = load_generator(row, exp_dir)
    crop = cfg.model.input_size
    amp = use_amp(cfg, next(model.parameters()).device)  # as the run's own evaluation computed
    synth = synthesise_all(model, test.images[picks], crop, faces.num_classes, amp=amp)
    src = centre_uint8(test.images[picks], crop)
    title = f"{dataset_name(dataset)}: {row['label']}, fold {row['fold']} — synthesised expressions (Fig. 4)"
    return figures.synthesis_grid(src.numpy(), synth.numpy(),
                                  [faces.class_names[int(y)] for y in test.labels[picks]], list(faces.class_names),
                                  title, fig_dir / f"synthesis_{dataset}_{slug(row['label'])}_f{row['fold']}.png")


def _figures(frame, G, exp_dir: Path, fig_dir: Path, data_root, synthesis: bool, notes: list) -> dict:
    """All figures, by report section."""
    from tqdm import tqdm

    from fers_dist.report import figures
    from fers_dist.report.experiment import datasets, label_order, plural, slug
    from fers_dist.report.paper import dataset_name

    out = {"accuracy": [], "confusion": [], "gates": [], "synthesis": []}
    order = label_order(frame)
    jobs, faces_cache = [], {}
    for d in datasets(frame):
        labs = [c for c in order if (d, c) in G]
        jobs.append(("accuracy", lambda d=d, labs=labs: figures.fold_accuracy(
            f"{dataset_name(d)}: accuracy per test fold", {c: G[(d, c)].fold_accuracy for c in labs},
            {c: G[(d, c)].expected for c in labs}, fig_dir / f"fold_accuracy_{d}.png")))
        for c in labs:
            g = G[(d, c)]
            if g.confusion() is not None:
                jobs.append(("confusion", lambda g=g: figures.confusion_heatmap(
                    g.confusion(), g.class_names(), f"{dataset_name(g.dataset)}, {g.label}: confusion over "
                    f"{plural(g.n_done, 'fold')}", fig_dir / f"confusion_{g.dataset}_{slug(g.label)}.png")))
            maps = mean_gate_maps(g.finished())
            if maps:
                title = f"{dataset_name(d)}, {c}: mean ConvFLU gates over {plural(g.n_done, 'fold')} (Fig. 3)"
                jobs.append(("gates", lambda g=g, maps=maps, title=title: figures.gate_maps(
                    maps, title, fig_dir / f"gates_{g.dataset}_{slug(g.label)}.png")))
        if synthesis:
            jobs.append(("synthesis", lambda d=d: _synthesis_figure(frame, d, exp_dir, fig_dir, data_root,
                                                                     faces_cache)))
    for kind, job in tqdm(jobs, desc="report figures", unit="fig", file=sys.stderr):
        try:
            path = job()
        except FersError as e:  # a checkpoint or the prepared faces are not here: say so, keep going
            notes.append(f"{kind} figure skipped: {e}")
            continue
        if path is not None:
            out[kind].append(path)
    return out


def _missing_table(G):
    import pandas as pd

    from fers_dist.report.paper import dataset_name
    from fers_dist.report.tables import Table

    rows, data = [], []
    for (d, c), g in sorted(G.items()):
        errors = dict(zip(g.rows["fold"], g.rows["error"].fillna("").astype(str)))
        for f in g.missing:
            status = "failed" if f in g.failed else "not run"
            rows.append([dataset_name(d), c, str(f), status, errors.get(f, "")[:160]])
            data.append({"dataset": d, "label": c, "fold": f, "status": status, "error": errors.get(f, "")})
    if not rows:
        return None
    return Table("missing_folds", "Missing and failed folds (excluded from every mean)",
                 ["dataset", "run", "fold", "status", "error"], rows, pd.DataFrame(data))


def build_report(exp_dir: str | Path, out: str | Path | None = None, data_root: str | Path | None = None,
                 synthesis: bool = True) -> dict:
    """Write the tables, figures, ``report.md`` and ``report.html``; returns their paths and notes."""
    from fers_dist.report import tables as T
    from fers_dist.report.experiment import fetch_experiment, groups, load_fes, load_rows
    from fers_dist.report.html import Section, render
    from fers_dist.report.provenance import mixed_versions, provenance_table
    from fers_dist.storage import is_uri

    if is_uri(str(exp_dir)):  # s3://, gs://: tables copied here, generators read from the bucket
        name = str(exp_dir).rstrip("/").rsplit("/", 1)[-1]
        exp_dir, out = fetch_experiment(str(exp_dir)), Path(out or f"{name}-report")
    exp_dir = Path(exp_dir)
    frame = load_rows(exp_dir)
    G = groups(frame)
    fes = load_fes(exp_dir)
    out = Path(out) if out else exp_dir / "report"
    notes: list[str] = []
    main, paper, sig = T.table_vi(frame, G), T.paper_side_by_side(frame, G, fes), T.significance(frame, G)
    tuned, fes_t, missing = T.tuned_vs_paper(frame, G), T.fes_table(fes), _missing_table(G)
    per_class, conf = T.per_class(frame, G), T.confusions(frame, G)
    figs = _figures(frame, G, exp_dir, out / "figures", data_root, synthesis, notes)
    if fes is None:
        notes.append(f"no {exp_dir / 'fes_eval.parquet'}: run 'fers fes-eval {exp_dir}' for Table V")
    notes += mixed_versions(frame)
    sections = [
        Section("Accuracy (Table VI layout)", [main, missing, *figs["accuracy"]]),
        Section("The paper side by side", [paper]),
        Section("Tuned λ vs paper λ", [tuned]),
        Section("Significance across folds", [sig]),
        Section("FES evaluation (Table V protocol)", [fes_t]),
        Section("Synthesis (Fig. 4)", figs["synthesis"]),
        Section("ConvFLU gates (Fig. 3)", figs["gates"]),
        Section("Per class and confusion matrices", [*per_class, *figs["confusion"], *conf]),
        Section("Provenance", [provenance_table(frame)]),
        Section("Notes", list(notes)),
    ]
    for s in sections:
        s.items = [i for i in s.items if i is not None]
    written = []
    all_tables = [i for s in sections for i in s.items if isinstance(i, T.Table)]
    for t in all_tables:
        base = out / "tables" / t.name
        atomic_write_text(base.with_suffix(".md"), T.to_markdown(t))
        atomic_write_text(base.with_suffix(".tex"), T.to_latex(t))
        atomic_write_text(base.with_suffix(".csv"), t.data.to_csv(index=False))
        written.append(base)
    md = [f"# Report: {exp_dir.name}", ""]
    for s in sections:
        if s.items:
            md += [f"## {s.title}", ""]
            md += [T.to_markdown(i) if isinstance(i, T.Table) else
                   (f"![{i.name}](figures/{i.name})\n" if isinstance(i, Path) else f"{i}\n") for i in s.items]
    atomic_write_text(out / "report.md", "\n".join(md))
    html_path = out / "report.html"
    atomic_write_text(html_path, render(f"fers-dist report: {exp_dir.name}", str(exp_dir), sections))
    figures = [p for v in figs.values() for p in v]
    return {"out": out, "tables": written, "figures": figures, "html": html_path, "markdown": out / "report.md",
            "notes": notes, "sections": sections}
