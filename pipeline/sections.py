"""The config tree, `Config`: its fixed sections (each key's type, default and help) and one section per method.

A key's help is its trailing comment, or the comment lines right above it (`streamssl config --show`
prints them); a method's section is generated from its keyword-only constructor options, their help read
from its docstring. Choices are `Literal` types: the loader (pipeline/config.py) refuses anything else.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

from streamssl.models.registry import METHODS, SERIES_METHODS
from streamssl.monitoring.metrics import DEFAULT_METRICS_PORT


@dataclass
class DataConfig:
    # images: shard dir, brace pattern or URL ("" = the embedded Fashion-MNIST lake); series: a file, directory or
    # kafka:// URL; `streamssl forecast`: electricity | temperature | exchange | a .csv/.parquet file
    source: str = ""
    mode: Literal["auto", "cycle", "once", "follow"] = "auto"  # auto = follow for a directory, cycle otherwise
    shuffle_buffer: int = 2048  # records; part of the stream position, so resume stays exact
    poll_seconds: float = 2.0  # follow mode: how often to look for new shards
    image_field: Literal["png", "jpg", "jpeg", "webp"] = "png"  # which extension of a record holds the image
    channels: int = 1  # image channels (1 = grey, 3 = RGB)
    size: int = 28  # side of the square crops the backbone trains on
    # true: each image keeps its aspect ratio, shrunk to about size / sqrt(augment.crop_scale min) on a side, and
    # the random-resized crop is taken from it; false (and with replay.capacity > 0): resized to size x size first
    full_resolution: bool = True
    mean: list[float] = field(default_factory=lambda: [0.286])  # per channel (Fashion-MNIST train statistics)
    std: list[float] = field(default_factory=lambda: [0.353])  # per channel (Fashion-MNIST train statistics)
    prefetch_batches: int = 4  # decoded batches the loader process may hold ready
    # a record bigger than this is dead-lettered (oversized_record) before it is decoded; 0 = no limit
    max_record_bytes: int = 32 << 20
    # s3:// lakes: the S3 endpoint URL ("" = AWS_ENDPOINT_URL or AWS); credentials come from the standard AWS
    # variables, profile or instance role, never from the config
    s3_endpoint: str = ""


@dataclass
class KafkaConfig:
    """Client settings for `--data kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=G]`, passed through to kafka-python."""

    group: str = "streamssl"  # consumer group (the URL's ?group= wins); --workers N commit to it too
    client_id: str = "streamssl"  # how the brokers name this client in their logs
    # where a new group starts on a partition with no committed offset
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 10000  # a consumer silent this long leaves the group (its partitions move)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"  # how to reach the brokers
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = ""  # "" = no SASL
    sasl_plain_username: str = ""  # SASL PLAIN / SCRAM user
    sasl_plain_password: str = ""  # never written to the run dir; prefer the STREAMSSL_KAFKA_PASSWORD environment variable
    ssl_cafile: str = ""  # CA bundle that signed the brokers' certificates
    ssl_certfile: str = ""  # client certificate (mutual TLS)
    ssl_keyfile: str = ""  # client key (mutual TLS)
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
    # convnet: the CPU default; resnet18: CIFAR-stem ResNet-18 for GPUs; torchvision:NAME: a torchvision classification
    # model, untrained; package.module:factory: your own nn.Module (README: "Your own images and backbone")
    backbone: str = "convnet"
    # split BN in training, so a single device behaves like MoCo's multi-GPU shuffle BN (MoCo's recipe sets 8)
    bn_splits: int = 1


@dataclass
class AugmentConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop: [min, max] area share
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.333])  # random resized crop: aspect ratio range
    flip_prob: float = 0.5  # horizontal flip
    jitter_prob: float = 0.8  # colour jitter (brightness, contrast, saturation)
    brightness: float = 0.4  # jitter strength
    contrast: float = 0.4  # jitter strength
    saturation: float = 0.4  # only for 3-channel input
    blur_prob: float = 0.5  # Gaussian blur
    # SimCLR's range for 224 px images, scaled by data.size / 224 (a 28 px image gets sigma 0.0125-0.25 px):
    # the 224 px range applied to 28 px images blurred away most of what there is to learn
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class OptimConfig:
    """Defaults here; a method's `recipe` (in its own file) overrides them unless the user sets the key."""

    name: Literal["sgd", "lars", "adamw"] = "sgd"  # weight decay (and LARS's trust ratio) skip BN and bias parameters
    lr: float = 0.06  # for batch 256; scaled linearly with batch size
    momentum: float = 0.9  # SGD/LARS momentum (AdamW: beta1 stays 0.9)
    weight_decay: float = 5e-4  # L2 penalty on weights (not BN or bias)
    warmup_fraction: float = 0.05  # linear warm-up over this share of the horizon
    warmup_steps: int = 0  # explicit warm-up steps instead (0 = the fraction; 100 steps for an unbounded run)
    schedule: Literal["cosine", "constant"] = "cosine"  # the LR after warm-up
    # cosine horizon; 0 = train.max_steps, else estimated from --max-minutes, else none (constant LR)
    total_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * this


