"""The tuning search space: ``tune.space`` maps dotted config keys (``loss.lam_adv``) to a SearchParam.

Ray-free and Optuna-light (Optuna is imported inside functions). Every key must be a field of the config
schema that changes what a trial trains; bounds and choices are validated against that field's own
constraints, and the config being tuned (the paper's values by default) must lie inside the space,
because it is enqueued as the study's first trial.

Cross-field rules, above all ``schedule.lr_end <= schedule.lr_start``, cannot be expressed as
independent ranges. We keep the space as declared and REJECT points that break a rule: the searcher
records such a point as a FAILED Optuna trial with ``stop_reason=invalid_config`` and the validation
message, and draws again (no Ray trial is spent on it). :func:`check_feasible` refuses a space in
which no random point is valid.
"""

from __future__ import annotations

import json
import math
import random
from typing import Annotated, Any

from fers_dist.config import Config, ConfigError, SearchParam

# Keys that must not be tuned: they define the protocol (data, folds, epochs) or where things live.
FORBIDDEN = {
    "model.variant": "set tune.variant instead",
    "model.input_size": "the crop is part of the protocol",
    "model.in_channels": "the prepared data fixes it",
    "train.epochs": "set tune.epochs instead (ASHA's max_t)",
    "train.seed": "seeds are not hyperparameters",
    "train.device": "not a hyperparameter",
    "train.inner_val_fraction": "fers tune runs its own nested CV (tune.inner_folds)",
    "train.early_stopping_patience": "ASHA does the stopping",
}
FORBIDDEN_SECTIONS = {"cv": "where results go", "tune": "the study itself", "data": "the data and folds"}


def _field(key: str):
    """The pydantic FieldInfo of a dotted key, or a ConfigError naming it."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{key!r} is not a config field (expected section.field, e.g. loss.lam_adv)")
    section, leaf = parts
    if section not in Config.model_fields:
        raise ConfigError(f"{key!r} is not a config field (unknown section {section!r})")
    model = Config.model_fields[section].annotation
    if leaf not in model.model_fields:
        raise ConfigError(f"{key!r} is not a config field (section {section!r} has no field {leaf!r})")
    if section in FORBIDDEN_SECTIONS:
        raise ConfigError(f"{key!r} cannot be tuned ({section}: {FORBIDDEN_SECTIONS[section]})")
    if key in FORBIDDEN:
        raise ConfigError(f"{key!r} cannot be tuned ({FORBIDDEN[key]})")
    return model.model_fields[leaf]


def _check_value(key: str, field, value: Any, what: str) -> None:
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{what}={value!r} is not a valid value for {key}: {msg}") from None


def get_value(cfg: Config, key: str) -> Any:
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)


def check_space(cfg: Config, source: str = "<config>") -> None:
    """Validate ``cfg.tune.space`` against the schema; raises ConfigError naming the key."""
    space = cfg.tune.space
    if not space:
        raise ConfigError(f"{source}: tune.space: the search space is empty")
    for key, p in space.items():
        where = f"{source}: tune.space.{key}"
        try:
            field = _field(key)
            if p.type == "categorical":
                for c in p.choices:
                    if not (c is None or isinstance(c, (bool, int, float, str))):
                        raise ConfigError(f"choice {c!r} is not a scalar (Optuna stores None/bool/int/float/str)")
                    _check_value(key, field, c, "choice")
                if len(set(map(repr, p.choices))) != len(p.choices):
                    raise ConfigError(f"choices {p.choices} repeat a value")
            else:
                if p.type == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
                    raise ConfigError(f"int range needs whole-number bounds, got low={p.low} high={p.high}")
                for what, v in (("low", p.low), ("high", p.high)):
                    _check_value(key, field, int(v) if p.type == "int" else v, what)
            _check_baseline(key, p, get_value(cfg, key))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _check_baseline(key: str, p: SearchParam, value: Any) -> None:
    msg = "the config's value {!r} (the baseline, enqueued as the study's first trial) is outside the space"
    if p.type == "categorical":
        if value not in p.choices:
            raise ConfigError(msg.format(value) + f" {p.choices}")
    elif not p.low <= value <= p.high:
        raise ConfigError(msg.format(value) + f" [{p.low}, {p.high}]")


def distributions(space: dict[str, SearchParam]) -> dict:
    """``tune.space`` as Optuna distributions, keyed by the dotted config key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, p in space.items():
        if p.type == "categorical":
            out[key] = CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[key] = IntDistribution(int(p.low), int(p.high))
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    return out


def suggest(trial, space: dict[str, SearchParam]) -> dict[str, Any]:
    """Ask an Optuna trial for every key of ``space`` (plain Optuna; the same distributions as Ray's)."""
    return {key: _suggest_one(trial, key, p) for key, p in space.items()}


def _suggest_one(trial, key: str, p: SearchParam) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(key, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high))
    return trial.suggest_float(key, p.low, p.high, log=p.type == "loguniform")


def baseline(cfg: Config) -> dict[str, Any]:
    """The tuned config's own values of every searched key: the study's first (enqueued) trial."""
    return {key: get_value(cfg, key) for key in cfg.tune.space}


def point_error(cfg: Config, params: dict[str, Any]) -> str | None:
    """None when ``params`` give a valid config, else the one-line validation message."""
    try:
        cfg.with_overrides(params)
    except ConfigError as e:
        return str(e).removeprefix("overrides: ")
    return None


def random_point(space: dict[str, SearchParam], rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            out[key] = rng.choice(p.choices)
        elif p.type == "int":
            out[key] = rng.randint(int(p.low), int(p.high))
        elif p.type == "loguniform":
            out[key] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
        else:
            out[key] = rng.uniform(p.low, p.high)
    return out


def check_feasible(cfg: Config, source: str = "<config>", draws: int = 200, seed: int = 0) -> float:
    """Share of random points that give a valid config; raises ConfigError when none does."""
    rng = random.Random(seed)
    errors = [point_error(cfg, random_point(cfg.tune.space, rng)) for _ in range(draws)]
    bad = [e for e in errors if e]
    if len(bad) == draws:
        raise ConfigError(f"{source}: tune.space: none of {draws} random points gives a valid config "
                          f"(e.g. {bad[0]}); narrow the ranges")
    return 1 - len(bad) / draws


def space_signature(space: dict[str, SearchParam]) -> str:
    """Canonical JSON of the space: stored in the study so a rerun with another space is caught."""
    return json.dumps({k: space[k].model_dump(exclude_none=True) for k in sorted(space)}, sort_keys=True)
