"""The `streamssl` command: `run` trains on a stream, `eval` scores a published encoder, `lake` writes shards,
`produce` publishes shards to a Kafka topic.

Expected failures (bad config, missing data, a tampered encoder, a run dir in use, not writable or with no
checkpoint that loads) print one `streamssl: error: …` line and exit 2; a file-system error anywhere else
(a full disk) prints one line and exits 1; SIGINT/SIGTERM stop a run cleanly (finish the step, checkpoint,
publish, exit 0).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning OpenMP threads steal the cores the loader process needs
# (measured on 2 cores: stream-fed 488 → 529 samples/s). An explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.registry import SERIES_METHODS
from streamssl.pipeline import report
from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.extras import require
from streamssl.pipeline.log_format import LOG_FORMATS, setup_logging
from streamssl.pipeline.rundir import RunDirError
from streamssl.pipeline.series import forecast
from streamssl.streams.orders import ORDERS
from streamssl.streams.records import SourceError

log = logging.getLogger("streamssl")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamssl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train continuously on a stream (resumes from --run-dir)")
    run.add_argument("--config", help="YAML config file (keys as in `--set`)")
    run.add_argument("--method", help="self-supervised method (default moco)")
    run.add_argument("--data", help="shard directory, brace pattern or URL; default: embedded Fashion-MNIST lake")
    run.add_argument("--run-dir", help="checkpoints, published encoders, dead letters (default runs/default)")
    run.add_argument("--max-steps", type=int, help="total steps for the run dir; 0 = unlimited")
    run.add_argument("--max-minutes", type=float, help="wall-clock budget of this invocation; 0 = unlimited")
    run.add_argument("--metrics-port", type=int, help="Prometheus exporter port (default 9765; 0 = off)")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="text (default: ISO time first) or json (one object "
                                                               "per line, for log aggregators) (train.log_format)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config value, e.g. --set train.batch_size=128 (repeatable)")
    run.add_argument("--workers", type=int, default=0,
                     help="train on N Ray Train workers (DDP; train.batch_size is per worker); 0 = this process")
    run.add_argument("--ray-address", default="",
                     help="an existing Ray cluster (e.g. auto); default: a local Ray started for the run")

    show = commands.add_parser("config", help="print the resolved config (defaults, the job's and the method's defaults, "
                                              "file, --set) as JSON, or with --show every key and its help")
    show.add_argument("--config", help="YAML config file")
    show.add_argument("--method", help="self-supervised method (default moco; forecast with --job forecast)")
    show.add_argument("--job", choices=["run", "forecast"], default="run",
                      help="`streamssl run` (the method decides: images or series) or `streamssl forecast`")
    show.add_argument("--show", action="store_true",
                      help="every key the job reads, one per line: `key = default  # help`")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    evaluate = commands.add_parser("eval", help="kNN / linear-probe / few-label top-1 of an encoder, printed as JSON")
    evaluate.add_argument("--encoder", required=True,
                          help="published version folder (or its `latest` link); `raw` = raw pixels; "
                               "`random` = a randomly initialised convnet fed like a trained encoder, normalised "
                               "with the training set's mean and std (baselines)")
    mode = evaluate.add_mutually_exclusive_group()
    mode.add_argument("--linear", action="store_true", help="linear probe on frozen features (all train labels)")
    mode.add_argument("--labels", type=float, metavar="FRACTION",
                      help="fine-tune encoder + linear head on this stratified fraction of the train labels "
                           "(e.g. 0.01 or 0.1)")
    evaluate.add_argument("--steps", type=int, default=0, help="optimizer steps of --linear / --labels "
                                                               "(default 3000 / 1000)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    evaluate.add_argument("--data", default="", metavar="DIR",
                          help="score on this directory of labelled shards instead of --dataset (split by key hash: "
                               "a fifth of the records are queries, the rest the bank/train side)")
    evaluate.add_argument("--label-field", default="json:label",
                          help="--data's label: MEMBER:KEY (a key of a JSON member) or MEMBER (a text member, e.g. cls)")
    evaluate.add_argument("--image-field", default="png", help="--data's image member")
    evaluate.add_argument("--channels", type=int, default=0,
                          help="--data decoded to this many channels (default: the encoder's input, else 1)")
    evaluate.add_argument("--size", type=int, default=0,
                          help="--data decoded to size x size (default: the encoder's input, else 28)")
    evaluate.add_argument("--k", type=int, default=200)
    evaluate.add_argument("--temperature", type=float, default=0.1)
    evaluate.add_argument("--bank-size", type=int, default=0,
                          help="train images used (kNN bank, linear-probe / fine-tune pool); 0 = all 60k")
    evaluate.add_argument("--test-size", type=int, default=0, help="test images scored; 0 = all 10k")

    produce = commands.add_parser("produce", help="publish a shard lake to a Kafka topic (demos, tests, benchmarks)")
    produce.add_argument("--to", required=True, metavar="kafka://HOST:PORT/TOPIC", help="topic to write to")
    produce.add_argument("--data", default="", help="shard directory, brace pattern or URL; default: the embedded "
                                                    "Fashion-MNIST lake")
    produce.add_argument("--rate", type=float, default=0.0, help="records per second; 0 = as fast as possible")
    produce.add_argument("--limit", type=int, default=0, help="stop after N records; 0 = the whole lake")
    produce.add_argument("--partitions", type=int, default=4, help="partitions if the topic is created")

    lake = commands.add_parser("lake", help="write Fashion-MNIST (or a labelled lake) as WebDataset shards (PNG + json) "
                                            "in a stream order")
    lake.add_argument("--out", required=True, help="directory to write shards into")
    lake.add_argument("--limit", type=int, default=0, help="only the first N training images; 0 = all")
    lake.add_argument("--shard-size", type=int, default=1000)
    lake.add_argument("--order", default="", choices=["", *ORDERS],
                      help="write the records in this stream order (labels decide it; see streams/orders.py); "
                           "default: index order")
    lake.add_argument("--run-length", type=int, default=200, help="images per run of one class (correlated-runs)")
    lake.add_argument("--seed", type=int, default=0, help="seed of the order")
    lake.add_argument("--from", dest="source", default="", metavar="DIR",
                      help="instead of Fashion-MNIST: a labelled lake (*.tar of png + json label), or a folder of "
                           "JPEG/PNG/WebP images, read recursively and written unchanged (subfolders = classes)")
    forecast.add_parser(commands)
    report.add_parser(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        "method": args.method, "data.source": args.data, "run_dir": args.run_dir,
        "train.max_steps": args.max_steps, "train.max_minutes": args.max_minutes, "metrics.port": args.metrics_port,
        "train.log_format": args.log_format,
    }
    cfg = load_config(args.config, overrides, args.set)
    setup_logging(cfg.train.log_format)
    from streamssl.pipeline.images import Trainer  # the training stack loads only for `run`
    from streamssl.pipeline.loading.sources import source_spec
    from streamssl.pipeline.loop import TrainingDiverged

    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        log.info("%s received: finishing the step, then checkpoint (and publish, unless a kNN eval is due)",
                 signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if cfg.method in SERIES_METHODS:
            from streamssl.pipeline.series.job import run_series

            run_series(cfg, stop)
        elif args.workers or args.ray_address or source_spec(cfg.data).kind == "ray":
            from streamssl.pipeline.ray.driver import run_distributed

            run_distributed(cfg, args.workers, args.ray_address, stop)
        else:
            Trainer(cfg, stop).run()
    except TrainingDiverged as err:
        print(f"streamssl: error: {err}", file=sys.stderr)
        return 1
    return 0


def _config(args: argparse.Namespace) -> int:
    from streamssl.pipeline.config import job_of, redacted
    from streamssl.pipeline.config_show import describe

    cfg = load_config(args.config, {"method": args.method}, args.set, job="forecast" if args.job == "forecast" else None)
    if args.show:
        print("\n".join(describe(cfg.method, "forecast" if args.job == "forecast" else job_of(cfg))))
    else:
        print(json.dumps(redacted(cfg)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from streamssl.models import build_backbone, load_encoder
    from streamssl.models.published import PublishedEncoder
    from streamssl.pipeline.config import DataConfig, EvalConfig
    from streamssl.pipeline.evaluation.knn import knn_top1
    from streamssl.pipeline.evaluation.probe import fine_tune, labelled_fraction, linear_probe

    if args.labels is not None and not 0 < args.labels <= 1:
        raise ConfigError(f"--labels is a fraction in (0, 1], got {args.labels}")
    started = time.monotonic()
    result: dict[str, Any] = {"encoder": args.encoder}
    if args.encoder == "raw":
        if args.labels is not None:
            raise ConfigError("--labels fine-tunes an encoder; raw pixels have none (use --encoder random)")
        encoder: torch.nn.Module = torch.nn.Flatten()
    elif args.encoder == "random":
        torch.manual_seed(args.seed)
        # Preprocessed as every published encoder is (it normalises inside), so the baseline is like-for-like;
        # with more channels, each gets the Fashion-MNIST statistics.
        data, channels = DataConfig(), args.channels or 1
        random_encoder = PublishedEncoder(build_backbone("convnet", channels)[0],
                                          {"input": {"mean": data.mean * channels, "std": data.std * channels}})
        encoder = random_encoder
    else:
        if not Path(args.encoder).exists():
            raise SourceError(f"encoder folder not found: {args.encoder}")
        encoder = load_encoder(args.encoder)
        manifest = encoder.manifest
        result.update(version=manifest["version"], step=manifest["step"], method=manifest["method"],
                      samples_seen=manifest["samples_seen"])
    device = torch.device("cpu")
    sets = EvalConfig(bank_size=args.bank_size, test_size=args.test_size, data=args.data, label_field=args.label_field)
    labelled = eval_sets(args, sets, getattr(encoder, "manifest", {}).get("input", {}), result)
    if args.linear or args.labels is not None:
        train, train_labels, test, test_labels = labelled
        if args.linear:
            steps = args.steps or 3000
            top1 = linear_probe(encoder, train, train_labels, test, test_labels, device, steps=steps, seed=args.seed)
            result.update(protocol="linear", linear_top1=round(top1, 4), train_labels=len(train))
        else:
            steps = args.steps or 1000
            index = torch.from_numpy(labelled_fraction(train_labels, args.labels, args.seed))
            top1 = fine_tune(encoder, train[index], train_labels[index], test, test_labels, device, steps=steps,
                             seed=args.seed)
            result.update(protocol="fine-tune", labels=args.labels, fine_tune_top1=round(top1, 4),
                          train_labels=len(index))
        result.update(steps=steps, test_size=len(test), seed=args.seed)
    else:
        bank, bank_labels, test, test_labels = labelled
        # A published encoder normalises its own input: feed it plain [0, 1] pixels.
        top1 = knn_top1(encoder, bank, bank_labels, test, test_labels, [0.0], [1.0], torch.device("cpu"),
                        k=args.k, temperature=args.temperature)
        result.update(protocol="knn", knn_top1=round(top1, 4), k=args.k,
                      temperature=args.temperature, bank_size=len(bank), test_size=len(test))
        if args.encoder == "random":  # the older, unnormalised baseline too, for comparison
            plain = knn_top1(random_encoder.backbone, bank, bank_labels, test, test_labels, [0.0], [1.0],
                             torch.device("cpu"), k=args.k, temperature=args.temperature)
            result.update(knn_top1_unnormalised_input=round(plain, 4))
    result.update(seconds=round(time.monotonic() - started, 1))
    print(json.dumps(result))
    return 0


def eval_sets(args: argparse.Namespace, sets: Any, spec: dict[str, Any], result: dict[str, Any]) -> Any:
    """`streamssl eval`'s labelled sets: --data's (decoded as the encoder's input spec says, or as --channels /
    --size say for raw pixels and the random baseline), else --dataset's; what they are goes into `result`."""
    from streamssl.pipeline.evaluation.eval_data import shards_of
    from streamssl.pipeline.loading.sources import knn_sets

    if not args.data:
        result.update(dataset=args.dataset)
        return knn_sets(sets)
    channels, size = args.channels or spec.get("channels", 1), args.size or spec.get("height", 28)
    if "channels" in spec and (channels, size) != (spec["channels"], spec["height"]):
        raise ConfigError(f"--channels/--size {channels}/{size}: the encoder takes {spec['channels']} channels of "
                          f"{spec['height']} x {spec['width']}")
    shards = shards_of(sets, args.image_field, channels, size)
    result.update(dataset=args.data, label_field=args.label_field, classes=len(shards.classes), skipped=shards.skipped)
    return shards.tensors()


