"""One config schema for everything: the paper's values are the defaults.

YAML files under ``jobs/configs/`` override these defaults; unknown keys are rejected, and every
validation error is reported as one line naming the file and the field (``ConfigError``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fers_dist.errors import FersError
from fers_dist.io import atomic_write_text

VARIANTS = ("no_mtl", "no_convflu", "original", "fes_da")
DATASETS = ("ckplus", "oulu", "mmi", "bu4dfe")
ALIGNERS = ("landmarks", "fan", "dlib", "center")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"  # the shipped YAML configs
DEMO_YAML = CONFIG_DIR / "demo.yaml"  # the tiny model `fers demo` and the CV/tune benches run


class ConfigError(FersError, ValueError):
    """A config that cannot be used; the message is one line naming the file and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """FERSNet architecture (paper Sec. III)."""

    variant: Literal["no_mtl", "no_convflu", "original", "fes_da"] = "original"
    width: int = Field(256, ge=4, description="filters per conv layer (paper: 256)")
    input_size: int = Field(96, ge=16, description="crop fed to the network (paper: 96)")
    in_channels: Literal[1, 3] = 1
    cls_hidden: int = Field(512, ge=8, description="hidden units of the 2-layer f_cls")
    share_convflu: bool = Field(False, description="reuse one ConvFLU pair at every position")
    capacity_match: Literal["depth", "width"] = Field(
        "depth", description="how no_mtl and no_convflu reach FERSNet's parameter count: depth (the paper: 5x5 "
                             "kernels and more convs per block) or width (wider layers)")
    disc_width: int = Field(64, ge=4, description="PatchGAN base filters")
    disc_layers: int = Field(3, ge=1, le=5)

    @field_validator("input_size")
    @classmethod
    def _divisible(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be divisible by 16 (4 poolings), got {v}")
        return v


class LossConfig(_Section):
    """Loss weights of eq. 10: L = L_cls + λ1 L_GAN + λ2 L_rec + λ3 L_cyc + λ4 L_idt."""

    lam_adv: float = Field(0.3, ge=0, description="λ1, GAN")
    lam_rec: float = Field(1.0, ge=0, description="λ2, reconstruction")
    lam_cyc: float = Field(0.5, ge=0, description="λ3, cycle")
    lam_idt_start: float = Field(0.1, ge=0, description="λ4 at the first epoch")
    lam_idt_end: float = Field(0.5, ge=0, description="λ4 at the last epoch")
    gan: Literal["bce", "lsgan"] = "bce"
    real_pair: Literal["target", "source"] = Field(
        "target", description="the discriminator's real pair: (I^t, z^t) as eq. 6 writes it, or (I, z), the "
                              "source face and its own label")


class IdentityConfig(_Section):
    """Identity features for L_idt (eq. 9)."""

    backbone: Literal["lightcnn9", "subject_encoder", "none"] = "lightcnn9"
    checkpoint: str | None = Field(None, description="LightCNN-9 checkpoint for backbone=lightcnn9")
    encoder_epochs: int = Field(30, ge=1, description="epochs to train subject_encoder")
    encoder_width: float = Field(1.0, gt=0, le=1, description="width multiplier of subject_encoder")


class ScheduleConfig(_Section):
    """Learning rate decays from lr_start to lr_end over the epochs."""

    lr_start: float = Field(1e-3, gt=0)
    lr_end: float = Field(1e-5, gt=0)
    decay: Literal["exponential", "cosine", "step"] = "exponential"
    step_count: int = Field(4, ge=1, description="number of drops for decay=step")

    @model_validator(mode="after")
    def _order(self) -> ScheduleConfig:
        if self.lr_end > self.lr_start:
            raise ValueError(f"lr_end ({self.lr_end}) must not exceed lr_start ({self.lr_start})")
        return self


class OptimConfig(_Section):
    """Adam (the paper). Betas follow pix2pix, whose discriminator FERSNet uses."""

    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class TrainConfig(_Section):
    epochs: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=2)
    d_steps: int = Field(1, ge=1, description="discriminator steps per generator step")
    seed: int = 0
    checkpoint_every: int = Field(10, ge=1, description="epochs between checkpoints")
    log_every: int = Field(50, ge=1, description="steps between host syncs for logging")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    amp: bool = Field(True, description="bf16 autocast on CUDA")
    cpu_amp: bool = Field(False, description="bf16 autocast on a CPU with bf16 units (AMX or AVX512-BF16: faster "
                                             "convolutions, measured in docs/BENCHMARKS.md); other CPUs stay float32")
    channels_last: bool = Field(True, description="NHWC activations and weights (faster on CUDA and CPU)")
    compile: bool = Field(False, description="torch.compile the generator (one graph per step; off until "
                                             "fers bench gpu measures it faster on your card)")
    cudnn_benchmark: bool = Field(True, description="CUDA: let cuDNN autotune conv algorithms (input shapes "
                                                    "never change within a run)")
    tf32: bool = Field(True, description="CUDA: TF32 tensor cores for the float32 matmuls/convs left outside "
                                         "bf16 autocast")
    fused_adam: bool = Field(True, description="one fused Adam kernel per optimiser step (CUDA and CPU); "
                                               "false: the foreach implementation")
    expandable_segments: bool = Field(True, description="CUDA: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                                                        "(less fragmentation), unless already set")
    inner_val_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of TRAINING subjects held out for early stopping"
    )
    early_stopping_patience: int | None = Field(None, ge=1)
    fes_da_epochs: int = Field(50, ge=1, description="fine-tuning epochs of the fes_da variant")
    fes_da_lr: float = Field(1e-4, gt=0)
    init_from: str | None = Field(
        None, description="start every fold from a pre-trained FERSNet: 'pretrained' (what `fers pretrain` trained "
                          "on BU-4DFE under this config) or a checkpoint path/URI; rows are tagged 'pretrained'")
    pretrain_epochs: int | None = Field(None, ge=1, description="epochs of `fers pretrain` (None: train.epochs)")


