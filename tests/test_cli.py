"""The ``fers`` command line: ``--set KEY=VALUE`` on every config-driven command, and ``--help`` that says
each default once."""

from __future__ import annotations

import argparse
import importlib

import pytest

from fers_dist.cli import COMMANDS, HelpFormatter, main
from fers_dist.config import ConfigError, load_config, parse_sets

SET_COMMANDS = ("cv", "tune", "demo", "submit")


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fers {name}", formatter_class=HelpFormatter)
    importlib.import_module(COMMANDS[name][0]).add_arguments(p)
    return p


def _all_parsers():
    for name, (module, _) in COMMANDS.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            continue  # a command not built yet (its module is missing) has no options to check
        p = _parser(name)
        yield name, p
        for action in p._actions:  # fers bench's own subcommands
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", sp) for sub, sp in action.choices.items())


def test_every_option_states_its_default_at_most_once():
    seen = 0
    for name, parser in _all_parsers():
        fmt = HelpFormatter(prog=name)
        for action in parser._actions:
            text = (fmt._get_help_string(action) or "").replace("%(default)s", str(action.default))
            assert text.count("default") <= 1, f"fers {name} {'/'.join(action.option_strings)}: {text}"
            seen += 1
    assert seen > 100


@pytest.mark.parametrize("name", SET_COMMANDS)
def test_set_is_offered_by_every_config_driven_command(name):
    args = _parser(name).parse_args(["--set", "loss.lam_adv=0.1", "--set", "train.epochs=3"]
                                    + (["--", "python", "x.py"] if name == "submit" else []))
    assert args.sets == ["loss.lam_adv=0.1", "train.epochs=3"]


def test_set_values_are_typed_by_the_schema_and_applied_last():
    cfg = load_config(None, {"train.epochs": 7}, ["train.epochs=3", "loss.lam_adv=0.1", "cv.folds=[0, 2]",
                                                  "schedule.decay=cosine", "train.amp=false"])
    assert (cfg.train.epochs, cfg.loss.lam_adv, cfg.cv.folds) == (3, 0.1, [0, 2])
    assert (cfg.schedule.decay, cfg.train.amp) == ("cosine", False)
    assert parse_sets(["identity.checkpoint=w/a=b.pth"]) == {"identity.checkpoint": "w/a=b.pth"}
    named = load_config(None, sets=["cv.experiment=2024", "cv.tracking.mlflow=5000"])  # text fields stay text
    assert (named.cv.experiment, named.cv.tracking.mlflow) == ("2024", "5000")


@pytest.mark.parametrize("pair, message", [
    ("loss.lam_ad=0.1", r"^--set: loss.lam_ad: unknown field 'lam_ad' \(fields: lam_adv, "),
    ("los.lam_adv=0.1", r"^--set: los.lam_adv: unknown section 'los' \(sections: model, "),
    ("train.epochs=many", r"^--set: train.epochs: Input should be a valid integer.*\(got 'many'\)"),
    ("schedule.decay=linear", r"^--set: schedule.decay: Input should be 'exponential', 'cosine' or 'step'"),
    ("loss.lam_adv=-1", r"^--set: loss.lam_adv: Input should be greater than or equal to 0"),
    ("train.epochs", r"^--set 'train.epochs': expected KEY=VALUE"),
])
def test_a_bad_set_is_a_one_line_error_naming_the_key(pair, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, sets=[pair])
    assert "\n" not in str(err.value)


def test_bad_set_on_the_command_line_exits_2_with_one_line(capsys):
    assert main(["cv", "--dry-run", "--set", "loss.lam_ad=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loss.lam_ad: unknown field" in err


def test_dry_run_plans_with_the_overrides(capsys):
    assert main(["cv", "--dry-run", "--set", "cv.datasets=[ckplus]", "--set", "cv.variants=[original]"]) == 0
    out = capsys.readouterr().out
    assert "10 runs (ckplus x10; variants original)" in out
