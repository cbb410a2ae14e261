"""Benchmarks. Each prints its figures as one JSON line on stdout (progress goes to stderr).

Speed and memory targets are checked here, never in timed unit tests. docs/BENCHMARKS.md
records every figure with its date, machine and command.
"""

from __future__ import annotations

import argparse
import importlib
import json

# name -> (module providing add_arguments(parser) and bench(args) -> dict, help)
BENCHES: dict[str, tuple[str, str]] = {
    "model": ("fers_dist.model.bench", "parameters, counted MACs/image, forward+backward images/s"),
    "prepare": ("fers_dist.data.bench", "Ray Data prepare pipeline vs a single-process loop"),
    "train": ("fers_dist.train.bench", "full-objective training step: images/s, peak memory, MFU"),
    "cv": ("fers_dist.cv.bench", "a small CV grid through Ray vs serially in plain PyTorch"),
    "tune": ("fers_dist.tune.bench", "Ray Tune + Optuna vs plain Optuna; ASHA savings"),
    "length": ("fers_dist.length_bench", ("original vs no_mtl and Table V at several training lengths "
                                             "(the demo's synthetic CK+, folds 0-4); --plot draws it")),
    "gpu": ("fers_dist.train.gpu_bench", ("every GPU figure in one call: eager/compiled, bf16/fp32, MFU, memory, "
                                          "packed runs (+MPS), a 20-epoch fold; --tiny rehearses it anywhere")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fers_dist.cli import HelpFormatter

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_) in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        importlib.import_module(module_name).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module_name, _ = BENCHES[args.bench]
    result = importlib.import_module(module_name).bench(args)
    print(json.dumps(result, sort_keys=False), flush=True)
    return 0