class DataConfig(_Section):
    root: str = Field("data", description="folder holding <dataset>/faces.parquet")
    aligner: Literal["landmarks", "fan", "dlib", "center"] = "landmarks"
    aligned_size: int = Field(110, ge=16, description="aligned face size (paper: 110)")
    channels: Literal[1, 3] = Field(1, description="1: gray faces; 3: colour (Oulu-CASIA VL is colour) through "
                                                   "prepare, Parquet, training and the synthesis grids")
    rotations: list[float] = Field(default_factory=lambda: [-15, -10, -5, 0, 5, 10, 15])
    mirror: bool = True
    n_folds: int = Field(10, ge=2)
    fold_seed: int = 0


class TrackingConfig(_Section):
    mlflow: str | None = Field(None, description="MLflow tracking URI (http://host:5000, sqlite:///mlflow.db)")


class CVConfig(_Section):
    experiment: str = Field("paper", pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str = Field("results", description="local path or pyarrow URI (s3://, gs://)")
    datasets: list[Literal["ckplus", "oulu", "mmi", "bu4dfe"]] = Field(
        default_factory=lambda: ["ckplus", "oulu", "mmi"]
    )
    variants: list[Literal["no_mtl", "no_convflu", "original", "fes_da"]] = Field(
        default_factory=lambda: list(VARIANTS)
    )
    folds: list[int] | Literal["all"] = "all"
    workers_per_run: int = Field(1, ge=0, description="0: Train local mode inside the Tune trial")
    gpus_per_run: float = Field(1.0, ge=0, description="fractional values pack runs on one GPU")
    cpus_per_run: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0, description="retries of a failed run, by Train (its workers) and by Tune "
                                                   "(its driver); a retry resumes from the last checkpoint")
    max_gpus: float | None = Field(None, ge=0, description="the most GPUs the cluster can grow to, for planning "
                                   "concurrency; None: read from the autoscaler's config (cluster/README.md)")
    resource_timeout_s: float = Field(900, gt=0, description="how long to wait for the autoscaler's first GPU "
                                                             "nodes before a one-line error")
    driver_resource: str = Field("fers_driver", description="custom resource of the nodes that are never "
                                 "preempted (the head): fold-run drivers ask for a sliver of it; '' turns it off")
    seeds: list[int] | None = Field(
        None, min_length=1, description="repeat every (dataset, variant, fold) once per train.seed listed "
                                        "(GAN training varies with its seed); None: train.seed alone")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="memory of one GPU, for the planner's memory check; None: from the nodes' "
                                "accelerator type (unknown types skip the check with a note)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    shared_filesystem: bool = Field(
        False, description="the local paths (data.root, cv.storage) hold the same files on every node: an NFS "
                           "mount, a per-node copy of the read-only data, or one machine; required for local "
                           "paths on a multi-node cluster or with workers_per_run > 1")