@dataclass
class TrainConfig:
    batch_size: int = 256  # images per step and worker (a method's recipe may change it)
    max_steps: int = 0  # total for the run dir (a resumed run continues up to it); 0 = no limit
    # this invocation's wall-clock budget; 0 = no limit. Unset, the embedded demo lake (no data.source) gets 5 and
    # `streamssl forecast` 5; a run on your own data goes on until it is stopped (or max_steps)
    max_minutes: float = 0.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware has it natively, else fp32
    channels_last: bool = True  # NHWC memory layout (faster convolutions on CPU and GPU)
    seed: int = 0  # model initialisation, augmentation and sampling
    deterministic: bool = False  # bit-exact CPU resume (torch deterministic algorithms)
    log_every_seconds: float = 10.0  # progress line interval
    # progress and log lines: text (ISO time first) for people, json (one object per line) for log aggregators
    log_format: Literal["text", "json"] = "text"
    # append each trained batch's record keys (series: `id@timestamp` of each point taken) to RUN_DIR/trained-keys.jsonl
    audit_keys: bool = False
    nan_rollback_after: int = 3  # non-finite losses in a row (each step skipped) before rolling back
    max_rollbacks: int = 3  # rollbacks per invocation before giving up with an error
    # Publish (and monitor) an exponential moving average of the encoder's weights and BN statistics with this
    # decay per step instead of the raw weights (0 = off): an encoder that is good at any moment for a run with
    # no end to anneal to; see the README on week-long runs
    ema_decay: float = 0.0


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # checkpoint every N steps (0 = by time only)
    every_seconds: float = 300.0  # and every N seconds (0 = by steps only); always at the end
    keep: int = 3  # checkpoints kept in RUN_DIR/checkpoints
    publish_every: int = 1  # publish after every N-th checkpoint (0 = only at the end; always at the end)
    # where RUN_DIR/checkpoints holds checkpoints and none loads: start over (they are renamed *.unreadable at
    # the first checkpoint) instead of refusing to start
    allow_fresh: bool = False


@dataclass
class EvalConfig:
    every_steps: int = 0  # evaluate (kNN monitor; forecast: validation check) every N steps (0 = by time only)
    every_seconds: float = 120.0  # and every N seconds (0 = by steps only); always at the end and before publishing
    # the kNN monitor's labelled set when eval.data is empty: fashion-mnist, or none (no monitor)
    dataset: Literal["fashion-mnist", "none"] = "fashion-mnist"
    # a directory of labelled WebDataset shards (image in data.image_field) for the kNN monitor; set, it replaces
    # eval.dataset. One folder, split by key hash: a fifth of the records are queries, the rest the bank
    data: str = ""
    label_field: str = "json:label"  # eval.data's label: MEMBER:KEY = a key of a JSON member, MEMBER = a text member (cls)
    bank_size: int = 10000  # labelled reference subset of the train split (eval.data: of its bank side); 0 = all
    test_size: int = 2000  # held-out subset of the test split (eval.data: of its query side); 0 = all
    k: int = 200  # kNN neighbours
    temperature: float = 0.1  # kNN vote weights exp(similarity / T)


@dataclass
class DriftConfig:
    """Embedding drift (pipeline/drift.py): at every eval, a domain classifier's held-out ROC AUC between the run's
    first records and its latest ones, both embedded by the current encoder; 0.5 = no drift, 1 = fully separable."""

    # records in each window: the reference (the run's first) and the recent ring (the latest); both are kept in
    # every checkpoint (2 x window x channels x size^2 bytes: 0.8 MB at the defaults); 0 = off
    window: int = 512
    threshold: float = 0.55  # AUC above this logs a warning (Evidently's default alarm; the alert rule uses 0.55)
    folds: int = 5  # cross-validation folds: the AUC is measured on held-out folds only, never on training rows


