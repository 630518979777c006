"""One typed config tree for every job: defaults, the job's and the method's defaults, a YAML file, flags, `--set`.

The tree is `Config` (pipeline/sections.py): fixed sections plus one section per registered method
(`moco.queue_size`, `forecast.mode`, …) generated from the method's keyword-only constructor options, so a
method's defaults and types are written down once, in its own file. Three jobs read it: `images`
(`streamssl run` with an image method), `series` (`streamssl run --method forecast|cpc`) and `forecast`
(`streamssl forecast`). Every schedule is in steps or seconds (a stream has no epochs).

`load_config` refuses, with a `ConfigError` whose message fits on one line: unknown keys, values of the
wrong type or outside a `Literal`'s choices, out-of-range values, and keys the job does not read set away
from their default (a silently ignored setting is a bug report waiting to happen); `data.source` is parsed
(`pipeline.loading.sources.parse_source`; a malformed one is a `SourceError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from streamssl.models.backbones import is_image_backbone
from streamssl.models.registry import SERIES_METHODS
from streamssl.pipeline.sections import (
    ALL_METHODS,
    AugmentConfig,
    AuxConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    KafkaConfig,
    MethodOptions,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    PublishConfig,
    ReplayConfig,
    SeriesConfig,
    TrainConfig,
)

__all__ = ["AugmentConfig", "AuxConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistillConfig",
           "EvalConfig", "Job", "KafkaConfig", "MethodOptions", "MetricsConfig", "ModelConfig", "OptimConfig",
           "PublishConfig", "ReplayConfig", "SeriesConfig", "TrainConfig", "job_of", "load_config", "to_dict"]

Job = Literal["images", "series", "forecast"]


class ConfigError(Exception):
    """A bad config key or value; the CLI prints it as one line."""


DEMO_MINUTES = 5.0  # the budget of a run on the embedded demo data (and of `streamssl forecast`) that sets none

# Defaults of a job where they differ from the tree's; like a method's recipe, they yield to anything set.
JOB_DEFAULTS: dict[Job, dict[str, Any]] = {
    "series": {},
    "images": {},
    # offline: validation checks (and checkpoints) every 100 steps, only these; publish the best model at the end
    "forecast": {"method": "forecast", "run_dir": "", "train.max_steps": 3000, "train.max_minutes": DEMO_MINUTES,
                 "eval.every_steps": 100,
                 "eval.every_seconds": 0.0, "checkpoint.every_steps": 100, "checkpoint.every_seconds": 0.0,
                 "checkpoint.publish_every": 0, "metrics.port": 0},
}
# The keys each job reads (a section name = all of it), besides the method's own section.
_LOOP = ("method", "run_dir", "checkpoint", "publish", "metrics", "log", "train.max_steps", "train.max_minutes",
         "train.device", "train.seed", "train.deterministic", "train.log_every_seconds", "train.log_format",
         "train.nan_rollback_after", "train.max_rollbacks", "eval.every_steps", "eval.every_seconds")
_OFFLINE_ONLY = ("series.points", "series.train_fraction", "series.val_fraction", "series.patience", "series.cache_dir",
                 "series.weight_decay")
_CONTINUOUS_ONLY = ("series.series_column", "series.warmup_points", "series.history", "series.points_per_step",
                    "series.eval_points", "series.processes", "series.max_series")
APPLIES: dict[Job, tuple[str, ...]] = {
    "images": ("method", "run_dir", "data", "kafka", "model", "augment", "optim", "train", "checkpoint", "publish", "eval",
               "metrics", "log", "aux", "replay", "distill", "drift"),
    "series": (*_LOOP, "train.audit_keys", "data.source", "data.mode", "data.poll_seconds", "kafka", "series"),
    "forecast": (*_LOOP, "data.source", "series"),
}
_NOT_FOR: dict[Job, tuple[str, ...]] = {"images": (), "series": _OFFLINE_ONLY, "forecast": _CONTINUOUS_ONLY}


def job_of(cfg: Config) -> Job:
    """The `streamssl run` job of the config's method."""
    return "series" if cfg.method in SERIES_METHODS else "images"


def applies(key: str, job: Job, method: str) -> bool:
    """Whether `job` running `method` reads `key` (dotted)."""
    section = key.partition(".")[0]
    if section in ALL_METHODS:
        return section == method
    if any(key == k or key.startswith(k + ".") for k in _NOT_FOR[job]):
        return False
    return any(key == k or key.startswith(k + ".") for k in APPLIES[job])