class SearchParam(_Section):
    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low={self.low} high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


def _default_space() -> dict[str, SearchParam]:
    return {
        "loss.lam_adv": SearchParam(type="loguniform", low=0.03, high=3.0),
        "loss.lam_rec": SearchParam(type="loguniform", low=0.1, high=10.0),
        "loss.lam_cyc": SearchParam(type="loguniform", low=0.05, high=5.0),
        "loss.lam_idt_start": SearchParam(type="loguniform", low=0.01, high=1.0),
        "loss.lam_idt_end": SearchParam(type="loguniform", low=0.05, high=5.0),
        "schedule.lr_start": SearchParam(type="loguniform", low=1e-4, high=3e-3),
        "schedule.lr_end": SearchParam(type="loguniform", low=1e-6, high=1e-4),
        "schedule.decay": SearchParam(type="categorical", choices=["exponential", "cosine", "step"]),
    }


class TuneConfig(_Section):
    study: str = Field("fersnet-lambdas", pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str | None = Field(None, description="sqlite:///f.db, a .log journal file, or an RDB URL")
    dataset: Literal["ckplus", "oulu", "mmi", "bu4dfe"] = "oulu"
    variant: Literal["original", "no_convflu", "no_mtl"] = "original"
    trials: int = Field(50, ge=1)
    sampler: Literal["tpe", "random", "cmaes", "nsgaii"] = "tpe"
    pruner: Literal["asha", "none"] = "asha"
    objective: Literal["fer", "fer+fes", "fer-fast"] = "fer"
    inner_folds: int = Field(3, ge=2, description="inner CV folds carved from training subjects")
    outer_fold: int = Field(0, ge=0, description="outer fold whose training subjects are tuned on (one study)")
    outer_folds: list[int] | Literal["all"] | None = Field(
        None, description="nested CV: one study per listed outer fold (<study>-outer<k>), each tuned on that "
                          "fold's training subjects only and evaluated on that fold only; None: one study")
    source_trial: int | None = Field(None, description="set in best.yaml: the study trial this config came from")
    grace_period: int = Field(5, ge=1, description="ASHA: epochs before a trial may be stopped")
    max_concurrent: int | None = Field(None, ge=1)
    space: dict[str, SearchParam] = Field(default_factory=_default_space)
    epochs: int | None = Field(None, ge=1, description="epochs per trial (ASHA max_t); None: train.epochs")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the best 1/reduction_factor per rung")
    precise_bn: bool = Field(True, description="before each inner validation, recompute BatchNorm statistics "
                                               "from the inner TRAINING faces (early epochs otherwise score chance)")
    cpus_per_trial: float | None = Field(None, gt=0, description="CPUs per trial; None: cv.cpus_per_run")
    gpus_per_trial: float | None = Field(None, ge=0, description="GPUs per trial; None: cv.gpus_per_run")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _crop_fits(self) -> Config:
        if self.model.input_size > self.data.aligned_size:
            raise ValueError(
                f"model.input_size ({self.model.input_size}) is larger than "
                f"data.aligned_size ({self.data.aligned_size}): the crop cannot exceed the aligned face"
            )
        if self.model.in_channels != self.data.channels:
            raise ValueError(f"model.in_channels ({self.model.in_channels}) must equal data.channels "
                             f"({self.data.channels}): the network reads the faces as prepared")
        return self

    # -- helpers ------------------------------------------------------------------------------
    def with_overrides(self, flat: dict[str, Any], source: str = "overrides") -> Config:
        """Return a copy with dotted keys replaced, e.g. ``{"loss.lam_adv": 0.1}`` (validated; an error
        names ``source`` and the field)."""
        data = self.model_dump()
        for key, value in flat.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"{source}: {key}: unknown section {p!r} (sections: "
                                      f"{', '.join(type(self).model_fields)})")
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"{source}: {key}: unknown field {leaf!r} (fields: {', '.join(node)})")
            node[leaf] = value
        return parse_config(data, source=source)

    def result_fields(self, mode: str = "python") -> dict:
        """Everything that changes a fold's result: not ``cv``/``tune`` (where and how runs are scheduled),
        not ``data.root``, and of ``identity.checkpoint`` only the file's name, not where this machine keeps
        it (paths are made absolute on the driver, and a job's working folder differs on every submit)."""
        keep = self.model_dump(mode=mode, exclude={"cv", "tune"})
        keep["data"].pop("root")
        ck = keep["identity"]["checkpoint"]
        keep["identity"]["checkpoint"] = Path(ck).name if ck else ck
        return keep

    def hash(self) -> str:
        """Hash of :meth:`result_fields` without the variant (fes_da reuses its original's checkpoints)."""
        keep = self.result_fields()
        keep["model"].pop("variant")
        blob = json.dumps(keep, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs (dotted keys) as overrides; a value is read as YAML (``0.3``, ``true``,
    ``[0, 1]``) unless its field holds text, then typed and checked by :meth:`Config.with_overrides`."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. --set loss.lam_adv=0.1")
        key = key.strip()
        try:  # a text field keeps the text as written (--set cv.experiment=2024 stays "2024")
            out[key] = text if _wants_text(key) or not text.strip() else yaml.safe_load(text)
        except yaml.YAMLError:
            out[key] = text
    return out