@dataclass
class PublishConfig:
    """Which versions go out (pipeline/publish_gate.py), how many stay (pipeline/retention.py), who is told
    (pipeline/notify.py), and what a version holds besides its weights, manifest and model card (README.md)."""

    # refuse to publish a collapsed encoder or one whose eval metric regressed (kept as a candidate instead)
    gate: bool = True
    # allowed regression against the best published so far, absolute in the metric's units (knn_top1; rolling or
    # test nRMSE, lower is better)
    tolerance: float = 0.02
    # collapsed: the mean per-dim std of its L2-normalised embeddings of real inputs below this times 1/sqrt(d)
    # (measured here: trained convnets 0.51-0.62, an untrained one 0.15, a collapsed one 0)
    min_std_ratio: float = 0.05
    keep: int = 10  # newest versions kept (and always the one `latest` points at and the one before); 0 = all
    keep_every: int = 0  # also keep every N-th version forever (0 = none: published/ stays bounded)
    keep_candidates: int = 3  # refused encoders kept in published/candidates/ (0 = none)
    topic: str = ""  # Kafka topic that gets a JSON event per published version ("" = none)
    # its bootstrap servers HOST:PORT[,HOST:PORT] ("" = the Kafka data source's); kafka.* security settings apply
    bootstrap: str = ""
    webhook: str = ""  # http(s) URL that gets the same event as a JSON POST ("" = none)
    timeout_seconds: float = 5.0  # per notification attempt
    retries: int = 3  # more attempts after a failed one, with doubling backoff from 0.5 s
    # also write encoder.onnx (opset 18, dynamic batch, normalisation inside), checked against torch in onnxruntime;
    # off by default: an export and its check cost the ConvNet 3.5 s of CPU per publish (11 s the first in a process)
    onnx: bool = False
    # s3://bucket/prefix/: after each publish, upload the version folder, then the LATEST object naming it (a failed
    # upload is counted and retried at the next publish; never stops the run). "" = no mirror
    mirror: str = ""
    mirror_endpoint: str = ""  # the mirror's S3 endpoint URL ("" = AWS_ENDPOINT_URL or AWS; credentials as data.s3_endpoint)


@dataclass
class MetricsConfig:
    port: int = DEFAULT_METRICS_PORT  # 0 = off
    host: str = "127.0.0.1"  # interface the exporter listens on (0.0.0.0 = all)


@dataclass
class LogConfig:
    """TensorBoard event files of the run's history (pipeline/tensorboard_log.py), besides RUN_DIR/metrics.jsonl."""

    # also write the progress, eval and publish values (loss, LR, samples/s, kNN top-1, drift AUC, nRMSE, version) as
    # TensorBoard scalars at their optimizer step; needs `pip install streamssl[tensorboard]`
    tensorboard: bool = False
    tensorboard_dir: str = ""  # where the event files go: "" = RUN_DIR/tensorboard; a relative path is under the run dir


@dataclass
class AuxConfig:
    """Pretext tasks added to any method as weighted auxiliary heads (0 = off)."""

    rotation: float = 0.0  # loss weight of a rotation-prediction head
    jigsaw: float = 0.0  # loss weight of a jigsaw-puzzle head


@dataclass
class ReplayConfig:
    """A replay buffer between the stream and the method (pipeline/replay.py): for streams in production order."""

    capacity: int = 0  # records kept (decoded image, id, last feature); 0 = off
    policy: Literal["fifo", "reservoir", "minred"] = "minred"  # which record leaves a full buffer
    # share of each training batch drawn from the buffer; the rest are arriving records, so each arriving record
    # pays for 1 / (1 - share) training samples (the loader delivers that many fewer records per step)
    share: float = 0.5


@dataclass
class DistillConfig:
    """Distillation against a frozen snapshot of the encoder (pipeline/distill.py; CaSSLe-style)."""

    weight: float = 0.0  # weight of the distillation loss; 0 = off
    every_steps: int = 500  # snapshot refresh period; no distillation before the first snapshot