def _lake(args: argparse.Namespace) -> int:
    from streamssl.streams.fashion_mnist import load_fashion_mnist
    from streamssl.streams.lake import build_lake
    from streamssl.streams.orders import read_labelled_lake, stream_order

    if args.source and not Path(args.source).is_dir():
        raise SourceError(f"lake not found: {args.source}")
    if args.run_length < 1 or args.shard_size < 1:
        raise ConfigError("--run-length and --shard-size must be at least 1")
    if args.source and not any(Path(args.source).glob("*.tar")):
        return _lake_from_images(args)
    images, labels = read_labelled_lake(Path(args.source)) if args.source else load_fashion_mnist("train")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    order = stream_order(labels, args.order, args.run_length, args.seed) if args.order else None
    shards = build_lake(Path(args.out), images, labels, shard_size=args.shard_size, order=order)
    print(json.dumps({"out": args.out, "shards": len(shards), "samples": len(images if order is None else order),
                      "order": args.order or "index"}))
    return 0


def _lake_from_images(args: argparse.Namespace) -> int:
    import numpy as np

    from streamssl.streams.image_folder import build_image_folder_lake, scan_image_folder
    from streamssl.streams.orders import stream_order

    folder = scan_image_folder(Path(args.source))
    if not folder.files:
        raise SourceError(f"no .jpg/.jpeg/.png/.webp images under {args.source}")
    labels = folder.labels()[:args.limit or None]
    if args.order and (labels < 0).any():
        raise ConfigError(f"--order {args.order} needs every image in a class subfolder of {args.source}")
    order = stream_order(labels, args.order, args.run_length, args.seed) if args.order else np.arange(len(labels))
    shards = build_image_folder_lake(folder, Path(args.out), order, shard_size=args.shard_size)
    print(json.dumps({"out": args.out, "shards": len(shards), "samples": len(order), "order": args.order or "index",
                      "classes": len(folder.classes), "skipped": folder.skipped}))
    return 0


