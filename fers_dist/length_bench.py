"""`fers bench length`: what training length does to the demo's ablation ordering and to synthesis.

The demo config (jobs/configs/demo.yaml) on its synthetic CK+ (12 subjects), folds 0-4, ``original``
and ``no_mtl`` at several training lengths (``--epochs``), each length a CV through Ray (``run_cv``)
with its own config hash; then Table V (``fers fes-eval``: an independent recogniser scores the
``original`` runs' synthesised faces) for every length and fold. Prints the per-length means as JSON
and, with ``--plot``, draws accuracy and Table V cross-expression accuracy against epochs.

It sits on top with ``demo``: it drives the CV layer and the report's Table V protocol both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 30, 100],
                   help="training lengths (epochs per run; the demo's grid runs 10, its showcase 100)")
    p.add_argument("--folds", type=int, default=5, help="folds 0..N-1 of the 10")
    p.add_argument("--subjects", type=int, default=12, help="synthetic CK+ subjects (the demo's 12)")
    p.add_argument("--recogniser-epochs", type=int, default=30,
                   help="Table V's recogniser: no_mtl epochs on the fold's real training faces (the same for "
                        "every length, so only the generator changes)")
    p.add_argument("--workdir", help="keep data and results here (default: a temporary folder)")
    p.add_argument("--plot", help="write the figure here (PNG)")


def bench(args: argparse.Namespace) -> dict:
    from fers_dist.config import DEMO_YAML, load_config
    from fers_dist.cv.cli import Run, run_cv
    from fers_dist.cv.resources import ray_session
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize
    from fers_dist.report.fes_eval import evaluate

    if min(args.epochs) < 1 or args.folds < 1:
        raise SystemExit("fers bench length: --epochs and --folds must be positive")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fers-bench-length-"))
    cfg = load_config(DEMO_YAML, {"data.root": str(work / "data"), "cv.storage": str(work / "results"),
                                  "cv.experiment": "length", "cv.datasets": ["ckplus"]})
    say = lambda m: print(m, file=sys.stderr, flush=True)
    lengths = sorted(set(args.epochs))
    t0 = time.perf_counter()
    with ray_session("local", quiet=True):
        if not (work / "data" / "ckplus" / "faces.parquet").exists():
            synthesize("ckplus", work / "raw", subjects=args.subjects, seed=0, size=160, progress=False)
            prepare("ckplus", work / "raw", cfg.data.root, size=cfg.data.aligned_size, log=lambda *a: None)
        for epochs in lengths:  # one CV per length; a row's tag says its length
            c = cfg.with_overrides({"train.epochs": epochs})
            say(f"fers bench length: {epochs} epochs, folds 0-{args.folds - 1}, original and no_mtl")
            frame = run_cv(cfg, [Run("ckplus", v, f, cfg=c) for v in ("original", "no_mtl")
                                 for f in range(args.folds)], tag=f"e{epochs}")
    exp = work / "results" / "length"
    fes = evaluate(exp, variants=["original"], folds=list(range(args.folds)), identity="dlib", identity_faces=4,
                   recogniser_epochs=args.recogniser_epochs, log=say)
    rows = []
    for epochs in lengths:
        done = frame[(frame["tag"] == f"e{epochs}") & (frame["status"] == "finished")]
        acc = {v: done[done["variant"] == v]["accuracy"] for v in ("original", "no_mtl")}
        cross = [r["accuracy_cross"] for r in fes if r["tag"] == f"e{epochs}"]
        # the trainer runs only full batches (the remainder is skipped each epoch)
        rows.append({"epochs": epochs, "steps_per_run": epochs * (int(done["n_train_images"].mean())
                                                                  // cfg.train.batch_size),
                     **{f"{v}_mean": round(float(a.mean()), 4) for v, a in acc.items()},
                     **{f"{v}_std": round(float(a.std(ddof=1)), 4) for v, a in acc.items()},
                     **{f"{v}_folds": len(a) for v, a in acc.items()},
                     "table5_cross_mean": round(sum(cross) / len(cross), 4) if cross else None,
                     "table5_cross_folds": [round(x, 4) for x in cross]})
    result = {"bench": "length", "dataset": "ckplus", "subjects": args.subjects, "folds": args.folds,
              "chance": round(1 / 7, 4), "recogniser_epochs": args.recogniser_epochs, "lengths": rows,
              "wall_s": round(time.perf_counter() - t0, 1), "workdir": str(work)}
    if args.plot:
        result["plot"] = str(length_plot(rows, result["chance"], args.plot))
    return result


def length_plot(rows: list[dict], chance: float, path: str | Path) -> Path:
    """Test accuracy of original and no_mtl (mean ± std over folds) and Table V cross-expression accuracy
    of original's synthesised faces, against training length."""
    from fers_dist.plotting import figure, save_png

    fig = figure((1000, 420))
    left, right = fig.subplots(1, 2)
    x = [r["epochs"] for r in rows]
    for v, style in (("original", "o-"), ("no_mtl", "s--")):
        m = [100 * r[f"{v}_mean"] for r in rows]
        s = [100 * r[f"{v}_std"] for r in rows]
        left.errorbar(x, m, yerr=s, fmt=style, capsize=3, label=v)
    left.set(xscale="log", xlabel="epochs per run (log)", ylabel="test accuracy (%)",
             title="recognition, folds 0-4 (mean ± std)")
    right.plot(x, [100 * (r["table5_cross_mean"] or 0) for r in rows], "o-", label="original: synthesised faces")
    right.axhline(100 * chance, color="grey", ls=":", label="chance")
    right.axhline(300 * chance, color="grey", ls="--", label="3x chance")
    right.set(xscale="log", xlabel="epochs per run (log)", ylabel="cross-expression accuracy (%)",
              title="Table V protocol, folds 0-4")
    for ax in (left, right):
        ax.set_xticks(x, [str(e) for e in x])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)
