"""CPC on a UCR set: linear-probe top-1 of the trained encoder vs raw values vs the same encoder untrained.

Trains CPC for --minutes on random crops (length --window, a random offset per crop) of the set's train
series, labels unused; then fits the same softmax probe on whole train series and scores the test split,
for (1) the CPC encoder's pooled features, (2) the raw z-normalised values, (3) the encoder with the
initial weights CPC started from. Prints one JSON line per stage.

    .venv/bin/python bench/cpc_probe.py [--dataset ElectricDevices] [--minutes 5] [--window 64] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from streamssl.models.cpc import CPC
from streamssl.models.series_backbones import PooledSeriesEncoder, build_series_encoder
from streamssl.pipeline.series.probe import load_ucr, raw_window_probe, series_linear_probe


def random_crops(series: torch.Tensor, count: int, window: int, gen: torch.Generator) -> torch.Tensor:
    """`count` crops [count, C, window] of random series at random offsets, gathered in one indexing op."""
    rows = torch.randint(len(series), (count,), generator=gen)
    starts = torch.randint(series.shape[2] - window + 1, (count,), generator=gen)
    positions = starts[:, None] + torch.arange(window)  # [count, window]
    return series[rows[:, None], :, positions].transpose(1, 2)  # indexing puts C last: [count, window, C]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ElectricDevices")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPC training budget (wall clock)")
    parser.add_argument("--window", type=int, default=64, help="crop length fed to CPC")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prediction-steps", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--queue-size", type=int, default=0)
    parser.add_argument("--momentum", type=float, default=0.99, help="of the encoder copy that fills the queue")
    parser.add_argument("--probe-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    train_x, train_y = load_ucr(args.dataset, "train")
    test_x, test_y = load_ucr(args.dataset, "test")
    if args.window > train_x.shape[2]:
        parser.error(f"--window {args.window} is longer than the {args.dataset} series ({train_x.shape[2]} points)")
    torch.manual_seed(args.seed)
    backbone, feature_dim = build_series_encoder("conv", channels=train_x.shape[1])
    untrained = copy.deepcopy(backbone)
    method = CPC(backbone, feature_dim, prediction_steps=args.prediction_steps, temperature=args.temperature,
                 queue_size=args.queue_size, momentum=args.momentum).to(device)
    optimizer = torch.optim.Adam(method.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    start = last_print = time.monotonic()
    steps = 0
    while time.monotonic() - start < args.minutes * 60:
        windows = random_crops(train_x, args.batch_size, args.window, gen).to(device, non_blocking=True)
        loss, logs = method([windows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_step_end(steps)  # the trainer's contract; CPC keeps no schedule
        steps += 1
        if time.monotonic() - last_print > 30:  # the only host syncs: one progress line per 30 s
            last_print = time.monotonic()
            print(json.dumps({"stage": "train", "seconds": round(last_print - start, 1), "step": steps,
                              "loss": round(float(loss.detach()), 4), **{k: round(float(v), 4) for k, v in logs.items()}}),
                  flush=True)
    train_seconds = time.monotonic() - start
    print(json.dumps({"stage": "trained", "dataset": args.dataset, "steps": steps, "train_seconds": round(train_seconds, 1),
                      "windows_per_second": round(steps * args.batch_size / train_seconds, 1),
                      "final_loss": round(float(loss.detach()), 4), "cpc_accuracy": round(float(logs["cpc_accuracy"]), 4)}),
          flush=True)

    for name, probe in (
        ("cpc_encoder", lambda: series_linear_probe(method.encoder(), train_x, train_y, test_x, test_y, device,
                                                    args.probe_steps, args.seed)),
        ("raw_values", lambda: raw_window_probe(train_x, train_y, test_x, test_y, device, args.probe_steps, args.seed)),
        ("untrained_encoder", lambda: series_linear_probe(PooledSeriesEncoder(untrained).to(device), train_x, train_y,
                                                          test_x, test_y, device, args.probe_steps, args.seed)),
    ):
        probe_start = time.monotonic()
        top1 = probe()
        print(json.dumps({"stage": "probe", "features": name, "top1": round(top1, 4),
                          "seconds": round(time.monotonic() - probe_start, 1)}), flush=True)


if __name__ == "__main__":
    main()
