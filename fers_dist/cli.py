"""The ``fers`` command. Subcommands live in their own modules and are imported only when used,
so ``fers --help`` is instant and never starts torch or Ray.

Each subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("fers_dist.data.synthetic", "draw procedural synthetic faces in a real dataset layout"),
    "prepare": ("fers_dist.data.prepare", "Ray Data: raw dataset folder -> aligned-face Parquet + folds"),
    "train": ("fers_dist.train.cli", "train and evaluate ONE fold of ONE variant (plain PyTorch)"),
    "pretrain": ("fers_dist.cv.pretrain", "Ray Train: pre-train FERSNet on BU-4DFE (train.init_from: pretrained)"),
    "cv": ("fers_dist.cv.cli", "Ray: datasets x variants x folds cross-validation"),
    "tune": ("fers_dist.tune.cli", "Ray Tune + Optuna study over the loss weights and LR schedule"),
    "report": ("fers_dist.report.cli", "tables (Markdown, CSV, LaTeX), figures and report.html"),
    "fes-eval": ("fers_dist.report.fes_eval", "FES evaluation, the paper's Table V protocol"),
    "submit": ("fers_dist.submit", "submit a job to a Ray cluster (ray job submit)"),
    "demo": ("fers_dist.demo", "the whole pipeline on the embedded synthetic faces"),
    "bench": ("fers_dist.bench", "benchmarks: model, prepare, train, cv, tune, length, gpu (prints JSON)"),
}

EPILOG = """examples:
  fers demo --quick                          the whole pipeline on synthetic faces, in minutes
  fers synth --layout ckplus --subjects 20 --out raw/ckplus
  fers prepare --dataset ckplus --root raw/ckplus --out data
  fers cv --config jobs/configs/paper.yaml --datasets ckplus --variants original --folds all
  fers bench model --width 256

run 'fers COMMAND --help' for a command's options."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help once: not where the help already says its default, and
    not for defaults that say nothing (None, off switches)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fers",
        description="fers-dist: reproduce, ablate and tune FERSNet (ICPR 2020) on a Ray cluster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"fers {name}", description=(module.__doc__ or help_).strip().split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from fers_dist.errors import FersError

    try:
        rc = module.run(args)
    except FersError as e:
        print(f"fers {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fers {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