# --- reading values -----------------------------------------------------------------------------
def _convert(value: Any, hint: Any, key: str) -> Any:
    """Checks/converts one YAML value against a dataclass field type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            value = [value]
        return [_convert(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _hints(node: Any) -> dict[str, Any]:
    return {name: hint for name, hint in typing.get_type_hints(type(node)).items()
            if typing.get_origin(hint) is not typing.ClassVar}


def _set(node: Any, dotted: str, value: Any, prefix: str = "") -> None:
    name, _, rest = dotted.partition(".")
    hints = _hints(node)
    if name not in hints:
        full = prefix + name
        close = difflib.get_close_matches(full, [prefix + n for n in hints], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix + dotted}'{hint}")
    current = getattr(node, name)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, prefix + name + ".")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix + name}: expected a mapping")
        for sub, sub_value in value.items():
            _set(current, str(sub), sub_value, prefix + name + ".")
        return
    if rest:
        raise ConfigError(f"unknown config key '{prefix + dotted}' ({prefix + name} is not a section)")
    setattr(node, name, _convert(value, hints[name], prefix + name))


def _dotted_keys(key: str, value: Any) -> set[str]:
    """`optim: {lr: 1}` sets `optim.lr`; the keys a YAML value spells out, dotted."""
    if isinstance(value, dict):
        return {dotted for sub, sub_value in value.items() for dotted in _dotted_keys(f"{key}.{sub}", sub_value)}
    return {key}


def apply_overrides(cfg: Config, overrides: dict[str, Any] | None, sets: list[str] | None,
                    explicit: set[str]) -> None:
    """Explicit overrides (CLI flags; None = not given), then `key=value` strings (values parsed as YAML).
    The keys set are added to `explicit`."""
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(cfg, key, value)
            explicit.update(_dotted_keys(key, value))  # a whole resolved config (Ray workers) sets every key
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set(cfg, key.strip(), value)
        explicit.update(_dotted_keys(key.strip(), value))


def apply_defaults(cfg: Config, job: Job, explicit: set[str]) -> None:
    """The job's, then the method's own defaults (`Method.recipe`), for every key the user did not set."""
    _fill(cfg, JOB_DEFAULTS[job], explicit)
    _fill(cfg, getattr(ALL_METHODS.get(cfg.method), "recipe", {}), explicit)  # after the job's: it may set the method
    if job != "forecast" and not cfg.data.source and not explicit & {"train.max_minutes", "train.max_steps"}:
        # The demo lake cycles for ever: a try-out ends by itself. A run on the user's data goes on until stopped.
        cfg.train.max_minutes = DEMO_MINUTES


def _fill(cfg: Config, defaults: dict[str, Any], explicit: set[str]) -> None:
    for key, value in defaults.items():
        if key not in explicit:
            _set(cfg, key, value)


def _read_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return loaded


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None, job: Job | None = None) -> Config:
    """Defaults ← YAML file ← explicit overrides (CLI flags) ← `key=value` strings, then the job's and the
    method's defaults for what none of them set; validated for `job` (default: the method's `run` job)."""
    cfg, explicit = Config(), set[str]()
    for key, value in (_read_file(path) if path else {}).items():
        _set(cfg, str(key), value)
        explicit.update(_dotted_keys(str(key), value))
    apply_overrides(cfg, overrides, sets, explicit)
    if cfg.method not in ALL_METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(sorted(ALL_METHODS))}")
    job = job or job_of(cfg)
    apply_defaults(cfg, job, explicit)
    validate(cfg, job)
    return cfg


def reference(method: str, job: Job) -> Config:
    """What `method` under `job` gets when nothing is set."""
    cfg = Config(method=method)
    apply_defaults(cfg, job, set())
    return cfg


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """Every value, secrets included: what is written anywhere goes through `redacted`."""
    return dataclasses.asdict(cfg)


# Never written anywhere (config.yaml, checkpoints, Ray's run state, `streamssl config`): kept in memory only.
SECRETS = (("kafka", "sasl_plain_password"), ("publish", "webhook"))  # a webhook URL often carries its token


def redacted(cfg: Config) -> dict[str, Any]:
    """`to_dict(cfg)` with every secret emptied (a run started from it reads the password from the environment)."""
    values = to_dict(cfg)
    for section, key in SECRETS:
        values[section][key] = ""
    return values


def secrets_of(cfg: Config) -> dict[str, str]:
    """The secrets `redacted` leaves out, {"section.key": value}, to hand to another process in memory."""
    return {f"{section}.{key}": getattr(getattr(cfg, section), key) for section, key in SECRETS}


def restore_secrets(cfg: Config, secrets: dict[str, str]) -> None:
    """Puts `secrets_of`'s values back into a config loaded from its redacted form."""
    for section, key in SECRETS:
        setattr(getattr(cfg, section), key, secrets.get(f"{section}.{key}", ""))