def add_set_argument(p) -> None:
    """The ``--set KEY=VALUE`` option every config-driven command takes (repeatable, applied last)."""
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="override one config field (dotted key, e.g. --set loss.lam_adv=0.1 --set "
                        "train.epochs=50); repeatable, applied after --config and the other flags, and "
                        "recorded in every row's config")


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (not in the schema)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_config(data: dict | None, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _wants_text(key: str) -> bool:
    """Whether the schema field at dotted ``key`` holds text (so ``--set cv.experiment=2024`` stays a str)."""
    model: Any = Config
    for part in key.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return model is str or model == (str | None)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> Config:
    """Load a YAML config over the paper defaults (``None`` gives the defaults), then ``overrides`` (the
    commands' own flags), then ``sets`` (``--set KEY=VALUE`` pairs)."""
    if path is None:
        cfg = Config()
    else:
        cfg = parse_config(read_yaml(path), source=str(path))
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    return cfg.with_overrides(parse_sets(sets), source="--set") if sets else cfg


def read_yaml(path: str | os.PathLike) -> dict | None:
    """A config file's mapping of sections (None if empty); unreadable or invalid YAML, or another top
    level, is a one-line ConfigError naming the file (and the line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full config as YAML atomically (temporary file, then rename)."""
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def num_classes(dataset: str) -> int:
    """E in the paper: 7 on CK+ (with contempt), 6 elsewhere."""
    return 7 if dataset == "ckplus" else 6
