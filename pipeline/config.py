"""One typed config tree for a run: defaults here, then a YAML file, then `--set key=value`.

Every schedule is in steps or seconds (a stream has no epochs). Unknown keys and values of the
wrong type are refused with a `ConfigError` whose message fits on one line. Each method gets a
section named after it (`moco.queue_size`, `swav.epsilon`, …) generated from its keyword-only
constructor options, so a method's defaults and types are written down once, in its own file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamssl.models.registry import METHODS, SERIES_METHODS
from streamssl.monitoring.metrics import DEFAULT_METRICS_PORT


class ConfigError(Exception):
    """A bad config key or value; the CLI prints it as one line."""


@dataclass
class DataConfig:
    source: str = ""  # shard dir, brace pattern or URL; "" = the embedded Fashion-MNIST lake
    mode: str = "auto"  # cycle | once | follow; auto = follow for a directory, cycle otherwise
    shuffle_buffer: int = 2048  # records; part of the stream position, so resume stays exact
    poll_seconds: float = 2.0  # follow mode: how often to look for new shards
    image_field: str = "png"  # which extension of a record holds the image (png / jpg / jpeg)
    channels: int = 1
    size: int = 28  # images are decoded and resized to size x size
    mean: list[float] = field(default_factory=lambda: [0.286])  # Fashion-MNIST train statistics
    std: list[float] = field(default_factory=lambda: [0.353])
    prefetch_batches: int = 4


@dataclass
class KafkaConfig:
    """Client settings for `--data kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=G]`, passed through to kafka-python."""

    group: str = "streamssl"  # consumer group (the URL's ?group= wins); --workers N commit to it too
    client_id: str = "streamssl"
    auto_offset_reset: str = "earliest"  # where a new group starts on a partition with no committed offset
    session_timeout_ms: int = 10000
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = ""  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | OAUTHBEARER
    sasl_plain_username: str = ""
    sasl_plain_password: str = ""  # prefer the STREAMSSL_KAFKA_PASSWORD environment variable
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    dead_letter_topic: str = ""  # undecodable records are also produced here ("" = dead-letter file only)

    def client_options(self) -> dict[str, Any]:
        """kafka-python keyword arguments: only the ones set, so the client's own defaults stay in force."""
        options: dict[str, Any] = {"client_id": self.client_id, "security_protocol": self.security_protocol}
        password = os.environ.get("STREAMSSL_KAFKA_PASSWORD", self.sasl_plain_password)
        for name, value in (("sasl_mechanism", self.sasl_mechanism), ("sasl_plain_username", self.sasl_plain_username),
                            ("sasl_plain_password", password), ("ssl_cafile", self.ssl_cafile),
                            ("ssl_certfile", self.ssl_certfile), ("ssl_keyfile", self.ssl_keyfile)):
            if value:
                options[name] = value
        return options


@dataclass
class ModelConfig:
    backbone: str = "convnet"  # convnet (CPU default) | resnet18 (for GPUs)
    # split BN in training, so a single device behaves like MoCo's multi-GPU shuffle BN (MoCo's recipe sets 8)
    bn_splits: int = 1


@dataclass
class AugmentConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.333])
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4  # only for 3-channel input
    blur_prob: float = 0.5
    # SimCLR's range for 224 px images, scaled by data.size / 224 (a 28 px image gets sigma 0.0125-0.25 px):
    # the 224 px range applied to 28 px images blurred away most of what there is to learn
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class OptimConfig:
    """Defaults here; a method's `recipe` (in its own file) overrides them unless the user sets the key."""

    name: str = "sgd"  # sgd | lars | adamw; weight decay (and LARS's trust ratio) skip BN and bias parameters
    lr: float = 0.06  # for batch 256; scaled linearly with batch size
    momentum: float = 0.9  # SGD/LARS momentum (AdamW: beta1 stays 0.9)
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05  # linear warm-up over this share of the horizon
    warmup_steps: int = 0  # explicit warm-up steps instead (0 = the fraction; 100 steps for an unbounded run)
    schedule: str = "cosine"  # cosine | constant
    # cosine horizon; 0 = train.max_steps, else estimated from --max-minutes, else none (constant LR)
    total_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    batch_size: int = 256
    max_steps: int = 0  # total for the run dir (a resumed run continues up to it); 0 = no limit
    max_minutes: float = 5.0  # this invocation's wall-clock budget; 0 = no limit
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where the hardware has it natively, else fp32) | fp32 | bf16
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False  # bit-exact CPU resume (torch deterministic algorithms)
    log_every_seconds: float = 10.0
    audit_keys: bool = False  # append each trained batch's record keys to RUN_DIR/trained-keys.jsonl (lineage)
    nan_rollback_after: int = 3  # non-finite losses in a row (each step skipped) before rolling back
    max_rollbacks: int = 3  # rollbacks per invocation before giving up with an error
    # Publish (and monitor) an exponential moving average of the encoder's weights and BN statistics with this
    # decay per step instead of the raw weights (0 = off): an encoder that is good at any moment for a run with
    # no end to anneal to; see the README on week-long runs
    ema_decay: float = 0.0


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    every_seconds: float = 300.0
    keep: int = 3
    publish_every: int = 1  # publish after every N-th checkpoint (and always at the end)