# --- the one validator --------------------------------------------------------------------------
def validate(cfg: Config, job: Job) -> None:
    """Refuses keys the job does not read set away from their default, then values out of range."""
    if job == "forecast" and cfg.method != "forecast":
        raise ConfigError(f"`streamssl forecast` trains the forecast method, not {cfg.method!r}")
    if job != "forecast" and (job == "series") != (cfg.method in SERIES_METHODS):
        raise ConfigError(f"method {cfg.method!r} does not run in the {job} job")
    base = flatten(reference(cfg.method, job))
    ignored = [key for key, value in flatten(cfg).items() if value != base[key] and not applies(key, job, cfg.method)]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
                          f"{_JOB_NAMES[job]} with method {cfg.method} (see `streamssl config --show`)")
    if job != "forecast":  # a malformed Kafka URL or Ray spec fails here, before anything is built
        from streamssl.pipeline.loading.sources import parse_source

        parse_source(cfg.data.source)
    from streamssl.pipeline.notify import check_targets
    from streamssl.pipeline.tensorboard_log import check_tensorboard

    check_targets(cfg)
    check_tensorboard(cfg, job)
    t, c = cfg.train, cfg.checkpoint
    at_least_one: dict[str, float] = {"checkpoint.keep": c.keep, "train.nan_rollback_after": t.nan_rollback_after}
    at_least_zero: dict[str, float] = {"train.max_steps": t.max_steps, "train.max_minutes": t.max_minutes,
                     "checkpoint.every_steps": c.every_steps, "checkpoint.every_seconds": c.every_seconds,
                     "checkpoint.publish_every": c.publish_every, "eval.every_steps": cfg.eval.every_steps,
                     "eval.every_seconds": cfg.eval.every_seconds, "train.max_rollbacks": t.max_rollbacks,
                     **{f"publish.{key}": getattr(cfg.publish, key) for key in PUBLISH_AT_LEAST_ZERO}}
    if job == "images":
        d = cfg.data
        at_least_one.update({"train.batch_size": t.batch_size, "data.size": d.size, "data.channels": d.channels,
                             "eval.k": cfg.eval.k, "model.bn_splits": cfg.model.bn_splits,
                             "data.prefetch_batches": d.prefetch_batches})
        at_least_zero["data.max_record_bytes"] = d.max_record_bytes
        if len(d.mean) != d.channels or len(d.std) != d.channels:
            raise ConfigError("data.mean and data.std need one value per channel (data.channels)")
        if not is_image_backbone(cfg.model.backbone):
            raise ConfigError(f"model.backbone: {cfg.model.backbone!r} is not one of convnet, resnet18, torchvision:NAME, "
                              "package.module:factory")
        if t.batch_size % cfg.model.bn_splits:
            raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by model.bn_splits")
        if not 0 < cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[-1] <= 1:
            raise ConfigError("augment.crop_scale must be [min, max] with 0 < min <= max <= 1")
        if cfg.eval.dataset == "fashion-mnist" and d.channels != 1 and not cfg.eval.data:
            raise ConfigError("eval.dataset fashion-mnist needs data.channels 1 (set eval.data or eval.dataset none)")
        _validate_eval_data(cfg, at_least_zero)
        _validate_replay(cfg, at_least_one, at_least_zero)
    else:
        _validate_series(cfg, job, at_least_one, at_least_zero)
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    negative = [key for key, value in at_least_zero.items() if value < 0]
    if negative:
        raise ConfigError(f"{', '.join(negative)} must be >= 0")


