"""Config schema: paper defaults, YAML round trip, and one-line validation errors naming the field."""

from pathlib import Path

import pytest

from fers_dist.config import Config, ConfigError, dump_config, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_paper_defaults():
    cfg = Config()
    assert (cfg.model.width, cfg.model.input_size, cfg.data.aligned_size) == (256, 96, 110)
    assert (cfg.loss.lam_adv, cfg.loss.lam_rec, cfg.loss.lam_cyc) == (0.3, 1.0, 0.5)
    assert (cfg.loss.lam_idt_start, cfg.loss.lam_idt_end) == (0.1, 0.5)
    assert (cfg.schedule.lr_start, cfg.schedule.lr_end, cfg.train.epochs) == (1e-3, 1e-5, 500)
    assert cfg.train.batch_size == 64 and cfg.data.n_folds == 10
    assert cfg.data.rotations == [-15, -10, -5, 0, 5, 10, 15]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / name)
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "space" else {f"{prefix}{k}": v})
    return out


PAPER_YAML_DIFFERS = {"identity.checkpoint", "data.aligner", "cv.gpus_per_run"}  # its header lists each


def test_paper_yaml_equals_the_schema_defaults_except_what_its_header_lists():
    """Every field, not a chosen few: paper.yaml claims the schema defaults are the paper's values."""
    path = CONFIGS / "paper.yaml"
    paper, default = _flat(load_config(path).model_dump()), _flat(Config().model_dump())
    assert paper.keys() == default.keys()
    differs = {k for k in paper if paper[k] != default[k]}
    assert differs == PAPER_YAML_DIFFERS
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for key in differs | {"train.amp"}:  # train.amp equals the default but differs from the paper's float32
        assert f"#   {key}" in header, key
    assert "float32" in header and load_config(path).train.amp is True


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"loss": {"lam_adv": -0.1}}, "loss.lam_adv", "greater than or equal to 0"),
        ({"schedule": {"lr_start": 1e-4, "lr_end": 1e-3}}, "schedule", "must not exceed lr_start"),
        ({"model": {"input_size": 128}}, "<root>", "larger than data.aligned_size"),
        ({"model": {"variant": "bogus"}}, "model.variant", "'original'"),
        ({"model": {"widht": 8}}, "model.widht", "unknown key"),
        ({"modle": {}}, "modle", "unknown key"),
        ({"tune": {"space": {"loss.lam_adv": {"type": "loguniform", "low": 1, "high": 0.1}}}},
         "tune.space.loss.lam_adv", "inverted range"),
    ],
)
def test_validation_errors_name_the_field(data, field, words, tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}:")
    assert words in msg


def test_bad_yaml_is_one_line_with_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  width: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ invalid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_validated():
    cfg = Config().with_overrides({"loss.lam_adv": 0.1, "schedule.decay": "cosine"})
    assert cfg.loss.lam_adv == 0.1 and cfg.schedule.decay == "cosine"
    with pytest.raises(ConfigError, match="loss.lam_adv"):
        Config().with_overrides({"loss.lam_adv": -1})
    with pytest.raises(ConfigError, match="unknown field"):
        Config().with_overrides({"loss.nope": 1})


def test_hash_ignores_storage_but_not_lambdas():
    a = Config()
    assert a.hash() == parse_config({"cv": {"storage": "/elsewhere"}}).hash()
    assert a.hash() != a.with_overrides({"loss.lam_adv": 0.31}).hash()


def test_every_path_field_is_resolved_on_the_driver(tmp_path):
    """Ray trials and workers chdir into their run folders: relative paths are made absolute against the
    driver's working directory before anything starts, URIs stay, a missing checkpoint names its field."""
    from fers_dist.paths import resolve_paths

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "lcnn.pth").write_bytes(b"x")
    cfg = Config().with_overrides({"identity.checkpoint": "w/lcnn.pth", "data.root": "data",
                                   "cv.storage": "results"})
    out = resolve_paths(cfg, base=tmp_path)
    assert out.identity.checkpoint == str(tmp_path / "w" / "lcnn.pth")
    assert (out.data.root, out.cv.storage) == (str(tmp_path / "data"), str(tmp_path / "results"))
    remote = resolve_paths(cfg.with_overrides({"cv.storage": "s3://b/r"}), base=tmp_path)
    assert remote.cv.storage == "s3://b/r"
    # the result's identity does not depend on where the driver ran: same hash from any working folder
    assert out.hash() == cfg.hash() == resolve_paths(cfg, base=tmp_path / "w" / "..").hash()
    mlflow = {u: resolve_paths(cfg.with_overrides({"cv.tracking.mlflow": u}), base=tmp_path).cv.tracking.mlflow
              for u in ("sqlite:///m.db", "mlruns", "http://127.0.0.1:5000", "sqlite:////abs/m.db")}
    assert mlflow == {"sqlite:///m.db": f"sqlite:///{tmp_path}/m.db", "mlruns": str(tmp_path / "mlruns"),
                      "http://127.0.0.1:5000": "http://127.0.0.1:5000", "sqlite:////abs/m.db": "sqlite:////abs/m.db"}
    with pytest.raises(ConfigError, match=r"^identity.checkpoint: 'w/none.pth' not found \(resolved on the driver"):
        resolve_paths(cfg.with_overrides({"identity.checkpoint": "w/none.pth"}), base=tmp_path)
    # the checkpoint only matters where it is used
    assert resolve_paths(cfg.with_overrides({"identity.checkpoint": "w/none.pth", "identity.backbone": "none"}),
                         base=tmp_path).identity.checkpoint == "w/none.pth"
