"""One row per method: kNN top-1 after the same number of samples seen, each with its own tuned defaults.

Each method runs the real CLI with its defaults and recipe (`streamssl run --method X --max-steps N`, N =
samples / its batch size) on the embedded Fashion-MNIST lake, the in-run monitor off; the published encoder
is scored by `streamssl eval` (60k bank, 10k test, k=200, T=0.1) next to raw pixels and the untrained ConvNet
(fed as trained encoders are). The goal, the untrained encoder + 2 points, prints next to every row.

    .venv/bin/python bench/methods.py [--samples 150000] [--methods moco,swav,...] [-- --set key=value ...]

`--baselines '{"raw_pixels": …, "untrained": …, "untrained_unnormalised_input": …}'` reuses the baselines line an
earlier run printed (the same seed and data score the same), so that a table measured in parts skips them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from runs import CommandFailed, baselines, machine, train_samples

from streamssl.models.registry import METHODS

GOAL_OVER_UNTRAINED = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=150_000, help="training samples per method")
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--keep", default="", help="keep the run dirs (and published encoders) under this folder")
    parser.add_argument("--baselines", default="", help="an earlier run's baselines line (JSON) instead of scoring them")
    parser.add_argument("run_args", nargs="*", help="passed to every `streamssl run` (after --)")
    args = parser.parse_args()
    print(json.dumps(machine()), flush=True)
    base = json.loads(args.baselines) if args.baselines else baselines()
    print(json.dumps(base), flush=True)
    goal = base["untrained"] + GOAL_OVER_UNTRAINED
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="streamssl-methods-") as scratch:
        root = Path(args.keep or scratch)
        for method in args.methods.split(","):
            try:
                row = train_samples(method, args.samples, root / method, args.run_args)
            except CommandFailed as err:  # one broken method must not cost the other rows
                row = {"method": method, "error": str(err), "knn_top1": float("nan")}
            row["goal"] = round(goal, 4)
            row["met"] = bool(row["knn_top1"] >= goal)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nraw pixels {100 * base['raw_pixels']:.2f}% | untrained encoder {100 * base['untrained']:.2f}% "
          f"(unnormalised input {100 * base['untrained_unnormalised_input']:.2f}%)")
    print("\n| method | samples | steps | wall s | samples/s | kNN top-1 | goal (untrained + 2) | met |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row.get('samples_seen', '—')} | {row.get('steps', '—')} | "
              f"{row.get('train_seconds', '—')} | {row.get('samples_per_s', '—')} | {100 * float(row['knn_top1']):.2f}% | "
              f"{100 * goal:.2f}% | {'yes' if row['met'] else 'no'} |")


if __name__ == "__main__":
    main()