PUBLISH_AT_LEAST_ZERO = ("tolerance", "min_std_ratio", "keep", "keep_every", "keep_candidates", "retries")
_JOB_NAMES: dict[Job, str] = {"images": "an image run", "series": "a series run", "forecast": "`streamssl forecast`"}


def _validate_replay(cfg: Config, at_least_one: dict[str, float], at_least_zero: dict[str, float]) -> None:
    replay, splits = cfg.replay, cfg.model.bn_splits
    at_least_zero.update({"replay.capacity": replay.capacity, "distill.weight": cfg.distill.weight})
    at_least_one["distill.every_steps"] = cfg.distill.every_steps
    if not 0 <= replay.share < 1:
        raise ConfigError(f"replay.share must be in [0, 1), got {replay.share}")
    replayed = replayed_per_step(cfg)
    if replay.capacity and (replayed % splits or (cfg.train.batch_size - replayed) % splits):
        raise ConfigError(f"replay.share {replay.share} of train.batch_size {cfg.train.batch_size} gives {replayed} "
                          f"replayed + {cfg.train.batch_size - replayed} arriving records: both must be divisible by "
                          f"model.bn_splits {splits}")


def _validate_eval_data(cfg: Config, at_least_zero: dict[str, float]) -> None:
    from streamssl.pipeline.evaluation.eval_data import parse_label_field

    parse_label_field(cfg.eval.label_field)
    at_least_zero.update({"drift.window": cfg.drift.window, "eval.bank_size": cfg.eval.bank_size,
                          "eval.test_size": cfg.eval.test_size})
    if cfg.drift.folds < 2:  # one to fit on, one held out
        raise ConfigError(f"drift.folds must be at least 2, got {cfg.drift.folds}")
    if not 0.5 <= cfg.drift.threshold < 1:
        raise ConfigError(f"drift.threshold is an AUC in [0.5, 1), got {cfg.drift.threshold}")


def replayed_per_step(cfg: Config) -> int:
    """Records of each training batch drawn from the replay buffer (0 without one)."""
    return round(cfg.train.batch_size * cfg.replay.share) if cfg.replay.capacity else 0


def _validate_series(cfg: Config, job: Job, at_least_one: dict[str, float], at_least_zero: dict[str, float]) -> None:
    s, options = cfg.series, cfg.method_options()
    at_least_one.update({"series.window": s.window, "series.lag": s.lag, "series.horizon": s.horizon,
                         "series.batch_size": s.batch_size, "series.max_imfs": s.max_imfs, "series.trials": s.trials})
    at_least_zero.update({"series.noise_width": s.noise_width, "series.threads": s.threads})
    if cfg.method == "forecast":
        at_least_one["forecast.hidden"] = options["hidden"]
        at_least_zero["forecast.aux_weight"] = options["aux_weight"]
    if s.lr <= 0:
        raise ConfigError(f"series.lr must be > 0, got {s.lr}")
    if s.lag > s.window:
        raise ConfigError(f"series.lag {s.lag} must not exceed series.window {s.window}")
    if job == "forecast":
        at_least_zero.update({"series.points": s.points, "series.patience": s.patience,
                              "series.weight_decay": s.weight_decay})
        if min(s.train_fraction, s.val_fraction) <= 0 or s.train_fraction + s.val_fraction >= 1:
            raise ConfigError("series.train_fraction and series.val_fraction must be > 0 and sum to less than 1 "
                              "(the test set)")
        if not (cfg.train.max_steps or cfg.train.max_minutes or s.patience):
            raise ConfigError("train.max_steps, train.max_minutes and series.patience are all 0: training would "
                              "never stop")
        if not cfg.eval.every_steps or cfg.eval.every_seconds:
            raise ConfigError("`streamssl forecast` checks validation by steps only: eval.every_steps >= 1 and "
                              "eval.every_seconds 0")
        return
    at_least_one.update({"series.points_per_step": s.points_per_step, "series.max_series": s.max_series})
    if s.eval_points < 2:
        raise ConfigError(f"series.eval_points must be at least 2, got {s.eval_points}")
    if not s.window <= s.warmup_points:
        raise ConfigError(f"need series.window <= series.warmup_points, got {s.window}, {s.warmup_points}")
    if cfg.method == "cpc" and s.history < s.window:
        raise ConfigError(f"series.history {s.history} must be at least series.window {s.window}")