def _produce(args: argparse.Namespace) -> int:
    from streamssl.streams.kafka_produce import create_topic, lake_records, parse_kafka_url, produce
    from streamssl.streams.lake import default_lake

    if args.rate < 0 or args.limit < 0 or args.partitions < 1:
        raise ConfigError("--rate and --limit must be >= 0 and --partitions >= 1")
    bootstrap, topic, _ = parse_kafka_url(args.to)
    require("kafka", "kafka", "kafka://")
    data = args.data or str(default_lake())
    if "://" not in data and not Path(data).exists():
        raise SourceError(f"data not found: {data}")
    started = time.monotonic()
    create_topic(bootstrap, topic, partitions=args.partitions)
    sent = produce(bootstrap, topic, lake_records(data), rate=args.rate, limit=args.limit)
    print(json.dumps({"to": args.to, "data": data, "records": sent, "seconds": round(time.monotonic() - started, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging("json" if getattr(args, "log_format", None) == "json" else "text")
    try:
        return {"run": _run, "config": _config, "eval": _eval, "lake": _lake, "produce": _produce,
                "forecast": forecast.run, "report": report.run}[args.command](args)
    except (ConfigError, SourceError, EncoderLoadError, RunDirError) as err:
        print(f"streamssl: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"streamssl: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("streamssl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