@dataclass
class EvalConfig:
    every_steps: int = 0  # kNN monitor every N steps (0 = by time only)
    every_seconds: float = 120.0  # and every N seconds (0 = by steps only); always at the end and before publishing
    dataset: str = "fashion-mnist"  # fashion-mnist | none
    bank_size: int = 10000  # labelled reference subset of the train split
    test_size: int = 2000  # held-out subset of the test split
    k: int = 200
    temperature: float = 0.1


@dataclass
class MetricsConfig:
    port: int = DEFAULT_METRICS_PORT  # 0 = off
    host: str = "127.0.0.1"


@dataclass
class AuxConfig:
    """Pretext tasks added to any method as weighted auxiliary heads (0 = off)."""

    rotation: float = 0.0
    jigsaw: float = 0.0


@dataclass
class SeriesConfig:
    """Time-series runs (`--method forecast` / `cpc`, `streamssl forecast`): windows, decomposition, grouping."""

    value_column: str = "value"  # CSV/Parquet column with the values ("" = the only numeric column)
    time_column: str = "timestamp"  # CSV/Parquet column with the time ("" = row order)
    window: int = 128  # trailing window decomposed at each forecast origin (and CPC's input length)
    lag: int = 12  # past points fed to the forecaster
    horizon: int = 1  # steps ahead forecast
    decomposition: str = "eemd"  # eemd | ceemdan
    trials: int = 50  # EEMD ensemble size
    noise_width: float = 0.05
    max_imfs: int = 4  # IMFs kept per window (+ the residue); fewer are zero-padded
    grouping: str = "two_means"  # two_means | threshold: how components split into aux targets / views
    threshold: float = 0.5  # |Pearson| at or above it: aux target (grouping threshold)
    eval_points: int = 500  # rolling (prequential) nRMSE over this many most recent points
    points: int = 4000  # `streamssl forecast`: only the most recent N points of the series (0 = all)
    decomposition_seed: int = 0  # EEMD noise seed; fixed across training seeds so one decomposition serves all
    # The continuous job (`streamssl run --method forecast|cpc`, pipeline/series/job.py):
    series_column: str = ""  # Parquet/CSV column naming each row's series ("" = one series)
    warmup_points: int = 512  # first points of each series: frozen normalisation (and the grouping); >= window
    batch_size: int = 64  # forecast: new examples per step; cpc: windows per step (train.batch_size is for images)
    lr: float = 1e-3  # Adam learning rate of the continuous job
    history: int = 1024  # cpc: most recent points per series that training windows are drawn from
    points_per_step: int = 16  # cpc: new points between training steps
    # torch CPU threads of the job (0 = torch's default): its models are tiny, and on busy cores intra-op threads
    # cost far more than they gain (measured: a batch-1 forecast took 14 ms with 2 threads next to the EEMD pool)
    threads: int = 1
    processes: int = 0  # EEMD worker processes of the job (0 = one per CPU core, 1 = none); results do not depend on it


def options_section(method: type) -> type:
    """A dataclass of a method's keyword-only constructor options: names, types and defaults from the method."""
    hints = typing.get_type_hints(method.__init__)
    fields: list[tuple[str, Any, Any]] = []
    for param in inspect.signature(method.__init__).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints[param.name]
        if typing.get_origin(hint) is tuple:  # a YAML list in the config, a tuple for the method
            item = typing.get_args(hint)[0]
            fields.append((param.name, list[item], field(default_factory=lambda d=param.default: list(d),
                                                         metadata={"tuple": True})))
        else:
            fields.append((param.name, hint, field(default=param.default)))
    return dataclasses.make_dataclass(f"{method.__name__}Options", fields)