@dataclass
class SeriesConfig:
    """Time-series runs (`--method forecast` / `cpc`, `streamssl forecast`): windows, decomposition, grouping."""

    value_column: str = "value"  # CSV/Parquet column with the values ("" = the only numeric column)
    time_column: str = "timestamp"  # CSV/Parquet column with the time ("" = row order)
    window: int = 128  # trailing window decomposed at each forecast origin (and CPC's input length)
    lag: int = 12  # past points fed to the forecaster
    horizon: int = 1  # steps ahead forecast
    decomposition: Literal["eemd", "ceemdan"] = "eemd"  # ensemble EMD variant
    trials: int = 50  # EEMD ensemble size
    noise_width: float = 0.05  # EEMD noise, in standard deviations of the window
    max_imfs: int = 4  # IMFs kept per window (+ the residue); fewer are zero-padded
    grouping: Literal["two_means", "threshold"] = "two_means"  # how components split into aux targets / views
    threshold: float = 0.5  # |Pearson| at or above it: aux target (grouping threshold)
    eval_points: int = 500  # rolling (prequential) nRMSE over this many most recent points
    points: int = 4000  # `streamssl forecast`: only the most recent N points of the series (0 = all)
    decomposition_seed: int = 0  # EEMD noise seed; fixed across training seeds so one decomposition serves all
    # The continuous job (`streamssl run --method forecast|cpc`, pipeline/series/job.py):
    series_column: str = ""  # Parquet/CSV column naming each row's series ("" = one series)
    # series kept at once (windows, warm-up, statistics, pending forecasts): a new one drops the one updated longest ago
    max_series: int = 1000
    warmup_points: int = 512  # first points of each series: frozen normalisation (and the grouping); >= window
    batch_size: int = 64  # examples (forecast) or windows (cpc) per step; train.batch_size is for images
    lr: float = 1e-3  # Adam learning rate
    history: int = 1024  # cpc: most recent points per series that training windows are drawn from
    points_per_step: int = 16  # cpc: new points between training steps
    # torch CPU threads of the job (0 = torch's default): its models are tiny, and on busy cores intra-op threads
    # cost far more than they gain (measured: a batch-1 forecast took 14 ms with 2 threads next to the EEMD pool)
    threads: int = 1
    processes: int = 0  # EEMD worker processes of the job (0 = one per CPU core, 1 = none); results do not depend on it
    # `streamssl forecast` (offline, pipeline/series/forecast.py): origins split in time order into train /
    # validation / test; the best model on validation is kept and scored on test
    train_fraction: float = 0.7  # share of the origins trained on (`streamssl forecast`)
    val_fraction: float = 0.1  # share used for validation checks and early stopping (`streamssl forecast`)
    patience: int = 10  # validation checks without improvement before stopping; 0 = never stop early
    weight_decay: float = 0.0  # Adam L2 penalty (`streamssl forecast`)
    cache_dir: str = ""  # decomposition cache of `streamssl forecast`; "" = ~/.cache/streamssl/eemd, none = off


class MethodOptions:
    """A method's section: its keyword-only constructor options as fields (see `options_section`)."""

    method: typing.ClassVar[type]

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: tuple(getattr(self, f.name)) if f.metadata.get("tuple") else getattr(self, f.name)
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def options_section(method: type) -> type[MethodOptions]:
    """A dataclass of a method's keyword-only constructor options: names, types and defaults from the method."""
    init = cast(Any, method).__init__
    hints = typing.get_type_hints(init)
    fields: list[tuple[str, Any, Any]] = []
    for param in inspect.signature(init).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints[param.name]
        if typing.get_origin(hint) is tuple:  # a YAML list in the config, a tuple for the method
            item_list = list.__class_getitem__(typing.get_args(hint)[0])
            fields.append((param.name, item_list, field(default_factory=partial(list, param.default),
                                                        metadata={"tuple": True})))
        else:
            fields.append((param.name, hint, field(default=param.default)))
    section = cast(type[MethodOptions],
                   dataclasses.make_dataclass(f"{method.__name__}Options", fields, bases=(MethodOptions,)))
    section.method = method
    return section


ALL_METHODS = {**METHODS, **SERIES_METHODS}
OPTIONS = {name: options_section(cls) for name, cls in ALL_METHODS.items()}


@dataclass
class Config:
    method: str = "moco"  # the self-supervised method (each has a section of its own below)
    run_dir: str = "runs/default"  # checkpoints, published encoders, dead letters; `streamssl forecast`: "" = none
    data: DataConfig = field(default_factory=DataConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    # one section per method, named after it
    byol: MethodOptions = field(default_factory=OPTIONS["byol"])
    cpc: MethodOptions = field(default_factory=OPTIONS["cpc"])
    deepcluster: MethodOptions = field(default_factory=OPTIONS["deepcluster"])
    forecast: MethodOptions = field(default_factory=OPTIONS["forecast"])
    jigsaw: MethodOptions = field(default_factory=OPTIONS["jigsaw"])
    moco: MethodOptions = field(default_factory=OPTIONS["moco"])
    npid: MethodOptions = field(default_factory=OPTIONS["npid"])
    rotation: MethodOptions = field(default_factory=OPTIONS["rotation"])
    simclr: MethodOptions = field(default_factory=OPTIONS["simclr"])
    simsiam: MethodOptions = field(default_factory=OPTIONS["simsiam"])
    swav: MethodOptions = field(default_factory=OPTIONS["swav"])

    def method_options(self) -> dict[str, Any]:
        """The section named after the method (e.g. `moco`), as its keyword options."""
        section: MethodOptions = getattr(self, self.method)
        return section.as_kwargs()
