"""`fers train`: one fold of one variant in plain PyTorch, with a result JSON as its last stdout line,
resume from its own checkpoints, --set overrides, and one-line errors."""

from __future__ import annotations

import json

from fers_dist.cli import main
from fers_dist.config import DEMO_YAML
from fers_dist.results import result_row


def _train(prepared_data, out, *extra):
    return main(["train", "--config", str(DEMO_YAML), "--data", str(prepared_data), "--dataset", "ckplus",
                 "--fold", "3", "--variant", "original", "--out", str(out), "--set", "train.epochs=2",
                 "--set", "identity.backbone=none", *extra])


def test_one_fold_prints_a_folds_parquet_row_and_resumes(prepared_data, tmp_path, capsys):
    assert _train(prepared_data, tmp_path / "run") == 0
    out, err = capsys.readouterr()
    row = json.loads(out.strip().splitlines()[-1])
    fields = set(result_row({"dataset": "x", "variant": "y", "fold": 0}, experiment="e"))
    assert fields <= set(row) and {"torch_version", "git_commit", "hostname"} <= set(row)
    assert 0 <= row["accuracy"] <= 1 and row["epochs_run"] == 2 and row["fold"] == 3
    assert json.loads(row["config"])["train"]["epochs"] == 2 and "ckplus-original-f3" in err
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == row
    assert (tmp_path / "run" / "main.pt").is_file()

    assert _train(prepared_data, tmp_path / "run") == 0  # the same command again: resumed, not retrained
    out, err = capsys.readouterr()
    again = json.loads(out.strip().splitlines()[-1])
    assert "resumed from" in err and again["accuracy"] == row["accuracy"] and again["history"] == row["history"]


def test_bad_fold_or_set_is_one_line(prepared_data, tmp_path, capsys):
    assert _train(prepared_data, tmp_path / "r", "--fold", "12") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if "error:" in e]) == 1 and "fold" in err[-1]
    assert _train(prepared_data, tmp_path / "r", "--set", "train.epoch=2") == 2
    assert "--set: train.epoch: unknown field" in capsys.readouterr().err
