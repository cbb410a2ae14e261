"""The whole pipeline on the embedded synthetic faces, on a laptop, in minutes:
synthetic CK+/Oulu layouts -> Ray Data Parquet -> Ray Train folds x variants, beside one longer synthesis
("showcase") run per dataset -> Table V (fes-eval) -> Ray Tune + Optuna -> report.

Everything runs on one embedded Ray instance with the tiny model of jobs/configs/demo.yaml. The 10-fold
grid's runs are too short for the synthesis branch to learn (issue 22: it needs ~10x more generator
steps than the grid's runs get), so one ``original`` run per dataset on fold 0 trains longer, under
jobs/configs/showcase.yaml over the demo config, tagged ``showcase``; Fig. 4 and Table V come from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fers_dist.config import CONFIG_DIR, DEMO_YAML, ConfigError, add_set_argument, read_yaml
from fers_dist.errors import FersError
from fers_dist.results import SHOWCASE_TAG

SHOWCASE_YAML = CONFIG_DIR / "showcase.yaml"
RECOGNISER_EPOCHS = 30  # Table V's independent recogniser (no_mtl on the fold's real training faces)
RECOGNISERS = 3  # Table V's figure is their mean: one recogniser's moves by up to ±1x chance between seeds
IDENTITY_FACES = 6  # test faces per fold whose synthesised faces Table V's identity score embeds

CHANCE = {"ckplus": 1 / 7, "oulu": 1 / 6}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="folder for raw faces, prepared data, results, report")
    p.add_argument("--quick", action="store_true",
                   help="CK+ only, variants original + no_mtl, a 2-trial study, no showcase run and so no "
                        "Table V (under 3 minutes on 2 cores)")
    p.add_argument("--subjects", type=int, default=12, help="synthetic subjects per dataset (at least 10: one per fold)")
    p.add_argument("--trials", type=int, help="λ-study trials per study (default 2)")
    p.add_argument("--config", default=str(DEMO_YAML), help="demo model/training config")
    add_set_argument(p)


class _Steps:
    """Numbered step banners on stderr, and the wall time of each step for the summary."""

    def __init__(self, total: int):
        self.total, self.times, self._name, self._t = total, {}, None, 0.0

    def __call__(self, name: str, what: str) -> None:
        self.end()
        print(f"\n== [{len(self.times) + 1}/{self.total}] {what}", file=sys.stderr, flush=True)
        self._name, self._t = name, time.perf_counter()

    def end(self) -> None:
        if self._name:
            self.times[self._name] = time.perf_counter() - self._t
            self._name = None


def showcase_overrides(path: Path = SHOWCASE_YAML) -> dict:
    """The showcase run's settings over the demo config: the YAML's sections flattened to dotted keys."""
    data = read_yaml(path) or {}
    if not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...) like the other configs")
    return {f"{section}.{key}": value for section, fields in data.items() for key, value in fields.items()}


def showcase_runs(cfg, datasets: list[str], path: Path = SHOWCASE_YAML) -> list:
    """One ``original`` run per dataset on fold 0, under the showcase settings (``path`` over ``cfg``),
    tagged ``showcase``. Listed before the grid's runs in one ``run_cv``, they start first and the grid's
    short runs fill the other CPUs around them."""
    from fers_dist.cv.cli import Run

    scfg = cfg.with_overrides(showcase_overrides(path), source=str(path))
    return [Run(ds, "original", 0, cfg=scfg, tag=SHOWCASE_TAG) for ds in datasets]


def table_v(cfg, recogniser_epochs: int = RECOGNISER_EPOCHS, recognisers: int = RECOGNISERS) -> list[dict]:
    """Table V (``fers fes-eval``) on the showcase runs of ``cfg``'s experiment: independent recognisers,
    trained on each fold's real training faces (each from its own seed), score the synthesised test faces;
    the figure is their mean."""
    from fers_dist.report.fes_eval import evaluate

    return evaluate(Path(cfg.cv.storage) / cfg.cv.experiment, tags=[SHOWCASE_TAG], identity="auto",
                    identity_faces=IDENTITY_FACES, recogniser_epochs=recogniser_epochs, recognisers=recognisers,
                    log=lambda m: print(m, file=sys.stderr, flush=True))


MARKER = ".fers-demo"


def _fresh_out(out: Path) -> None:
    """A re-run starts clean: a folder this demo made before is emptied; any other non-empty folder is refused."""
    import shutil

    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FersError(f"--out {out}: the folder is not empty and was not made by fers demo; "
                            f"pick a new or empty folder")
        print(f"fers demo: clearing the previous demo in {out}", file=sys.stderr)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by fers demo; a re-run empties this folder\n")


def _quiet() -> None:
    """A successful demo prints its steps, progress and summary, and nothing that reads as a problem:
    token authentication stays on (as Ray's default) without Ray's banner saying so; Ray Data logs
    warnings, not INFO lines; Tune does not warn that the per-trial files switched off above are
    missing. Real errors still print: each of these loggers keeps WARNING (or ERROR) and above."""
    import logging

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # set explicitly: the same mode, without the banner
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read when Ray Data configures its loggers
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    # Tune's per-trial CSV/JSON/TensorBoard writers cost the driver ~0.3 s of CPU per fold run, which on a
    # 2-core laptop comes out of training; the report draws the curves from folds.parquet instead.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    _quiet()

    from fers_dist.config import load_config
    from fers_dist.cv.cli import plan_runs, run_cv
    from fers_dist.cv.progress import summary_table
    from fers_dist.cv.resources import ray_session
    from fers_dist.data.prepare import prepare
    from fers_dist.data.synthetic import synthesize
    from fers_dist.report.cli import build_report
    from fers_dist.tune.cli import run_tune

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    _fresh_out(out)
    datasets = ["ckplus"] if args.quick else ["ckplus", "oulu"]
    variants = ["no_mtl", "original"] if args.quick else ["no_mtl", "no_convflu", "original", "fes_da"]
    trials = args.trials or 2
    cfg = load_config(args.config, {
        "data.root": str(out / "data"), "cv.storage": str(out / "results"), "cv.datasets": datasets,
        "cv.variants": variants, "cv.folds": "all", "tune.dataset": "ckplus", "tune.trials": trials,
        "tune.storage": None}, args.sets)
    if args.subjects < cfg.data.n_folds:
        raise FersError(f"--subjects {args.subjects}: identity-independent {cfg.data.n_folds}-fold CV needs at "
                        f"least {cfg.data.n_folds} subjects per dataset")
    with ray_session("local", quiet=True):  # the embedded Ray, whatever RAY_ADDRESS says
        step = _Steps(5 if args.quick else 6)
        step("synthesise", f"synthesise {args.subjects} subjects per dataset in the real layouts")
        for ds in datasets:
            synthesize(ds, out / "raw" / ds, subjects=args.subjects, seed=0, size=160)
        step("prepare", "prepare with Ray Data (landmarks aligner) -> Parquet with folds")
        for ds in datasets:
            prepare(ds, out / "raw" / ds, cfg.data.root, aligner="landmarks", size=cfg.data.aligned_size,
                    n_folds=cfg.data.n_folds, fold_seed=cfg.data.fold_seed, channels=cfg.data.channels)
        showcase = [] if args.quick else showcase_runs(cfg, datasets)
        step("cv", f"{cfg.data.n_folds}-fold CV of {', '.join(variants)} on {', '.join(datasets)} (Ray Tune + Train)"
                   + ("" if args.quick else f", beside one longer original run per dataset on fold 0 for Fig. 4 "
                                            f"and Table V (showcase: {SHOWCASE_YAML.name})"))
        frame = run_cv(cfg, showcase + plan_runs(cfg))
        fes = []
        if showcase:
            step("table5", "Table V (fes-eval): an independent recogniser, trained on the real training faces, "
                           "scores the showcase runs' synthesised faces")
            fes = table_v(cfg)
        step("tune", f"λ study, nested CV: one study per outer fold {cfg.tune.outer_folds} of ckplus, {trials} "
                     f"trials each, side by side in one Ray Tune run")
        study = run_tune(cfg, out=str(out / "results" / "tune-demo"), force=True)
        step("report", "report: tables, figures, report.html")
        report = build_report(out / "results" / cfg.cv.experiment)
        step.end()
    total = time.perf_counter() - t0
    done = frame[(frame["status"] == "finished")]
    print("\n" + summary_table(frame))
    for ds in datasets:
        acc = done[(done["dataset"] == ds) & (done["variant"] == "original") & (done["tag"] == "paper")]["accuracy"]
        print(f"learning check: original on synthetic {ds}: {acc.mean():.3f} mean test accuracy over "
              f"{len(acc)} folds (chance {CHANCE[ds]:.3f})")
    for r in fes:
        chance = 1 / len(r["class_names"])
        each = ", ".join(f"{a:.3f}" for a in r["accuracy_cross_each"])
        print(f"Table V:   showcase on synthetic {r['dataset']} fold 0: {r['accuracy_cross']:.3f} cross-expression "
              f"accuracy of the synthesised faces ({r['accuracy_cross'] / chance:.1f}x chance {chance:.3f}; mean of "
              f"{r['recognisers']} recognisers: {each}); the recognisers score {r['recogniser_real_accuracy']:.3f} "
              f"on the real test faces")
    print(f"\nresults:   {out / 'results' / cfg.cv.experiment / 'folds.parquet'}")
    print(f"report:    {report['html']}")
    for r in study["studies"]:
        best = (r.get("best_values") or {}).get("inner_val_accuracy")
        score = "no finished trial" if best is None else (
            f"best inner validation accuracy {best:.3f} (chance {CHANCE[cfg.tune.dataset]:.3f})")
        print(f"λ study:   {r['study']} (outer fold {r['outer_fold']}): {score}; {r['out']}")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in step.times.items())
    print(f"time:      {total:.0f} s in all ({steps})")
    if len(done) < len(frame):
        print(f"fers demo: {len(frame) - len(done)} of {len(frame)} runs did not finish (see the table above)",
              file=sys.stderr)
        return 1
    return 0