@dataclass
class BaseConfig:
    method: str = "moco"
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)

    def method_options(self) -> dict[str, Any]:
        """The section named after the method (e.g. `moco`), as its keyword options."""
        section = getattr(self, self.method)
        return {f.name: tuple(getattr(section, f.name)) if f.metadata.get("tuple") else getattr(section, f.name)
                for f in dataclasses.fields(section)}


# The full tree: the fixed sections plus one per registered method.
Config = dataclasses.make_dataclass(
    "Config", [(name, options_section(cls), field(default_factory=options_section(cls)))
               for name, cls in sorted({**METHODS, **SERIES_METHODS}.items())], bases=(BaseConfig,))


CHOICES = {
    "data.mode": ("auto", "cycle", "once", "follow"),
    "data.image_field": ("png", "jpg", "jpeg"),
    "model.backbone": ("convnet", "resnet18"),
    "optim.schedule": ("cosine", "constant"),
    "optim.name": ("sgd", "lars", "adamw"),
    "train.precision": ("auto", "fp32", "bf16"),
    "eval.dataset": ("fashion-mnist", "none"),
    "kafka.auto_offset_reset": ("earliest", "latest"),
    "kafka.security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "series.decomposition": ("eemd", "ceemdan"),
    "series.grouping": ("two_means", "threshold"),
}


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Checks/converts one YAML value against a dataclass field type."""
    origin = typing.get_origin(hint)
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


def _set(node: Any, dotted: str, value: Any, prefix: str = "") -> None:
    name, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(node))
    if name not in hints:
        full = prefix + name
        options = [prefix + n for n in hints]
        close = difflib.get_close_matches(full, options, n=1)
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


def validate(cfg: Config) -> None:
    if cfg.method not in METHODS and cfg.method not in SERIES_METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(sorted({**METHODS, **SERIES_METHODS}))}")
    for key, allowed in CHOICES.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node not in allowed:
            raise ConfigError(f"{key}: {node!r} is not one of {', '.join(allowed)}")
    positive = {
        "train.batch_size": cfg.train.batch_size, "data.size": cfg.data.size, "data.channels": cfg.data.channels,
        "checkpoint.keep": cfg.checkpoint.keep, "eval.k": cfg.eval.k, "model.bn_splits": cfg.model.bn_splits,
        "checkpoint.publish_every": cfg.checkpoint.publish_every, "data.prefetch_batches": cfg.data.prefetch_batches,
        "train.nan_rollback_after": cfg.train.nan_rollback_after,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if len(cfg.data.mean) != cfg.data.channels or len(cfg.data.std) != cfg.data.channels:
        raise ConfigError("data.mean and data.std need one value per channel (data.channels)")
    if cfg.train.batch_size % cfg.model.bn_splits:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by model.bn_splits")
    if not 0 < cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[-1] <= 1:
        raise ConfigError("augment.crop_scale must be [min, max] with 0 < min <= max <= 1")
    if cfg.eval.dataset == "fashion-mnist" and cfg.data.channels != 1:
        raise ConfigError("eval.dataset fashion-mnist needs data.channels 1 (set eval.dataset none otherwise)")
    if cfg.train.max_steps < 0 or cfg.train.max_minutes < 0:
        raise ConfigError("train.max_steps and train.max_minutes must be >= 0")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← explicit overrides (CLI flags) ← `key=value` strings."""
    cfg = Config()
    explicit: set[str] = set()
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        for key, value in loaded.items():
            _set(cfg, str(key), value)
            explicit.update(_dotted_keys(str(key), value))
    apply_overrides(cfg, overrides, sets, explicit)
    apply_recipe(cfg, explicit)
    validate(cfg)
    return cfg


def _dotted_keys(key: str, value: Any) -> set[str]:
    """`optim: {lr: 1}` sets `optim.lr`; the keys a YAML value spells out, dotted."""
    if isinstance(value, dict):
        return {dotted for sub, sub_value in value.items() for dotted in _dotted_keys(f"{key}.{sub}", sub_value)}
    return {key}


def apply_recipe(cfg: Any, explicit: set[str]) -> None:
    """The method's own defaults (`Method.recipe`) for every key the user did not set."""
    recipe = getattr(METHODS.get(cfg.method), "recipe", {})
    for key, value in recipe.items():
        if key not in explicit:
            _set(cfg, key, value)


def apply_overrides(cfg: Any, overrides: dict[str, Any] | None, sets: list[str] | None,
                    explicit: set[str] | None = None) -> None:
    """Explicit overrides (CLI flags; None = not given), then `key=value` strings (values parsed as YAML).
    The keys set are added to `explicit`."""
    explicit = set() if explicit is None else explicit
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


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
