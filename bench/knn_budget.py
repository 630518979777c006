"""The default run's encoder after 70k, 150k and 300k samples seen, against the goals, and the label-efficiency
protocols (linear probe, 1% / 10% fine-tune) of the 300k encoder next to raw pixels and the untrained ConvNet.

Each budget is its own run of `streamssl run` with the defaults (the embedded lake), bounded by steps so its
schedule anneals to that budget (a time-bounded run anneals to its estimated horizon the same way). Scoring:
`streamssl eval` (kNN: 60k bank, 10k test, k=200, T=0.1; `--linear`; `--labels F`).

    .venv/bin/python bench/knn_budget.py [--samples 70000,150000,300000] [--no-probes] [-- --set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from runs import baselines, cli, machine, train_samples

GOALS = {70_000: 0.84, 150_000: 0.86, 300_000: 0.88}


def probes(encoder: str) -> dict[str, float]:
    """Linear probe (all labels) and fine-tunes on 1% and 10% of the labels."""
    result = {"linear": json.loads(cli("eval", "--encoder", encoder, "--linear"))["linear_top1"]}
    for fraction in (0.01, 0.1):
        result[f"labels_{fraction:g}"] = json.loads(cli("eval", "--encoder", encoder, "--labels", str(fraction)))[
            "fine_tune_top1"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="70000,150000,300000")
    parser.add_argument("--no-probes", action="store_true", help="skip the linear probe and fine-tunes")
    parser.add_argument("--keep", default="", help="keep the run dirs under this folder")
    parser.add_argument("run_args", nargs="*", help="passed to `streamssl run` (after --)")
    args = parser.parse_args()
    print(json.dumps(machine()), flush=True)
    base = baselines()
    print(json.dumps(base), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamssl-knn-") as scratch:
        root = Path(args.keep or scratch)
        budgets = [int(s) for s in args.samples.split(",")]
        for samples in budgets:
            row = train_samples("moco", samples, root / f"default-{samples}", args.run_args)
            row["goal"] = GOALS.get(samples)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.no_probes:
            last = str(root / f"default-{budgets[-1]}" / "published" / "latest")
            protocols = {"encoder": probes(last), "raw pixels": {"linear": json.loads(
                cli("eval", "--encoder", "raw", "--linear"))["linear_top1"]}, "untrained": probes("random")}
            print(json.dumps(protocols), flush=True)
    print(f"\nraw pixels {100 * base['raw_pixels']:.2f}% | untrained {100 * base['untrained']:.2f}% "
          f"(unnormalised input {100 * base['untrained_unnormalised_input']:.2f}%)")
    print("\n| samples | steps | wall s | samples/s | kNN top-1 | goal | met |\n|---|---|---|---|---|---|---|")
    for row in rows:
        goal = row["goal"]
        print(f"| {row['samples_seen']} | {row['steps']} | {row['train_seconds']} | {row['samples_per_s']} | "
              f"{100 * row['knn_top1']:.2f}% | {'—' if goal is None else f'{100 * goal:.0f}%'} | "
              f"{'—' if goal is None else ('yes' if row['knn_top1'] >= goal else 'no')} |")
    if not args.no_probes:
        print("\n| protocol | encoder | raw pixels | untrained |\n|---|---|---|---|")
        for name in ("linear", "labels_0.01", "labels_0.1"):
            raw = protocols["raw pixels"].get(name)
            print(f"| {name} | {100 * protocols['encoder'][name]:.2f}% | "
                  f"{'—' if raw is None else f'{100 * raw:.2f}%'} | {100 * protocols['untrained'][name]:.2f}% |")


if __name__ == "__main__":
    main()
